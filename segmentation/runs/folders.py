"""Run folders and what is logged in them: names that never overwrite, the settings and metrics.csv.

Each run writes to ``log_path/<run>/`` (its resolved config, ``metrics.csv`` and the figures of
``segmentation.runs.figures``) and to ``save_path/<run>/`` (checkpoints). A new run's name is claimed by
creating its folders, so that two runs started at the same moment never share one. Files are replaced
atomically (``segmentation.files``), so a run killed while writing, or a full disk, leaves the previous
version whole.
"""

from __future__ import annotations

import csv
import io
import itertools
from datetime import datetime
from pathlib import Path

from segmentation.console import note
from segmentation.files import write_text_atomically
from segmentation.settings import RunSettings

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


def run_base_name(run: RunSettings, label: str) -> str:
    """``train.run_name``, or the date, time and ``label`` (the data set, or the check that runs)."""
    return run.run_name or f"{datetime.now():%Y-%m-%d_%H%M%S}-{label}"


def new_run_name(run: RunSettings, label: str, fold: int | None = None, weights: bool = True) -> str:
    """``run_base_name``, then ``-fold<i>`` under cross-validation (``fold``); suffixed -2, -3 ... so that no
    earlier run is overwritten. The name is claimed: its log folder and, for a training run (``weights``),
    its checkpoint folder are created here, each by a ``mkdir`` that fails where the folder exists, so
    that two runs started at the same moment with the same name never share a folder."""
    base = run_base_name(run, label) + (f"-fold{fold}" if fold is not None else "")
    roots = [Path(run.log_path), *([Path(run.save_path)] if weights else [])]
    for count in itertools.count(1):
        name = base if count == 1 else f"{base}-{count}"
        if claimed(roots, name):
            break
    if run.run_name and name != base:
        note(f"run folder {base} exists already: writing to {name}")
    return name


def claimed(roots: list[Path], name: str) -> bool:
    """Whether this process created ``root/name`` under each of ``roots``: none existed (a folder created
    before another process's is removed again, empty, and the name left to that process)."""
    if any((root / name).exists() for root in roots):
        return False
    made: list[Path] = []
    for root in roots:
        root.mkdir(parents=True, exist_ok=True)
        try:
            (root / name).mkdir()
        except FileExistsError:  # another process claimed the name between the look and the mkdir
            for folder in made:
                folder.rmdir()
            return False
        made.append(root / name)
    return True


def new_run_folder(run: RunSettings, mode: str, config_text: str, fold: int | None = None) -> Path:
    """A new folder ``train.log_path/<date>_<time>-<mode>`` (or ``train.run_name``) holding ``config_text``
    (the run's settings as YAML) as ``config.yaml``."""
    folder = Path(run.log_path) / new_run_name(run, mode, fold, weights=False)
    write_text_atomically(folder / "config.yaml", config_text, "train.log_path")
    return folder


def start_run_folders(run_log: Path, run_weights: Path, config_text: str, resumed_epoch: int | None) -> None:
    """Create a training run's folders (a new run's exist already: ``new_run_name`` claimed them) and write its
    settings (``config_text``, YAML) to ``config.yaml``, or for a run resumed after ``resumed_epoch`` epochs
    to ``config-resumed-epoch<N>.yaml``."""
    run_log.mkdir(parents=True, exist_ok=True)
    run_weights.mkdir(parents=True, exist_ok=True)
    name = "config.yaml" if resumed_epoch is None else f"config-resumed-epoch{resumed_epoch}.yaml"
    write_text_atomically(run_log / name, config_text, "train.log_path")


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
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=[*CSV_COLUMNS, *per_class_columns(rows)], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, text.getvalue(), "train.log_path")


def epoch_line(row: dict, max_epochs: int) -> str:
    """The line printed after each epoch: training loss, the main validation scores, seconds."""
    keys = ("val_loss", "val_pixel_error", "val_dice", "val_rand_error")
    scores = "".join(f"  {key} {row[key]:.4f}" for key in keys if key in row)
    return (
        f"epoch {row['epoch']}/{max_epochs}  train_loss {row['train_loss']:.4f}{scores}  {row['epoch_seconds']:.1f} s"
    )
