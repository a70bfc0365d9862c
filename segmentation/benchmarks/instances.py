"""The instance experiment: masks of object ids against the same masks as 0/255, scored by matched objects.

``bench.py --instance-experiment`` writes each data set twice as a user's folder of images and masks,
once with one id per object and once with the ids turned into 0/255, and trains per seed

- ``0/255``: the 0/255 masks (``train.mask_type: classes``; objects are the connected components);
- ``ids``: the id masks with two classes (``unet.boundary_class: false``);
- ``ids + border``: the id masks with the object border as a third class (``unet.boundary_class: true``).

Each model is scored on its held-out images against the true ids, as trained (for the id masks:
``predict.min_object_size`` and ``fill_holes`` as ``auto`` decides them) and, for the id masks, also
without that post-processing (``raw``): stardist's matching fields at IoU 0.5 summed over the images
(F1, accuracy, mean matched IoU, panoptic quality), the foreground Dice and the pixel error.

Data sets: ``nuclei``, 40 generated images of clumped nuclei (``synthetic.clumped_nuclei``, 256 px:
28 train, 4 validate, 8 test) with the shipped config; ``isbi``, the 30 ISBI 2012 slices with the ids
the connected components of the cell class (``configs/isbi2012_cpu.yaml``'s split and settings);
``pennfudan``, Penn-Fudan's photos with their pedestrian ids (``configs/pennfudan_cpu.yaml``'s split
and settings). Each run is ``python training.py`` in a subprocess, scored in a fresh process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from segmentation.benchmarks.speed import ROOT, in_child

DEFAULTS = ["predict.min_object_size=auto", "predict.fill_holes=auto"]  # the recipes pin both off
VARIANTS = {
    "0/255": ("binary", ["train.mask_type=classes", *DEFAULTS]),
    "ids": ("ids", ["train.mask_type=instances", "unet.boundary_class=false", *DEFAULTS]),
    "ids + border": ("ids", ["train.mask_type=instances", "unet.boundary_class=true", *DEFAULTS]),
}
RAW = ["predict.min_object_size=0", "predict.fill_holes=false"]  # the id models scored without post-processing
FIELDS = ("f1", "accuracy", "mean_matched_score", "panoptic_quality", "dice", "pixel_error")
ROW = "{:>10} {:>13} {:>7} {:>5} {:>7} {:>9} {:>11} {:>7} {:>7} {:>9} {:>10} {:>7} {:>7}"


def instance_experiment(
    sets: dict[str, int], seeds: list[int], isbi: Path | None = None, pennfudan: Path | None = None
) -> None:
    """Train and score every variant of each data set in ``sets`` (name -> epochs) for each seed; prints a
    row per run and scoring, then the means over the seeds."""
    root = Path(tempfile.mkdtemp(prefix="unet-bench-instances-"))
    try:
        print(
            ROW.format(
                "data",
                "masks",
                "scored",
                "seed",
                "F1",
                "accuracy",
                "matched IoU",
                "PQ",
                "Dice",
                "pixel err",
                "objects",
                "post s/Mpx",
                "minutes",
            )
        )
        means = []
        for name, epochs in sets.items():
            folder = root / name
            config, truth, split = write_data_set(name, folder, isbi, pennfudan)
            for variant, (kind, overrides) in VARIANTS.items():
                results = {"as trained": [], "raw": []}
                for seed in seeds:
                    run = f"{name}-{variant.replace(' + ', '-').replace('/', '-')}-{seed}"
                    minutes = train_run(folder, kind, run, config, [*overrides, *split], seed, epochs)
                    checkpoint = folder / "weights" / run / "best.pt"
                    for scoring in ("as trained", "raw") if kind == "ids" else ("as trained",):
                        scores = in_child(score_run, checkpoint, truth, RAW if scoring == "raw" else [])
                        results[scoring].append(scores)
                        print(row(name, variant, scoring, seed, scores, minutes), flush=True)
                for scoring, runs in results.items():
                    if runs:
                        mean = {key: float(np.mean([scores[key] for scores in runs])) for key in runs[0]}
                        means.append(row(name, variant, scoring, "mean", mean, None))
        print("\nmeans over the seeds")
        print("\n".join(means))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def row(name: str, variant: str, scoring: str, seed, scores: dict, minutes: float | None) -> str:
    values = [f"{scores[key]:.4f}" for key in FIELDS]
    objects = f"{scores['predicted']:.0f}/{scores['true']:.0f}"
    return ROW.format(
        name,
        variant,
        "raw" if scoring == "raw" else "trained",
        seed,
        *values,
        objects,
        f"{scores['seconds_per_megapixel']:.3f}",
        "" if minutes is None else f"{minutes:.1f}",
    )


def write_data_set(
    name: str, folder: Path, isbi: Path | None, pennfudan: Path | None
) -> tuple[Path | None, list[np.ndarray], list[str]]:
    """``folder/ids`` and ``folder/binary`` (images/ and masks/) of data set ``name``; returns the config
    to train with (None: the shipped one), the true ids of the test images in order, and the split."""
    import skimage.io
    import tifffile
    from skimage import measure

    from segmentation.data.synthetic import clumped_nuclei

    if name == "nuclei":
        generated = [
            clumped_nuclei(256, np.random.default_rng(child)) for child in np.random.SeedSequence(11).spawn(40)
        ]
        pairs = [(f"{index:02d}", (image * 255).astype(np.uint8), ids) for index, (image, ids) in enumerate(generated)]
        config, split = None, ["train.val_images=[28, 29, 30, 31]", f"train.test_images={list(range(32, 40))}"]
        test = list(range(32, 40))
    elif name == "isbi":
        volume, labels = tifffile.imread(isbi / "train-volume.tif"), tifffile.imread(isbi / "train-labels.tif")
        pairs = [
            (f"slice{index:02d}", volume[index], measure.label(labels[index] > 0, connectivity=1))
            for index in range(len(volume))
        ]
        config, split, test = ROOT / "configs" / "isbi2012_cpu.yaml", [], [24, 25, 26, 27, 28, 29]
    elif name == "pennfudan":
        images = sorted((pennfudan / "PNGImages").glob("*.png"))
        pairs = [
            (path.stem, skimage.io.imread(path), skimage.io.imread(pennfudan / "PedMasks" / f"{path.stem}_mask.png"))
            for path in images
        ]
        config, split, test = ROOT / "configs" / "pennfudan_cpu.yaml", [], list(range(0, 170, 10))
    else:
        raise ValueError(f"unknown data set {name!r}: nuclei, isbi or pennfudan")
    for kind in ("ids", "binary"):
        (folder / kind / "images").mkdir(parents=True)
        (folder / kind / "masks").mkdir()
    for stem, image, ids in pairs:
        for kind in ("ids", "binary"):
            skimage.io.imsave(folder / kind / "images" / f"{stem}.png", image, check_contrast=False)
        tifffile.imwrite(folder / "ids" / "masks" / f"{stem}.tif", ids.astype(np.uint16), photometric="minisblack")
        binary = ((ids > 0) * 255).astype(np.uint8)
        skimage.io.imsave(folder / "binary" / "masks" / f"{stem}.png", binary, check_contrast=False)
    return config, [pairs[index][2] for index in test], split


def train_run(
    folder: Path, kind: str, run: str, config: Path | None, overrides: list[str], seed: int, epochs: int
) -> float:
    """``python training.py`` on ``folder/kind``; returns the minutes it took."""
    command = [sys.executable, str(ROOT / "training.py"), *(["--config", str(config)] if config else [])]
    settings = [
        "train.dataset_name=folder",
        f"train.data={folder / kind}",
        f"train.cache_dir={folder / 'cache'}",
        f"train.save_path={folder / 'weights'}",
        f"train.log_path={folder / 'logs'}",
        f"train.run_name={run}",
        f"train.seed={seed}",
        f"train.max_epochs={epochs}",
    ]
    start = time.perf_counter()
    subprocess.run([*command, *settings, *overrides], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (time.perf_counter() - start) / 60


def score_run(checkpoint: Path, truth: list, overrides: list[str], queue) -> None:
    """Child process: the matching fields at IoU 0.5 over the checkpoint's test images against the true ids
    ``truth`` (one array per test image, in order), the foreground Dice and pixel error, and the seconds of
    post-processing (objects from probabilities) per megapixel."""
    from segmentation.inference.trained import load_trained
    from segmentation.metrics import matching_scores, object_matching

    # the run's own cache (FOLDER/weights/RUN/best.pt beside FOLDER/cache): a checkpoint never names folders
    trained = load_trained(checkpoint, None, [f"train.cache_dir={checkpoint.parents[2] / 'cache'}", *overrides])
    test, predictor, device = trained.datasets(lambda message: None).test, trained.predictor, trained.device
    counts, overlap, total, wrong, pixels, seconds = np.zeros(4), 0, 0, 0, 0, 0.0
    for (image, _, _), ids in zip(test, truth):
        probabilities = predictor.probabilities(image.to(device))
        start = time.perf_counter()
        objects = predictor.objects(probabilities)
        seconds += time.perf_counter() - start
        counts += object_matching(ids, objects)
        found, true = objects > 0, ids > 0
        overlap, total = (
            overlap + np.count_nonzero(found & true),
            total + np.count_nonzero(found) + np.count_nonzero(true),
        )
        wrong, pixels = wrong + np.count_nonzero(found != true), pixels + ids.size
    queue.put(
        {
            **matching_scores(counts),
            "true": counts[1],
            "predicted": counts[2],
            "dice": 2 * overlap / total,
            "pixel_error": wrong / pixels,
            "seconds_per_megapixel": seconds / (pixels / 1e6),
        }
    )
