"""torchrun's restarts: which run a restarted group of processes continues (a lost process: ``distributed``).

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

from segmentation.engine.distributed import agent_store
from segmentation.settings import RunSettings

LAUNCH_RUN_KEY = "unet-launch/run"  # in torchrun's agent store: the checkpoint folder of the run being trained


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
