"""The compute device: ``train.device`` resolved to one that exists, its speed settings, its memory, OOM advice.

CUDA gets cuDNN's autotuning and TF32; a CPU is asked whether it computes bfloat16 natively. Before a run
allocates anything, ``require_memory`` compares what it will need with what the device has free.
"""

from __future__ import annotations

import os

import torch

from segmentation.config import UserError
from segmentation.console import note
from segmentation.settings import TrainSettings


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"train.device is {name!r} but PyTorch sees no CUDA GPU here (a CPU-only build or no driver); use "
                "train.device=auto or cpu"
            )
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(
                f"train.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "train.device is 'mps' but the Apple GPU backend is not available here; use train.device=auto or cpu"
        )
    return torch.device(name)


def prepare_device(device: torch.device, precision: str = "fp32") -> None:
    """On CUDA, let cuDNN pick its fastest kernels for the fixed tile size once and use TF32 for
    fp32 matrix products; a UserError when ``precision`` is bf16 on a GPU without bfloat16, a note
    when it is bf16 on a CPU that would emulate it."""
    if device.type == "cpu" and precision == "bf16" and not cpu_has_native_bf16():
        note(
            "train.precision=bf16 on a CPU without bfloat16 instructions (AVX512-BF16 or AMX) is slower than "
            "fp32: use train.precision=fp32 (an fp32 step takes about twice as long as a native bf16 one: lower "
            "train.max_epochs for the same time)"
        )
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(
            "train.precision=bf16 needs a GPU with bfloat16 (Ampere or newer); "
            f"{torch.cuda.get_device_name(device)} has none: use train.precision=fp16"
        )


def cpu_has_native_bf16(cpuinfo_path: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86 AVX512-BF16 or AMX, ARM BF16): then bf16
    autocast trains a small U-Net about twice as fast as fp32; oneDNN emulates it elsewhere, slower.
    Read from the flags of ``cpuinfo_path`` (Linux); where there is none, oneDNN's own check."""
    try:
        with open(cpuinfo_path) as cpuinfo:
            flags = {
                word
                for line in cpuinfo
                if line.lower().startswith(("flags", "features"))
                for word in line.split(":", 1)[1].split()
            }
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except (OSError, IndexError):
        is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)  # private: may move
        return bool(is_supported()) if is_supported is not None else True


def memory_description(device: torch.device) -> str:
    """The device and how much memory it has: ``cuda:0 (NVIDIA H200, 139.8 GiB)``, ``cpu (23.5 GiB of RAM)``."""
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"{device} ({properties.name}, {properties.total_memory / 2**30:.1f} GiB)"
    try:
        return f"{device} ({os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB of RAM)"
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        return str(device)


def free_memory(device: torch.device, meminfo_path: str = "/proc/meminfo") -> int | None:
    """The bytes that ``device`` has free for new tensors: on CUDA what the driver reports free
    (``torch.cuda.mem_get_info``), on a CPU the kernel's MemAvailable (``meminfo_path``, Linux), else the
    free physical pages (``os.sysconf``); None where it cannot be known (mps, an unusual system)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open(meminfo_path) as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        return None


def amount(size: float) -> str:
    """Bytes in words, a decimal below 10: ``812 GB``, ``3.2 GB``, ``1.0 MB``, ``240 MB``, ``4.1 kB`` (decimal
    units)."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            value = size / scale
            return f"{value:.1f} {unit}" if value < 9.95 else f"{value:.0f} {unit}"
    return f"{size:.0f} bytes"


def require_memory(task: str, parts: dict[str, int], device: torch.device, advice: str, sharing: int = 1) -> None:
    """A UserError (one line) when ``task`` needs more memory than ``device`` has free: ``parts`` are what it
    needs in bytes, named (``{"parameters": 3.2e9, ...}``), ``sharing`` the processes about to take the same
    memory, ``advice`` what to lower. Nothing happens where the free memory cannot be known."""
    free = free_memory(device)
    needed = sum(parts.values()) * sharing
    if free is None or needed <= free:
        return
    listed = ", ".join(f"{name} {amount(size)}" for name, size in parts.items())
    each = f" for each of {sharing} processes" if sharing > 1 else ""
    raise UserError(
        f"{task} needs about {amount(needed / sharing)}{each} ({listed}), {amount(free)} are free on {device}: {advice}"
    )


def bf16_supported(device: torch.device) -> bool:
    """Whether ``train.precision=bf16`` runs natively: a CUDA GPU from Ampere on, or a CPU."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8)


def out_of_memory_advice(device: torch.device, train: TrainSettings, tile_size: int) -> str:
    """One line for running out of memory while training on tiles of ``tile_size`` px: the numbers that
    matter and what to lower or switch on."""
    switches = ["train.activation_checkpointing=true"] if not train.activation_checkpointing else []
    if train.precision == "fp32" and bf16_supported(device) and device.type == "cuda":
        switches.append("train.precision=bf16")
    return (
        f"out of memory while training on {memory_description(device)} at train.batch_size={train.batch_size}, "
        f"train.tile_size={tile_size}, train.precision={train.precision}: lower train.batch_size or "
        "train.tile_size" + (f", or set {' or '.join(switches)}" if switches else "")
    )


def release_cached_memory(device: torch.device) -> None:
    """Give the CUDA caching allocator's free blocks back, so that a smaller retry can use them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
