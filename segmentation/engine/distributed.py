"""Training in several processes under torchrun: the process group, and what the processes share.

One process per GPU (NCCL) or several CPU processes (gloo), each with its own shard of the tiles and
the gradients all-reduced by DistributedDataParallel. With one process every helper here does nothing.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from segmentation.config import UserError
from segmentation.device import resolve_device


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield rank, world_size, device
        if joined:
            # leave together: gloo can abort a process whose peer tears the group down before it is done
            dist.barrier()
    finally:
        if joined:
            dist.destroy_process_group()


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
