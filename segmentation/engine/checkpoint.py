"""Checkpoints: written safely, read back as data, checked against the config, resumed, and turned back into a model.

A checkpoint (``weights/<run>/last.pt`` or ``best.pt``) holds the model, optimizer, scheduler and loss
scaler states, the resolved config, the progress (epoch, batch, step, best value, run name) and the
random states, so that a run resumes exactly and ``test.py`` can rebuild the model from it alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from model import UNet, build_model
from segmentation.config import (
    ARCHITECTURE_KEYS,
    DEFAULT_CONFIG,
    Config,
    PredictSettings,
    TrainSettings,
    UNetSettings,
    UserError,
    architecture_differences,
    load_config,
    merge_overrides,
    resolve,
    split_differences,
    stored_boundary_class,
)
from segmentation.console import first_line, note
from segmentation.device import resolve_device
from segmentation.inference.objects import ObjectRules, object_rules


def save_checkpoint(path: Path, state: dict) -> None:
    """Write with torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def read_checkpoint(path: Path) -> dict:
    """A checkpoint's contents, loaded with ``weights_only=True``: a checkpoint is data, never code."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: checkpoint not found") from None
    except Exception as error:
        raise UserError(f"{path}: {unreadable_reason(error)}") from None
    if not isinstance(state, dict) or not {"model", "config", "progress"} <= state.keys():
        raise UserError(f"{path}: not a checkpoint written by this project's training.py")
    return state


def unreadable_reason(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in a few words: a pickle that would import and
    call code (never run), or a file that is no checkpoint at all."""
    message = str(error)
    if "GLOBAL" in message or "Unsupported global" in message:
        return "holds objects that loading would have to import and run (refused: a checkpoint is data, never code)"
    if "Weights only load failed" in message or "zip" in message.lower() or "pickle" in type(error).__module__:
        return "not a checkpoint file (neither a torch.save archive nor a pickle of tensors and plain data)"
    return f"not a readable checkpoint ({first_line(error)})"


def check_architecture(state: dict, unet: UNetSettings, path: Path) -> None:
    """Raise a UserError naming the ``unet.*`` keys where the checkpoint and ``unet`` disagree."""
    differences = architecture_differences(state["config"], unet)
    if differences:
        raise UserError(
            f"{path} holds another architecture ({'; '.join(differences)}): set these keys as in the checkpoint, "
            "or start a new run"
        )


def load_checkpoint(path: Path, unet: UNetSettings, train: TrainSettings) -> dict:
    """``read_checkpoint`` of a run to resume, checked to hold the architecture ``unet`` and to have
    trained on the split (the same test images) that ``train`` describes."""
    state = read_checkpoint(path)
    check_architecture(state, unet, path)
    differences = split_differences(state["config"], train)
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
    except UserError as error:
        raise UserError(f"train.init_from: {error}") from None
    fixed = [key for key in ARCHITECTURE_KEYS if key not in ADAPTABLE_KEYS]
    differences = architecture_differences(state["config"], unet, fixed)
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
    epoch = state["progress"].get("epoch", "?")
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


def finished(progress: dict, max_epochs: int, early_stopping: int) -> str | None:
    """Why a run whose checkpoint holds ``progress`` has ended (all ``max_epochs`` epochs, or early stopping
    under ``early_stopping`` > 0), or None when it has epochs to go."""
    if progress["epoch"] >= max_epochs:
        return f"has finished its {max_epochs} epochs"
    if progress.get("stopped_early") and early_stopping > 0:
        return "ended by early stopping"
    return None


def newest_fold_series(save_path: Path) -> str | None:
    """The base name of the newest cross-validation series under ``save_path`` (runs named
    ``<base>-fold<i>`` with a ``last.pt``), or None."""
    candidates = sorted(save_path.glob("*-fold*/last.pt"), key=lambda p: p.stat().st_mtime)
    names = [match.group(1) for path in candidates if (match := re.fullmatch(r"(.+)-fold\d+", path.parent.name))]
    return names[-1] if names else None


def find_best_checkpoint(save_path: Path) -> Path:
    """The newest ``best.pt`` under ``save_path/<run>/``."""
    candidates = sorted(save_path.glob("*/best.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UserError(
            f"no checkpoint found: looked for {save_path}/*/best.pt; "
            "train first (python training.py) or pass --checkpoint PATH"
        )
    return candidates[-1]


def training_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler,
    settings: dict,
    progress: dict,
    device: torch.device,
    ema_model: torch.nn.Module | None = None,
) -> dict:
    """What a checkpoint holds: every state a resumed run needs to continue exactly (``restore``), and the
    run's ``settings`` as plain data (``Config.to_dict``), from which test.py rebuilds the model.
    ``model`` holds the weights to predict with: the moving average under ``train.ema``, when the
    optimizer's own weights go to ``training_model``."""
    rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
    return {
        "model": (model if ema_model is None else ema_model).state_dict(),
        **({"training_model": model.state_dict()} if ema_model is not None else {}),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "config": settings,
        "progress": dict(progress),
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
) -> dict:
    """Load a checkpoint's model (and moving average), optimizer, scheduler, loss scaler and random
    states; returns its progress. A run that turns ``train.ema`` on starts its average from the weights."""
    model.load_state_dict(checkpoint.get("training_model", checkpoint["model"]))
    if ema_model is not None:
        ema_model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if device.type == "cuda" and checkpoint["rng"].get("cuda"):
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    return checkpoint["progress"]


def load_model(
    checkpoint: Path | None, config_path: Path | None, overrides: list[str]
) -> tuple[UNet, Config, dict, torch.device]:
    """``(model in eval mode on its device, config, checkpoint contents, device)`` for a checkpoint
    (default: the newest ``best.pt`` under ``train.save_path``) and the config stored in it, or the one
    at ``config_path``, with ``section.key=value`` overrides; the architecture must match."""
    if checkpoint is None:
        checkpoint = find_best_checkpoint(Path(load_config(config_path or DEFAULT_CONFIG, overrides).train.save_path))
    state = read_checkpoint(checkpoint)
    notices: list[str] = []
    config = (
        load_config(config_path, overrides, notices)
        if config_path
        else resolve(merge_overrides(state["config"], overrides), notices)
    )
    for message in notices:
        note(message)
    check_architecture(state, config.unet, checkpoint)
    device = resolve_device(config.train.device)
    model = build_model(config.unet, stored_boundary_class(state["config"])).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    state["path"] = checkpoint
    return model, config, state, device


def decision_threshold(predict: PredictSettings, state: dict) -> float:
    """``predict.threshold``: a number as given, or for ``auto`` the one calibrated after training and
    stored in the checkpoint (0.5 with a notice when there is none)."""
    threshold = predict.threshold
    if threshold != "auto":
        return threshold
    if "threshold" not in state:
        note(
            f"predict.threshold=auto but {state['path']} holds no calibrated threshold "
            "(it is stored at the end of training): using 0.5"
        )
    return state.get("threshold", 0.5)


def decided_object_rules(predict: PredictSettings, state: dict) -> ObjectRules:
    """``predict.min_object_size`` and ``predict.fill_holes`` for a checkpoint's predictor, ``auto`` decided
    by what its run recorded of the training objects (checkpoints from before that record clean nothing)."""
    record = state.get("objects", {"instance_data": False, "learnt_size": 0})
    return object_rules(predict.min_object_size, predict.fill_holes, **record)
