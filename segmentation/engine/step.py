"""One optimisation step, as training, search and bench take it: optimizer, learning-rate schedule, mixed precision.

``train_step`` is the single step of the project: full training, overfitting one batch, the
hyperparameter search, the learning-rate finder and the benchmark all call it, with the same loss
(the weight map included).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable

import torch
from torch.nn.parallel import DistributedDataParallel

from losses import segmentation_loss
from segmentation.console import first_line, note
from segmentation.settings import TrainSettings


def build_optimizer(model: torch.nn.Module, train: TrainSettings, device: torch.device) -> torch.optim.Optimizer:
    """``train.optim`` over the model's parameters; bitsandbytes' 8-bit variant when asked and usable."""
    settings = {"lr": train.lr, "weight_decay": train.weight_decay}
    if train.optim == "sgd":
        if train.use_bitsandbytes:
            note("train.use_bitsandbytes applies to adam and adamw only: using torch's SGD")
        return torch.optim.SGD(model.parameters(), momentum=train.momentum, **settings)
    if train.use_bitsandbytes:
        optimizer_class = bitsandbytes_optimizer_class(train.optim, device)
        if optimizer_class is not None:
            return optimizer_class(model.parameters(), **settings)
    optimizer_class = torch.optim.AdamW if train.optim == "adamw" else torch.optim.Adam
    return optimizer_class(model.parameters(), **settings)


def bitsandbytes_optimizer_class(optim: str, device: torch.device) -> type | None:
    """bitsandbytes' AdamW8bit / Adam8bit if it imports and can take a step on ``device``, else None."""
    try:
        # bitsandbytes logs warnings about its 4-bit kernels at import, which this optimizer does not use
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes

        optimizer_class = bitsandbytes.optim.AdamW8bit if optim == "adamw" else bitsandbytes.optim.Adam8bit
        # bitsandbytes keeps 8-bit state only for tensors of >= 4096 elements: probe one that size
        probe = torch.nn.Parameter(torch.zeros(4096, device=device))
        probe.grad = torch.ones_like(probe)
        optimizer_class([probe]).step()
        return optimizer_class
    except Exception as error:  # it fails in many ways: not installed, no kernels for this device, ...
        note(f"bitsandbytes' 8-bit {optim} does not work on {device} ({first_line(error)}): using torch's {optim}")
        return None


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_factor: float = 0.0) -> float:
    """Learning rate at ``step`` as a fraction of the peak: linear warm-up, then the named decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule in ("cosine", "warmup-cosine"):
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule == "poly":
        decay = (1 - progress) ** 0.9  # nnU-Net's exponent
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return min_factor + (1 - min_factor) * decay


def build_scheduler(
    optimizer: torch.optim.Optimizer, train: TrainSettings, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``train`` (``lr_factor``) over ``train.max_epochs``, stepped once per
    optimisation step (``fit_schedule`` refits it to a time budget's plan)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_factor(train, steps_per_epoch, train.max_epochs))


def fit_schedule(
    scheduler: torch.optim.lr_scheduler.LambdaLR, train: TrainSettings, steps_per_epoch: int, epochs: int
) -> None:
    """Stretch or shrink ``scheduler``'s decay to end after ``epochs`` (a time budget's plan, which changes as
    epochs are timed); the step count and warm-up stay as they are."""
    scheduler.lr_lambdas = [schedule_factor(train, steps_per_epoch, epochs)] * len(scheduler.lr_lambdas)


def schedule_factor(train: TrainSettings, steps_per_epoch: int, epochs: int) -> Callable[[int], float]:
    """``lr_factor`` of a step under ``train``'s schedule over ``epochs`` of ``steps_per_epoch`` steps."""
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(train.warmup_epochs * steps_per_epoch)
    min_factor = train.min_lr / train.lr
    return lambda step: lr_factor(step, total_steps, warmup_steps, train.scheduler_type, min_factor)


def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    """Move ``ema_model``'s weights and float buffers toward ``model``'s: ``ema = d * ema + (1 - d) * model``
    with ``d = min(decay, (1 + step) / (10 + step))``, so that the first steps (``step`` counts from 0)
    do not keep the random start in the average. Integer buffers (BatchNorm's batch count) are copied.

    Not torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn: its decay is constant (no
    warm-up), its first update copies the weights, it leaves BatchNorm's integer batch count behind, and
    its state dict prefixes every key with ``module.`` and adds ``n_averaged``, so that best.pt would no
    longer load into a plain UNet (test.py, the exports, checkpoints written before)."""
    d = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema, weight in zip(ema_model.state_dict().values(), model.state_dict().values()):
            if ema.is_floating_point():
                ema.lerp_(weight, 1.0 - d)
            else:
                ema.copy_(weight)


def autocast(device: torch.device, precision: str):
    """The autocast context of ``train.precision`` (fp32: none): convolutions run in bf16 or fp16,
    reductions such as the loss stay in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch,
    loss_kind: str,
    grad_clip: float,
    device: torch.device,
    precision: str = "fp32",
    scaler: torch.amp.GradScaler | None = None,
    accum_steps: int = 1,
    channels_last: bool = False,
) -> torch.Tensor:
    """One optimisation step on ``(image, label, weight map)``; returns the loss, still on the device
    (reading it would make the host wait for the device).

    With ``accum_steps`` > 1 the batch is split into that many micro-batches whose gradients add up
    (each loss weighted by its share of the batch); a DistributedDataParallel model then all-reduces
    the gradients once, after the last one. ``scaler`` (fp16) scales the loss against underflow.
    """
    image, label, weight = (tensor.to(device, non_blocking=True) for tensor in batch)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    micro_batches = list(zip(image.chunk(accum_steps), label.chunk(accum_steps), weight.chunk(accum_steps)))
    wrapped = getattr(model, "_orig_mod", model)  # under torch.compile's wrapper
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for index, (micro_image, micro_label, micro_weight) in enumerate(micro_batches):
        last = index == len(micro_batches) - 1
        with (
            contextlib.nullcontext() if last or not isinstance(wrapped, DistributedDataParallel) else wrapped.no_sync()
        ):
            with autocast(device, precision):
                logits = model(micro_image)
            loss = segmentation_loss(loss_kind, logits.float(), micro_label, micro_weight) * (
                micro_image.shape[0] / image.shape[0]
            )
            (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if scaler:
        scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return total


def loss_cure(train: TrainSettings, bf16: bool) -> str:
    """What to change when the training loss is no longer finite: under ``train.precision: fp16`` the
    precision (``bf16`` where the device has it), else the learning rate or gradient clipping."""
    if train.precision == "fp16":
        return (
            "train.precision=fp16 overflows float16's range (up to 65504): "
            f"use train.precision={'bf16' if bf16 else 'fp32'}, or lower train.lr (now {train.lr})"
        )
    return f"lower train.lr (now {train.lr}) or set train.grad_clip"
