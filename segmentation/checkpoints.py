"""Checkpoint files: written atomically, read back as data (never code), and the progress record they hold.

A checkpoint (``weights/<run>/last.pt`` or ``best.pt``) holds the model, optimizer, scheduler and loss
scaler states, the resolved config (``Config.to_dict``), the run's plan (``plan.Plan.to_dict``), its
``Progress`` and the random states, so that a run resumes exactly (``engine.resume``) and test.py
rebuilds model and predictor from it alone (``inference.trained``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from segmentation.config import UserError, architecture_differences, stored_boundary_class
from segmentation.console import first_line
from segmentation.files import write_atomically
from segmentation.plan import Plan
from segmentation.settings import UNetSettings


@dataclass
class Progress:
    """Where a run stands: ``epoch`` epochs done, ``batch`` steps into the next, ``step`` steps in all,
    ``best_value`` of ``train.best_metric`` so far (None before the first validation) at ``best_epoch``
    (-1: none yet), ``loss_sum`` the summed training loss of the epoch so far, ``run_name`` its folder,
    ``stopped_early`` whether early stopping ended it, ``seconds`` the wall time its sessions have used and
    ``planned_epochs`` the epochs a time budget (``train.max_minutes``) planned last (0: none). Checkpoints
    store it as plain data (``to_dict``)."""

    run_name: str
    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_value: float | None = None
    best_epoch: int = -1
    loss_sum: float = 0.0
    stopped_early: bool = False
    seconds: float = 0.0
    planned_epochs: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> Progress:
        """The progress stored in a checkpoint (older ones lack some keys, which take their defaults); a
        UserError naming ``where`` for one that is not a progress record."""
        names = {item.name for item in dataclasses.fields(cls)}
        if not isinstance(data, dict) or not isinstance(data.get("epoch"), int):
            raise UserError(f"{where}: its progress record is not one this project writes (edited?)")
        values = {key: value for key, value in data.items() if key in names}
        values.setdefault("run_name", Path(os.path.abspath(where)).parent.name)
        if not is_folder_name(values["run_name"]):
            raise UserError(
                f"{where}: its progress names the run {values['run_name']!r}, which is not one folder name (edited?): "
                "a run's folders are named by train.save_path and train.log_path; use a checkpoint as training.py "
                "wrote it"
            )
        return cls(**values)


def read_progress(path: Path) -> Progress:
    """The progress of the checkpoint at ``path`` (``read_checkpoint``'s checks apply)."""
    return Progress.from_dict(read_checkpoint(path)["progress"], path)


def is_folder_name(name: object) -> bool:
    """Whether ``name`` is one folder name: a non-empty string without a path separator, ``.`` or ``..``, or a
    drive, so that ``save_path / name`` stays inside ``save_path``."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name:
        return False
    return "/" not in name and "\\" not in name and not Path(name).drive  # both separators, on every system


def save_checkpoint(path: Path, state: dict) -> None:
    """Write with torch.save to a temporary file, then rename (``files.write_atomically``): a crash or a full
    disk never leaves half a checkpoint, and the earlier checkpoint stays as it was."""

    def write(temporary: Path) -> None:
        # through a file object: a failed write then carries its OSError (the disk full, the size limit)
        with open(temporary, "wb") as file:
            torch.save(state, file)

    kept = "the earlier checkpoints are intact"
    write_atomically(path, write, tensor_bytes(state), "train.save_path", "a checkpoint", kept)


def tensor_bytes(value: object) -> int:
    """The bytes of the tensors in ``value`` (nested dicts, lists and tuples), about what torch.save writes."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


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


def check_weights(state: dict, path: Path) -> None:
    """A UserError when the weights of a checkpoint (the model, and the optimizer's own weights under
    ``train.ema``) hold NaN or infinite values: a run that diverged, or an edited file."""
    parts = [part for part in (state.get("training_model"), state["model"]) if isinstance(part, dict)]
    broken = list(
        dict.fromkeys(  # a name once, in the order of the network, where both the model and the average have it
            name
            for part in parts
            for name, tensor in part.items()
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()
        )
    )
    if broken:
        raise UserError(
            f"{path}: its weights hold NaN or infinite values ({len(broken)} tensors, e.g. {broken[0]}): "
            "use an earlier checkpoint"
        )


def load_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """``model.load_state_dict(weights)``, with a UserError of one line (instead of PyTorch's list) where the
    checkpoint's tensors do not fit the network that its config and plan describe: an edited file."""
    if not isinstance(weights, dict):
        raise UserError(f"{path}: its weights are not a state dict (edited?): use a checkpoint as training.py wrote it")
    own = model.state_dict()
    missing = [name for name in own if name not in weights]
    unexpected = [name for name in weights if name not in own]
    shapes = [
        f"{name}: {tuple(weights[name].shape)} in the file, {tuple(tensor.shape)} in the network"
        for name, tensor in own.items()
        if name in weights and (not isinstance(weights[name], torch.Tensor) or weights[name].shape != tensor.shape)
    ]
    problems = [
        f"{len(items)} {what}, e.g. {items[0]}"
        for items, what in ((shapes, "of another shape"), (missing, "missing"), (unexpected, "unknown"))
        if items
    ]
    if problems:
        raise UserError(
            f"{path}: its weights do not fit the network its config and plan describe (tensors {'; '.join(problems)}; "
            "edited?): use a checkpoint as training.py wrote it"
        )
    model.load_state_dict(weights)


def check_architecture(state: dict, unet: UNetSettings, path: Path) -> None:
    """Raise a UserError naming the ``unet.*`` keys where the checkpoint and ``unet`` disagree."""
    differences = architecture_differences(state["config"], unet, stored_boundary(state, path))
    if differences:
        raise UserError(
            f"{path} holds another architecture ({'; '.join(differences)}): set these keys as in the checkpoint, "
            "or start a new run"
        )


def stored_boundary(state: dict, path: Path) -> bool:
    """Whether a checkpoint's network has the boundary class, as its plan (or, from before plans, its stored
    config) says."""
    if "plan" in state:
        return Plan.from_dict(state["plan"], str(path)).boundary_class
    return stored_boundary_class(state["config"])


def find_best_checkpoint(save_path: Path) -> Path:
    """The newest ``best.pt`` under ``save_path/<run>/``."""
    candidates = sorted(save_path.glob("*/best.pt"), key=lambda path: path.stat().st_mtime)
    if not candidates:
        raise UserError(
            f"no checkpoint found: looked for {save_path}/*/best.pt; "
            "train first (python training.py) or pass --checkpoint PATH"
        )
    return candidates[-1]
