"""torchrun's restarts: which run a restarted group of processes continues, and a lost process as one line.

When a process of a torchrun launch dies (a lost node, a preempted machine, the out-of-memory killer),
torchrun's elastic agent stops the others and, while ``--max-restarts`` allows, starts the whole group
again. Process 0 writes the checkpoint folder of the run it trains into the agent's store, which lives as
long as the launch: a group that finds a run there was started again, and resumes that run's ``last.pt``
at the step where it was saved. (torchrun's ``TORCHELASTIC_RESTART_COUNT`` cannot tell: agents on two
machines count differently when one of them restarts for the other.)
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import torch.distributed as dist

from segmentation.config import UserError
from segmentation.console import first_line
from segmentation.engine.distributed import agent_store
from segmentation.settings import RunSettings

LAUNCH_RUN_KEY = "unet-launch/run"  # in torchrun's agent store: the checkpoint folder of the run being trained
# how gloo and NCCL word a peer that is gone; their errors arrive as plain RuntimeErrors
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


class LostProcess(UserError):
    """Another process of the group is gone: every surviving process says so (not process 0 alone, which
    may be the one that is gone)."""

    every_process = True


def publish_run(run_weights: Path) -> None:
    """Under torchrun, process 0 records that this launch trains the run in ``run_weights`` (once the run
    has its first ``last.pt``)."""
    store = agent_store()
    if store is not None:
        store.set(LAUNCH_RUN_KEY, str(run_weights))


def continued_after_restart(run: RunSettings, every_fold: bool) -> tuple[RunSettings, str | None]:
    """The ``run`` settings as a restarted group of processes needs them, and a note saying so: resuming the
    ``last.pt`` of the run that the group before it was training (under ``train.fold: all``,
    ``every_fold``, continuing its series of folds). The first group, and runs outside torchrun, get
    ``run`` as it is and no note. Every process reads the same answer: process 0 records the next run
    only after all of them have asked."""
    store = agent_store()
    if store is None:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            return run, None
        return run, (
            "torchrun started the processes again but keeps no store for them (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1):"
            " starting a new run; continue the one before with train.resume=auto"
        )
    if not store.check([LAUNCH_RUN_KEY]):
        return run, None
    folder = Path(store.get(LAUNCH_RUN_KEY).decode())
    restarted = "torchrun started the processes again"
    series = re.fullmatch(r"(.+)-fold\d+", folder.name)
    if every_fold and series:
        continued = dataclasses.replace(run, run_name=series.group(1), resume="auto")
        return continued, f"{restarted}: continuing the folds of {series.group(1)} ({folder.name} and on)"
    last = folder / "last.pt"
    if not last.is_file():
        return run, f"{restarted}, but {last} is gone: starting a new run"
    return dataclasses.replace(run, resume=str(last)), f"{restarted}: continuing run {folder.name} from {last}"


def lost_process(error: RuntimeError, rank: int, world_size: int) -> LostProcess | None:
    """The one line for a collective that failed because another process is gone (None for any other
    error): which process, and what happens next."""
    if world_size < 2 or not (isinstance(error, dist.DistError) or any(s in str(error) for s in LOST_PEER_SIGNS)):
        return None
    other = f"process {1 - rank} of 2" if world_size == 2 else f"another of the {world_size} processes"
    cause = re.sub(r"^\[\S+\]\s*", "", first_line(error)).split(". ")[0][:160]  # without gloo's source file
    return LostProcess(
        f"{other} is gone ({cause}); process {rank} stops too, without saving. Under torchrun --max-restarts=N the "
        "group starts again and continues this run from its last.pt; otherwise continue with train.resume=auto"
    )
