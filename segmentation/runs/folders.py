"""Run folders and what is logged in them: names that never overwrite, the config, metrics.csv, curves.png and check figures.

Each run writes to ``log_path/<run>/`` (its resolved config, ``metrics.csv``, ``curves.png`` and
figures of a weight map and of augmented tiles) and to ``save_path/<run>/`` (checkpoints). Files are
replaced atomically, so a run killed while writing leaves the previous version whole.
"""

from __future__ import annotations

import csv
import os
from datetime import datetime
from pathlib import Path

import torch

from segmentation.config import config_to_yaml
from segmentation.console import note
from segmentation.data.augment import augment_on_device, save_samples_figure

CSV_COLUMNS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "val_pixel_error",
    "val_dice",
    "val_iou",
    "val_rand_error",
    "val_vi",
    "epoch_seconds",
    "images_per_second",
)


def run_base_name(train: dict, label: str | None = None) -> str:
    """``train.run_name``, or the date, time and ``label`` (default: the data set)."""
    return train["run_name"] or f"{datetime.now():%Y-%m-%d_%H%M%S}-{label or train['dataset_name']}"


def new_run_name(train: dict, label: str | None = None) -> str:
    """``run_base_name``, then ``-fold<i>`` under cross-validation; suffixed -2, -3 ... so that no earlier
    run is overwritten."""
    base = run_base_name(train, label) + (f"-fold{train['fold']}" if train["folds"] else "")
    name, count = base, 1
    while (Path(train["log_path"]) / name).exists() or (Path(train["save_path"]) / name).exists():
        count += 1
        name = f"{base}-{count}"
    if train["run_name"] and name != base:
        note(f"run folder {base} exists already: writing to {name}")
    return name


def new_run_folder(config: dict, mode: str) -> Path:
    """A new folder ``train.log_path/<date>_<time>-<mode>`` (or ``train.run_name``) with the config in it."""
    folder = Path(config["train"]["log_path"]) / new_run_name(config["train"], mode)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config_to_yaml(config))
    return folder


def start_run_folders(
    config: dict, run_log: Path, run_weights: Path, progress: dict, data: dict, device: torch.device, resumed: bool
) -> None:
    """Create the run's folders and write its resolved config; a new run also gets the figures of a
    weight map and of augmented tiles, to check by eye before trusting the training."""
    run_log.mkdir(parents=True, exist_ok=True)
    run_weights.mkdir(parents=True, exist_ok=True)
    config_file = run_log / (f"config-resumed-epoch{progress['epoch']}.yaml" if resumed else "config.yaml")
    config_file.write_text(config_to_yaml(config))
    if resumed:
        return
    save_samples_figure(
        run_log / "weight_map.png",
        *(torch.from_numpy(array)[None] for array in data["example"]),
        title="first training image and its weight map",
    )
    train_set = data["train"]
    examples = [torch.stack(tensors) for tensors in zip(*(train_set[i] for i in range(min(4, len(train_set)))))]
    augmented = augment_on_device(examples, config["augment"], config["train"]["seed"], -1, device)
    save_samples_figure(
        run_log / "augmented_samples.png",
        *augmented,
        title="augmented training tiles (the loss uses the centre of label and weight)",
    )


def read_metrics(path: Path, completed_epochs: int) -> list[dict]:
    """The rows of a resumed run's first ``completed_epochs`` epochs (later ones are trained again)."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [row for row in csv.DictReader(file) if int(row["epoch"]) <= completed_epochs]


def per_class_columns(rows: list[dict]) -> list[str]:
    """The ``val_dice_<c>`` columns of rows of more than two classes (none for two)."""
    return sorted({key for row in rows for key in row if key.startswith("val_dice_")})


def write_metrics(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts keyed by ``CSV_COLUMNS``) to ``metrics.csv`` through a temporary file and a rename."""
    temporary = path.with_name(path.name + ".tmp")
    with temporary.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*CSV_COLUMNS, *per_class_columns(rows)], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(temporary, path)


def plot_curves(rows: list[dict], path: Path) -> None:
    """Training and validation curves by epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        points = [(int(row["epoch"]), float(row[key])) for row in rows if row.get(key) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    figure, (loss_axis, score_axis, vi_axis) = plt.subplots(1, 3, figsize=(16, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        loss_axis.plot(*series(key), marker=".", label=label)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axis.set_yscale("log")
    per_class = per_class_columns(rows)
    for key, label in (
        ("val_dice", "Dice (foreground)"),
        ("val_iou", "IoU (foreground)"),
        ("val_pixel_error", "pixel error"),
        ("val_rand_error", "Rand error (cells)"),
        *((key, f"Dice of class {key[9:]}") for key in per_class),
    ):
        score_axis.plot(*series(key), marker=".", label=label)
    score_axis.set(xlabel="epoch", ylim=(0, 1), title="validation")
    vi_axis.plot(*series("val_vi"), marker=".", label="variation of information (cells)")
    vi_axis.set(xlabel="epoch", ylabel="bits", title="validation: variation of information")
    for axis in (loss_axis, score_axis, vi_axis):
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    temporary = path.with_name(path.stem + ".tmp.png")
    figure.savefig(temporary, dpi=100)
    plt.close(figure)
    os.replace(temporary, path)
