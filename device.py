"""The compute device: ``train.device`` resolved to one that exists, and the CUDA settings for speed."""

from __future__ import annotations

import torch

from config import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"train.device is {name!r} but PyTorch sees no CUDA GPU here (a CPU-only build or no driver); use train.device=auto or cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"train.device is {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is 'mps' but the Apple GPU backend is not available here; use train.device=auto or cpu")
    return torch.device(name)


def prepare_device(device: torch.device, precision: str = "fp32") -> None:
    """On CUDA, let cuDNN pick its fastest kernels for the fixed tile size once and use TF32 for
    fp32 matrix products; a UserError when ``precision`` is bf16 on a GPU without bfloat16."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"train.precision=bf16 needs a GPU with bfloat16 (Ampere or newer); {torch.cuda.get_device_name(device)} has none: use train.precision=fp16")
