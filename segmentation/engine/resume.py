"""Continuing and starting runs from checkpoints: resume checked against the config and restored, init_from.

``train.resume`` continues a run exactly where its checkpoint stopped (``restore`` loads every state
that ``training_state`` saved); ``train.init_from`` starts a new run from another run's weights
(``read_initial_weights``, ``load_initial_weights``). Checkpoint files themselves are read and written by
``segmentation.checkpoints``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from segmentation.checkpoints import Progress, check_architecture, check_weights, load_weights, read_checkpoint
from segmentation.config import (
    ARCHITECTURE_KEYS,
    UserError,
    architecture_differences,
    split_differences,
)
from segmentation.console import first_line, note
from segmentation.plan import Plan
from segmentation.settings import DataSettings, UNetSettings


def load_checkpoint(path: Path, unet: UNetSettings, data: DataSettings, seed: int) -> dict:
    """``read_checkpoint`` of a run to resume, checked to hold the architecture ``unet`` and to have
    trained on the split (the same test images) that ``data`` and ``train.seed`` ``seed`` describe."""
    state = read_checkpoint(path)
    check_architecture(state, unet, path)
    check_weights(state, path)
    differences = split_differences(state["config"], data, seed)
    if differences:
        raise UserError(
            f"{path} was trained on another split ({'; '.join(differences)}): resuming would mix its test images "
            "into training; set these keys as in the checkpoint, or start a new run"
        )
    return state


# train.init_from starts a new output layer for other classes (or the boundary class), adapts the first convolution
ADAPTABLE_KEYS = ("num_classes", "image_channels", "boundary_class")
FIRST_CONVOLUTION = "inc.double_conv.0.weight"  # (widths[0], image_channels, 3, 3)


def read_initial_weights(path: Path, unet: UNetSettings) -> dict:
    """``read_checkpoint`` of ``train.init_from``, checked to be a network that the ``unet`` settings can
    start from: the same widths, padding, norm and upsampling (other classes and image channels are
    adapted by ``load_initial_weights``); a UserError names the keys that differ."""
    try:
        state = read_checkpoint(path)
        check_weights(state, path)
    except UserError as error:
        raise UserError(f"train.init_from: {error}") from None
    fixed = [key for key in ARCHITECTURE_KEYS if key not in ADAPTABLE_KEYS]
    differences = architecture_differences(state["config"], unet, False, fixed)
    if differences:
        raise UserError(
            f"train.init_from: {path} holds another network ({'; '.join(differences)}): a run can start from a "
            "checkpoint of other unet.num_classes or unet.image_channels only; set these keys as in the checkpoint"
        )
    return state


def load_initial_weights(model: torch.nn.Module, state: dict, path: Path) -> str:
    """Start ``model`` from the weights of a checkpoint (``read_initial_weights``): every tensor of the same
    name and shape is loaded; the first convolution is adapted to another number of image channels (each
    new input channel gets the mean of the old ones' summed weights, so that an image whose channels
    are equal gives the same response); tensors of another shape (the output layer for other classes)
    keep the model's own initialisation. Returns the note that says what was loaded and what starts fresh."""
    own = model.state_dict()
    weights = dict(state["model"])
    adapted = ""
    old = weights.get(FIRST_CONVOLUTION)
    new = own[FIRST_CONVOLUTION]
    if old is not None and old.shape != new.shape and old.shape[0] == new.shape[0]:
        weights[FIRST_CONVOLUTION] = (old.sum(dim=1, keepdim=True) / new.shape[1]).expand_as(new).clone()
        adapted = f"; the first convolution adapted from {old.shape[1]} to {new.shape[1]} image channel(s)"
    loaded = {name: tensor for name, tensor in weights.items() if name in own and own[name].shape == tensor.shape}
    model.load_state_dict({**own, **loaded})
    fresh = sorted({name.rsplit(".", 1)[0] for name in own if name not in loaded})
    fresh_part = f"; starting fresh: {', '.join(fresh)}" if fresh else ""
    epoch = Progress.from_dict(state["progress"], path).epoch
    return (
        f"train.init_from: {len(loaded)} of {len(own)} tensors from {path} (epoch {epoch}){adapted}{fresh_part}; "
        "optimizer, schedule, epochs and run folder start fresh"
    )


def find_resume_checkpoint(resume: str | None, save_path: Path) -> Path | None:
    """The checkpoint named by ``train.resume``: ``auto`` = the newest ``last.pt`` under ``save_path``."""
    if resume is None:
        return None
    if resume == "auto":
        candidates = sorted(save_path.glob("*/last.pt"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            note(f"train.resume=auto: no checkpoint in {save_path}/*/last.pt yet, starting a new run")
            return None
        return candidates[-1]
    path = Path(resume)
    if not path.is_file():
        raise UserError(f"train.resume: checkpoint {path} not found (use auto to pick the newest run in {save_path})")
    return path


def finished(progress: Progress, max_epochs: int, early_stopping: int, max_minutes: float = 0.0) -> str | None:
    """Why a run whose checkpoint holds ``progress`` has ended (all ``max_epochs`` epochs, early stopping under
    ``early_stopping`` > 0, or its ``max_minutes`` > 0 spent), or None when it has epochs to go."""
    if progress.epoch >= max_epochs:
        return f"has finished its {max_epochs} epochs"
    if 0 < max_minutes <= progress.seconds / 60:
        return f"has used its train.max_minutes ({max_minutes:g})"
    if progress.stopped_early and early_stopping > 0:
        return "ended by early stopping"
    return None


def newest_fold_series(save_path: Path) -> str | None:
    """The base name of the newest cross-validation series under ``save_path`` (runs named
    ``<base>-fold<i>`` with a ``last.pt``), or None."""
    candidates = sorted(save_path.glob("*-fold*/last.pt"), key=lambda p: p.stat().st_mtime)
    names = [match.group(1) for path in candidates if (match := re.fullmatch(r"(.+)-fold\d+", path.parent.name))]
    return names[-1] if names else None


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    settings: dict,
    plan: Plan,
    progress: Progress,
    device: torch.device,
    ema_model: torch.nn.Module | None = None,
) -> dict:
    """What a checkpoint holds: every state a resumed run needs to continue exactly (``restore``), the
    run's ``settings`` as plain data (``Config.to_dict``) and its ``plan``, from which test.py rebuilds
    model and predictor. ``model`` holds the weights to predict with: the moving average under
    ``train.ema``, when the optimizer's own weights go to ``training_model``."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
    return {
        "model": (model if ema_model is None else ema_model).state_dict(),
        **({"training_model": model.state_dict()} if ema_model is not None else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "config": settings,
        "plan": plan.to_dict(),
        "progress": progress.to_dict(),
        "rng": rng,
    }


def restore(
    checkpoint: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    device: torch.device,
    ema_model: torch.nn.Module | None = None,
    where: Path = Path("checkpoint"),
) -> Progress:
    """Load a checkpoint's model (and moving average), optimizer, scheduler, loss scaler and random
    states; returns its progress. A run that turns ``train.ema`` on starts its average from the weights."""
    load_weights(model, checkpoint.get("training_model", checkpoint["model"]), where)
    if ema_model is not None:
        load_weights(ema_model, checkpoint["model"], where)
    load_optimizer_state(optimizer, checkpoint["optimizer"], where)
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return Progress.from_dict(checkpoint["progress"], where)


PER_PARAMETER_STATES = (
    "exp_avg",
    "exp_avg_sq",
    "max_exp_avg_sq",
    "momentum_buffer",
)  # torch's, shaped as their parameter


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, where: Path) -> None:
    """``optimizer.load_state_dict(state)``, with a UserError of one line where the stored state does not fit
    the network's parameters (an edited checkpoint), instead of a failure at the first step."""
    try:
        optimizer.load_state_dict(state)
        problem = next(
            (
                f"{name} of shape {tuple(value.shape)} for a parameter of shape {tuple(parameter.shape)}"
                for group in optimizer.param_groups
                for parameter in group["params"]
                for name, value in optimizer.state.get(parameter, {}).items()
                if name in PER_PARAMETER_STATES and value.shape != parameter.shape
            ),
            None,
        )
    except (ValueError, KeyError, TypeError) as error:
        problem = first_line(error)
    if problem:
        raise UserError(
            f"{where}: its optimizer state does not fit the network ({problem}; edited?): use a checkpoint as "
            "training.py wrote it"
        )
