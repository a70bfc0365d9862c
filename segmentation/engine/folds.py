"""Cross-validation: every fold in turn as a run of its own, a series that resumes where it stopped.

``python training.py train.folds=K train.fold=all`` trains fold 0, 1, ..., K-1, each holding out its own
test images, as runs ``<base>-fold<i>``; ``train.resume=auto`` skips the finished folds and resumes the
interrupted one. test.py scores the series (``--checkpoint RUN-fold*/best.pt``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from segmentation.checkpoints import read_progress
from segmentation.config import Config
from segmentation.console import note
from segmentation.engine.resume import finished, newest_fold_series
from segmentation.engine.run import TrainResult
from segmentation.runs.folders import run_base_name


def train_every_fold(config: Config, train: Callable[[Config], TrainResult]) -> int:
    """``train.fold: all``: fold 0, 1, ... of ``train.folds`` in turn, each trained by ``train`` (training.py's)
    as a run named ``<base>-fold<i>``, then print the test.py command that scores them all. With ``train.resume: auto``
    the newest series (or the one ``train.run_name`` names) continues: finished folds (all epochs, or
    ended by early stopping) are skipped and an interrupted one resumes from its ``last.pt``."""
    data, run = config.data, config.run
    save_path, resume = Path(run.save_path), run.resume == "auto"
    base = run.run_name or (newest_fold_series(save_path) if resume else None) or run_base_name(run, data.dataset_name)
    best_checkpoints = []
    for fold in range(data.folds):
        fold_config = dataclasses.replace(
            config, data=dataclasses.replace(data, fold=fold), run=dataclasses.replace(run, run_name=base, resume=None)
        )
        last = save_path / f"{base}-fold{fold}" / "last.pt"
        if resume and last.is_file():
            progress = read_progress(last)
            ended = finished(progress, config.train.max_epochs, run.early_stopping, run.max_minutes)
            if ended:
                note(f"fold {fold}: {last} {ended}; skipping it")
                best_checkpoints.append(last.with_name("best.pt"))
                continue
            fold_config = dataclasses.replace(fold_config, run=dataclasses.replace(fold_config.run, resume=str(last)))
        note(f"fold {fold} of {data.folds} (0..{data.folds - 1}) held out for testing")
        result = train(fold_config)
        if result.interrupted:
            print(
                f"continue the folds with: python training.py ... train.fold=all train.run_name={base} "
                "train.resume=auto"
            )
            return 130
        best_checkpoints.append(result.folders.weights / "best.pt")
    print(f"all {data.folds} folds trained; score each on its test images, with the mean and standard deviation:")
    print("python test.py --checkpoint " + " ".join(map(str, best_checkpoints)))
    return 0
