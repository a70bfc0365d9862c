"""Training in several processes under torchrun: the process group, what the processes share, a lost one.

One process per GPU (NCCL) or several CPU processes (gloo), each with its own shard of the tiles and
the gradients all-reduced by DistributedDataParallel. With one process every helper here does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import time
import uuid

import torch
import torch.distributed as dist

from segmentation.config import UserError
from segmentation.console import first_line
from segmentation.device import resolve_device
from segmentation.engine.signals import terminations_held

GROUP_TIMEOUT = datetime.timedelta(minutes=30)  # as torch.distributed's default for a collective
# how gloo and NCCL word a peer that is gone; their errors arrive as plain RuntimeErrors
LOST_PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited")


class LostProcess(UserError):
    """Another process of the group is gone: every surviving process says so (not process 0 alone, which
    may be the one that is gone)."""

    every_process = True


@contextlib.contextmanager
def process_group(device_name: str):
    """Yield ``(rank, world_size, device)``. Launched by torchrun (``LOCAL_RANK`` in the
    environment), join its process group: NCCL with one GPU per process (``cuda:LOCAL_RANK``), or gloo
    on CPUs, also for a single process (the model is wrapped in DistributedDataParallel from two on);
    leave it again at the end."""
    device = resolve_device(device_name)
    if "LOCAL_RANK" not in os.environ:
        yield 0, 1, device
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"torchrun started process {local_rank} on this node but only {torch.cuda.device_count()} GPU(s) "
                "are visible: lower --nproc_per_node"
            )
        device = torch.device("cuda", local_rank)  # one GPU per process, whatever train.device names
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UserError(
            f"distributed training runs on CUDA GPUs (NCCL) or on CPUs (gloo), not on {device}: set "
            "train.device=auto or cpu"
        )
    joined = not dist.is_initialized()
    if joined:
        join_group("nccl" if device.type == "cuda" else "gloo", rank, world_size)
    # torchrun's agent stops the survivors of a lost process with SIGTERM: held, it never cuts off their one line
    with terminations_held() if joined else contextlib.nullcontext():
        try:
            yield rank, world_size, device
            if joined:
                # leave together: gloo can abort a process whose peer tears the group down before it is done
                try:
                    dist.barrier()
                except RuntimeError as error:  # a process lost at the very end is one line too
                    lost = lost_process(error, rank, world_size)
                    if lost is None:
                        raise
                    raise lost from None
        finally:
            if joined:
                dist.destroy_process_group()


def join_group(backend: str, rank: int, world_size: int) -> None:
    """Join torchrun's process group with ``backend``, through a store of this group's own where the agent
    keeps one (``group_store``)."""
    store = agent_store()
    if store is None:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=group_store(store, rank, world_size), rank=rank, world_size=world_size)


def agent_store(timeout: datetime.timedelta = GROUP_TIMEOUT) -> dist.Store | None:
    """The key-value store of torchrun's agent (``MASTER_ADDR:MASTER_PORT``), which outlives the groups of
    processes that the agent starts and restarts, and is new for each launch; None outside torchrun, or
    where the agent keeps none for its processes (``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)


def group_store(
    store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta = GROUP_TIMEOUT
) -> dist.Store:
    """torchrun's agent ``store`` under a prefix that only this group of processes knows.

    torchrun's agent keeps one store for all the worker groups it starts, and PyTorch (2.13) lets a
    restarted group read the addresses that the group before it left there: gloo then connects to a dead
    process and fails, NCCL can take a stale id (pytorch/pytorch#135712, #167288). torchrun's restart count
    would make a prefix, but agents on different machines count differently. So process 0 makes a fresh
    token and hands it to each process that asks with a fresh nonce of its own: stale nonces (the processes
    of earlier groups are dead by the time a group starts) get answers nobody reads."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"unet-group/ask/{rank}", nonce)
        store.wait([f"unet-group/answer/{nonce}"], timeout)
        token = store.get(f"unet-group/answer/{nonce}").decode()
        store.set(f"unet-group/{token}/joined/{rank}", "1")
        return dist.PrefixStore(f"unet-group/{token}/", store)
    token, joined = uuid.uuid4().hex, set()
    deadline = time.monotonic() + timeout.total_seconds()
    while len(joined) < world_size - 1:
        if time.monotonic() > deadline:
            missing = sorted(set(range(1, world_size)) - joined)
            raise UserError(f"processes {missing} of {world_size} did not join within {timeout}: see their output")
        for other in set(range(1, world_size)) - joined:
            if store.check([f"unet-group/{token}/joined/{other}"]):
                joined.add(other)
            elif store.check([f"unet-group/ask/{other}"]):
                store.set(f"unet-group/answer/{store.get(f'unet-group/ask/{other}').decode()}", token)
        time.sleep(0.01)
    return dist.PrefixStore(f"unet-group/{token}/", store)


def from_rank_zero(value, world_size: int):
    """Process 0's ``value`` in every process (a run name, a checkpoint path)."""
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """``tensor`` summed over the processes, in place (one process: as it is)."""
    if world_size > 1:
        dist.all_reduce(tensor)
    return tensor


def gather_from_processes(value, world_size: int) -> list:
    """Every process's ``value`` (any picklable object), in rank order, in every process."""
    if world_size == 1:
        return [value]
    shards: list = [None] * world_size
    dist.all_gather_object(shards, value)
    return shards


def share_buffers(models: list[torch.nn.Module | None], world_size: int) -> None:
    """Give every process process 0's buffers of ``models`` (BatchNorm's running statistics, which each
    process updates from its own batches; None entries are skipped), so that all of them evaluate and
    end with the same models."""
    if world_size > 1:
        for model in models:
            for buffer in model.buffers() if model is not None else ():
                dist.broadcast(buffer, src=0)


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
