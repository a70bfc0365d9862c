"""TensorBoard events of a run (``train.tensorboard``): the epochs' scalars, the settings as hparams, validation images.

The events go to ``log_path/<run>/tensorboard/``, beside metrics.csv and curves.png, which stay as they
are: ``tensorboard --logdir logs`` shows every run. The ``tensorboard`` package is imported only when
a run asks for it. Tags:

- ``loss/train``, ``loss/validation``, ``validation/<score>`` (pixel_error, dice, iou, rand_error, vi, and
  dice_<c> of each class with more than two), ``optimisation/lr``, ``speed/images_per_second``: one
  value per epoch, the epoch as the step;
- the run's settings as hparams (the ``section.key`` names of config.yaml), linked to the validation scores;
- ``validation/<image name>``: input, truth and prediction side by side, for the first few validation
  images at each validation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segmentation.config import UserError

SCALARS = {  # metrics.csv column -> tag
    "train_loss": "loss/train",
    "val_loss": "loss/validation",
    "lr": "optimisation/lr",
    "images_per_second": "speed/images_per_second",
}
HPARAM_METRICS = ("loss/validation", "validation/pixel_error", "validation/dice")


def require_tensorboard() -> type:
    """torch's ``SummaryWriter``, or a one-line UserError when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard: true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def open_writer(run_log: Path, completed_epochs: int):
    """A ``SummaryWriter`` into ``run_log/tensorboard`` for a run that has ``completed_epochs``: events of
    later epochs, which a killed run wrote after its last checkpoint, are hidden, so that a resumed run
    continues its log without doubles."""
    return require_tensorboard()(log_dir=str(run_log / "tensorboard"), purge_step=completed_epochs + 1)


def write_settings(writer, settings: dict) -> None:
    """The run's settings (``Config.to_dict``) as hparams, ``section.key: value``; lists and mappings as text."""
    from torch.utils.tensorboard.summary import hparams

    flat = {
        f"{section}.{key}": value if isinstance(value, (bool, int, float, str)) else str(value)
        for section, values in settings.items()
        for key, value in values.items()
        if value is not None
    }
    for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
        writer.file_writer.add_summary(summary)


def write_epoch(writer, row: dict, examples: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    """One epoch's metrics.csv ``row`` as scalars at step ``row["epoch"]``, and ``examples``: (name, image
    (C, H, W), truth (H, W), prediction (H, W)) of validation images, as one picture each."""
    epoch = int(row["epoch"])
    for key, value in row.items():
        tag = SCALARS.get(key) or (f"validation/{key.removeprefix('val_')}" if key.startswith("val_") else None)
        if tag is not None and value not in (None, ""):
            writer.add_scalar(tag, float(value), epoch)
    for name, image, truth, prediction in examples:
        writer.add_image(f"validation/{name}", side_by_side(image, truth, prediction), epoch, dataformats="HWC")
    writer.flush()


def side_by_side(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """(H, 3 W + 8, 3) uint8: the image (gray or RGB, stretched to its range), the true and the predicted
    classes (gray levels 0..255), with 4 px white gaps."""
    shown = image[0] if image.shape[0] == 1 else np.moveaxis(image[:3], 0, -1).mean(axis=-1)
    shown = (shown - shown.min()) / max(float(shown.max() - shown.min()), 1e-12)
    top = max(int(truth.max()), int(prediction.max()), 1)
    gap = np.ones((shown.shape[0], 4))
    panel = np.concatenate([shown, gap, truth / top, gap, prediction / top], axis=1)
    return np.repeat((255 * panel).astype(np.uint8)[..., None], 3, axis=-1)
