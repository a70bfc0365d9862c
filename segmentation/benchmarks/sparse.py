"""The sparse-labels experiment: scribbles and partial masks (``train.ignore_value``) against dense masks, same epochs.

``bench.py --sparse-experiment isbi=EPOCHS,pennfudan=EPOCHS --data ISBI_FOLDER --pennfudan PF_FOLDER``
writes each data set twice as a user's folder of images and masks: once with the dense masks, once with
the sparse masks generated from them here, and trains the data set's recipe (``configs/isbi2012_cpu.yaml``,
``configs/pennfudan_cpu.yaml``) on each, per fold (ISBI: contiguous folds) or per seed (Penn-Fudan: its
fixed test images), the sparse runs with ``train.ignore_value: 128`` and everything else the same. Every
model is scored as ``python test.py`` scores it, on its held-out images against the DENSE masks.

- ISBI 2012 scribbles (``isbi_scribbles``): strokes 3 px wide along the medial axes of the cells (inset
  from their membranes) and along the membranes' centre lines, kept in random 24 px pieces until about
  ``SCRIBBLE_FRACTION`` of the pixels are annotated, half cells, half membranes; 255 cell, 0 membrane,
  128 not annotated.
- Penn-Fudan partial masks (``partial_people``): of each person the part inside a random box over half
  its height (eroded 2 px from its outline), and random boxes of background away from the people; 255
  person, 0 background, 128 not annotated.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
from scipy import ndimage
from skimage import measure, morphology

from segmentation.benchmarks.fine_tune import run, test_scores
from segmentation.benchmarks.speed import ROOT

UNLABELLED = 128  # the mask value of pixels nobody annotated in the sparse folders
SCRIBBLE_FRACTION = 0.05  # of the pixels of an ISBI slice annotated by the scribbles
PIECE = 24  # px: scribbles are kept or dropped in square pieces of this side
ISBI_FOLDS = 5  # contiguous folds of 6 slices
SPARSE_SETS = ("isbi", "pennfudan")
ROW = "{:>10} {:>7} {:>5} {:>10} {:>12} {:>7} {:>11} {:>10} {:>8}"


def strokes(region: np.ndarray, inset: int) -> np.ndarray:
    """(H, W) bool: a stroke 3 px wide along the medial axis of ``region`` (bool), ``inset`` px from its edges."""
    core = ndimage.binary_erosion(region, morphology.disk(inset)) if inset else region
    return ndimage.binary_dilation(morphology.skeletonize(core), morphology.disk(1)) & region


def kept_pieces(mask: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """``mask`` (H, W bool) in square pieces of ``PIECE`` px, each kept with probability ``share``."""
    height, width = mask.shape
    keep = rng.random((-(-height // PIECE), -(-width // PIECE))) < share
    return mask & np.kron(keep, np.ones((PIECE, PIECE), bool))[:height, :width]


def isbi_scribbles(label: np.ndarray, rng: np.random.Generator, fraction: float = SCRIBBLE_FRACTION) -> np.ndarray:
    """(H, W) uint8 scribbles of a dense ISBI label (> 0 cell interior, 0 membrane): 255 on strokes inside the
    cells, 0 on strokes along the membranes, ``UNLABELLED`` elsewhere; about ``fraction`` of the pixels
    annotated, half of them cells and half membranes (as an annotator traces both)."""
    cells = label > 0
    scribbles = np.full(label.shape, UNLABELLED, dtype=np.uint8)
    for region, inset, value in ((cells, 4, 255), (~cells, 0, 0)):
        candidates = strokes(region, inset)
        share = min(1.0, fraction / 2 / max(candidates.mean(), 1e-9))
        scribbles[kept_pieces(candidates, share, rng)] = value
    return scribbles


def partial_people(ids: np.ndarray, rng: np.random.Generator, background_share: float = 0.25) -> np.ndarray:
    """(H, W) uint8 partial mask of Penn-Fudan person ids (0 background, k > 0 person k): of each person the
    pixels inside a random box over half its height (2 px inside its outline), of the background random boxes
    (each a quarter of the image's side) away from the people, about ``background_share`` of it;
    255 person, 0 background, ``UNLABELLED`` elsewhere."""
    partial = np.full(ids.shape, UNLABELLED, dtype=np.uint8)
    height, width = ids.shape
    for person in measure.regionprops(ids):
        top, left, bottom, right = person.bbox
        half = max(1, (bottom - top) // 2)
        start = int(rng.integers(top, bottom - half + 1))
        inside = ndimage.binary_erosion(ids == person.label, iterations=2)
        inside[:start] = False
        inside[start + half :] = False
        partial[inside] = 255
    away = ~ndimage.binary_dilation(ids > 0, iterations=8)
    side = (max(1, height // 4), max(1, width // 4))
    while (partial == 0).sum() < background_share * away.sum():
        top, left = int(rng.integers(0, height - side[0] + 1)), int(rng.integers(0, width - side[1] + 1))
        box = np.zeros(ids.shape, bool)
        box[top : top + side[0], left : left + side[1]] = True
        partial[box & away] = 0
    return partial


def annotated_fraction(mask: np.ndarray) -> float:
    return float(np.mean(mask != UNLABELLED))


def write_folders(name: str, data: Path, root: Path, rng: np.random.Generator) -> tuple[Path, list[str], float]:
    """``root/dense`` and ``root/sparse`` (images/ + masks/, the same file names) of data set ``name``; returns
    the recipe config, the split overrides and the annotated fraction of the sparse masks."""
    fractions = []
    if name == "isbi":
        images, labels = tifffile.imread(data / "train-volume.tif"), tifffile.imread(data / "train-labels.tif")
        pairs = [(f"slice{index:02d}", images[index], labels[index]) for index in range(len(images))]
        make_sparse, config = isbi_scribbles, ROOT / "configs" / "isbi2012_cpu.yaml"
        split = [f"train.folds={ISBI_FOLDS}", "train.val_images=null", "train.test_images=null"]
    else:
        paths = sorted((data / "PNGImages").glob("*.png"))
        masks = [skimage.io.imread(data / "PedMasks" / f"{path.stem}_mask.png") for path in paths]
        pairs = [(path.stem, skimage.io.imread(path), mask) for path, mask in zip(paths, masks)]
        make_sparse, config, split = partial_people, ROOT / "configs" / "pennfudan_cpu.yaml", []
    for kind in ("dense", "sparse"):
        (root / kind / "images").mkdir(parents=True)
        (root / kind / "masks").mkdir()
    for stem, image, mask in pairs:
        sparse = make_sparse(mask, rng)
        fractions.append(annotated_fraction(sparse))
        for kind, written in (("dense", ((mask > 0) * 255).astype(np.uint8)), ("sparse", sparse)):
            skimage.io.imsave(root / kind / "images" / f"{stem}.png", image, check_contrast=False)
            skimage.io.imsave(root / kind / "masks" / f"{stem}.png", written, check_contrast=False)
    return config, split, float(np.mean(fractions))


def sparse_experiment(
    sets: dict[str, int],
    seeds: list[int],
    isbi: Path | None = None,
    pennfudan: Path | None = None,
    folds: list[int] | None = None,
) -> None:
    """Train and score dense against sparse masks for each data set of ``sets`` (name -> epochs): ISBI per
    fold of ``folds`` (default all ``ISBI_FOLDS``; seed ``seeds[0]``), Penn-Fudan per seed; prints a row per
    run and the means."""
    root = Path(tempfile.mkdtemp(prefix="unet-bench-sparse-"))
    print(ROW.format("data", "masks", "run", "annotated", "pixel error", "Dice", "Rand error", "object F1", "minutes"))
    try:
        for name, epochs in sets.items():
            data = {"isbi": isbi, "pennfudan": pennfudan}[name]
            config, split, fraction = write_folders(name, data, root / name, np.random.default_rng(0))
            # ISBI: each contiguous fold (training.py names its run <name>-fold<k>); Penn-Fudan: each seed
            runs = [(f"fold{fold}", [f"train.fold={fold}"], seeds[0]) for fold in folds or range(ISBI_FOLDS)]
            if name != "isbi":
                runs = [(f"seed{seed}", [], seed) for seed in seeds]
            for kind in ("dense", "sparse"):
                rows = []
                annotated = fraction if kind == "sparse" else 1.0
                extra = [f"train.ignore_value={UNLABELLED}"] if kind == "sparse" else []
                for label, overrides, seed in runs:
                    folder, settings = root / name, [*split, *overrides, *extra]
                    scores, minutes = train_and_score(folder, kind, label, config, settings, seed, epochs)
                    rows.append(scores)
                    print(result_row(name, kind, label, annotated, scores, f"{minutes:.1f}"), flush=True)
                print(result_row(name, kind, "mean", annotated, list(np.mean(rows, axis=0)), ""), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def result_row(name: str, kind: str, label: str, annotated: float, scores: list[float], minutes: str) -> str:
    """A table row: pixel error, Dice, Rand error and object F1 of test.py's scores."""
    return ROW.format(name, kind, label, f"{annotated:.3f}", *(f"{scores[i]:.4f}" for i in (0, 1, 3, 5)), minutes)


def train_and_score(
    folder: Path, kind: str, label: str, config: Path, overrides: list[str], seed: int, epochs: int
) -> tuple[list[float], float]:
    """Train the recipe on ``folder/kind``; returns test.py's scores of its held-out images against the dense
    masks (pixel error, Dice, IoU, Rand error, VI, object F1) and the minutes of training."""
    folds = label.startswith("fold")
    name = kind if folds else f"{kind}-{label}"  # training.py adds -fold<k> under train.folds
    folders = [
        f"train.cache_dir={folder / 'cache'}",
        f"train.save_path={folder / 'weights'}",
        f"train.log_path={folder / 'logs'}",
    ]
    settings = ["train.dataset_name=folder", f"train.data={folder / kind}", f"train.run_name={name}"]
    settings += [f"train.seed={seed}", f"train.max_epochs={epochs}", *folders, *overrides]
    start = time.perf_counter()
    run("training.py", "--config", str(config), *settings)
    minutes = (time.perf_counter() - start) / 60
    checkpoint = folder / "weights" / (f"{name}-{label}" if folds else name) / "best.pt"
    scores = test_scores(checkpoint, folder / "scores" / name, f"train.data={folder / 'dense'}", *folders)
    return scores, minutes
