"""The fine-tuning experiment: a few labelled ISBI 2012 slices trained from a synthetic-EM model and from scratch.

``bench.py --fine-tune-experiment EPOCHS --data ISBI_FOLDER`` writes 3 training slices (0-2), 1 validation
slice (3) and the 6 test slices (24-29) of the ISBI 2012 stacks as a user's folder of images and masks,
trains the shipped config on it per seed once from scratch and once from ``train.init_from`` (a model of
the shipped config on the synthetic images, trained first unless ``--source`` names one), and prints the
test slices' scores as ``python test.py`` computes them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.io
import tifffile

from segmentation.benchmarks.speed import ROOT

TRAIN_SLICES, VAL_SLICES, TEST_SLICES = (0, 1, 2), (3,), (24, 25, 26, 27, 28, 29)
ROW = "{:>10} {:>5} {:>12} {:>7} {:>11} {:>10} {:>8}"  # start, seed, pixel error, Dice, Rand error, object F1, min


def write_slices(isbi: Path, folder: Path) -> None:
    """The experiment's slices of ``isbi/train-volume.tif`` and ``train-labels.tif`` as PNG files, in the
    order train, validation, test (so the folder's image indices are 0-2, 3 and 4-9)."""
    images, labels = tifffile.imread(isbi / "train-volume.tif"), tifffile.imread(isbi / "train-labels.tif")
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    for position, index in enumerate(TRAIN_SLICES + VAL_SLICES + TEST_SLICES):
        skimage.io.imsave(
            folder / "images" / f"{position:02d}-slice{index:02d}.png", images[index], check_contrast=False
        )
        skimage.io.imsave(
            folder / "masks" / f"{position:02d}-slice{index:02d}.png", labels[index], check_contrast=False
        )


def run(script: str, *arguments: str) -> str:
    """``python script arguments`` in the repository; its standard output (a failure stops the experiment)."""
    done = subprocess.run([sys.executable, str(ROOT / script), *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(arguments)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def test_scores(checkpoint: Path, output: Path, *overrides: str) -> list[float]:
    """Pixel error, Dice, IoU, Rand error, VI and object F1 of ``python test.py`` on the checkpoint's test images
    (``section.key=value`` overrides on top of its config)."""
    table = run("test.py", "--checkpoint", str(checkpoint), "--output", str(output), *overrides)
    return [
        float(value) for value in next(line for line in table.splitlines() if line.split()[:1] == ["all"]).split()[1:]
    ]


def fine_tune_experiment(isbi: Path, epochs: int, seeds: list[int], source: Path | None = None) -> None:
    """Print, per seed and start (scratch, ``train.init_from``), the test slices' scores and the minutes."""
    root = Path(tempfile.mkdtemp(prefix="unet-bench-fine-tune-"))
    folders = [
        f"train.cache_dir={root / 'cache'}",
        f"train.save_path={root / 'weights'}",
        f"train.log_path={root / 'logs'}",
    ]
    try:
        write_slices(isbi, root / "isbi")
        if source is None:
            start = time.perf_counter()
            run("training.py", *folders, "train.run_name=source")
            source = root / "weights" / "source" / "best.pt"
            print(f"\nsource: the shipped config on its synthetic images, {(time.perf_counter() - start) / 60:.1f} min")
        print(
            f"\nfine-tuning: ISBI 2012 slices {TRAIN_SLICES} to train, {VAL_SLICES} to validate, {TEST_SLICES} to "
            f"test; the shipped config (16 tiles per slice and epoch), {epochs} epochs; from scratch and from {source}"
        )
        print(ROW.format("start", "seed", "pixel error", "Dice", "Rand error", "object F1", "minutes"))
        results: dict[str, list] = {"scratch": [], "init_from": []}
        for seed in seeds:
            for start_from in results:
                name = f"{start_from}-{seed}"
                overrides = [
                    *folders,
                    "train.dataset_name=folder",
                    f"train.data={root / 'isbi'}",
                    "train.val_images=[3]",
                    "train.test_images=[4, 5, 6, 7, 8, 9]",
                    "train.samples_per_image=16",
                    f"train.max_epochs={epochs}",
                    f"train.seed={seed}",
                    f"train.run_name={name}",
                    *([f"train.init_from={source}"] if start_from == "init_from" else []),
                ]
                start = time.perf_counter()
                run("training.py", *overrides)
                minutes = (time.perf_counter() - start) / 60
                scores = test_scores(root / "weights" / name / "best.pt", root / "scores" / name)
                results[start_from].append(scores)
                print(ROW.format(start_from, seed, *(f"{scores[i]:.4f}" for i in (0, 1, 3, 5)), f"{minutes:.1f}"))
        for start_from, rows in results.items():
            mean = np.mean(rows, axis=0)
            print(ROW.format(start_from, "mean", *(f"{mean[i]:.4f}" for i in (0, 1, 3, 5)), ""))
    finally:
        shutil.rmtree(root, ignore_errors=True)
