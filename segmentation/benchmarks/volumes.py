"""The volumes experiment: a 3D U-Net (``unet.dims: 3``) against the 2D one on the same stacks.

``bench.py --volume-experiment damaged=E3:E2,isbi=E3:E2,nuclei3d=E3:E2 [--data ISBI] [--nuclei3d FOLDER]
[--minutes M]`` (E3, E2: epochs of the 3D and of the 2D network; with ``--minutes`` the runs of the damaged and
isbi sets train for M minutes of wall time each, ``train.max_minutes``, the epochs an upper bound: equal minutes,
not epochs)

- ``damaged``: synthetic serial-section volumes (``synthetic_volumes.synthetic_em_volume``: sections 5 px thick,
  a fifth of them blurred and noisy) written as TIFF stacks with their ImageJ spacing: 12 to train, 2 to validate,
  4 held out. The same recipe (``DAMAGED_RECIPE``) trains once with ``unet.dims: 3`` (each stack a volume) and
  once with ``unet.dims: 2`` (each section an image), per seed; both are scored here on the held-out volumes,
  section by section, against their exact labels, on the damaged and on the intact sections apart.
- ``nuclei3d``: stardist's 3D test nuclei (``--nuclei3d FOLDER`` holding ``img3d.tif`` and ``mask3d.tif``, from
  ``stardist/data/images/`` of its wheel: ``pip download stardist --no-deps``), object ids, 3D against 2D on
  its held-out sections by object F1 at IoU 0.5 in 3D.
- ``isbi``: ISBI 2012 as one volume (``train.dataset_name: isbi2012``, blocks of 3 sections) with
  ``configs/isbi2012_3d_cpu.yaml`` against the 2D recipe ``configs/isbi2012_cpu.yaml``, on the contiguous folds
  of ``--folds``; both scored by ``test.py`` on the fold's 6 held-out sections.

Rows give the epochs trained, pixel error and Rand error (scikit-image's foreground-restricted adapted Rand error
of each section's 4-connected cells, as the ISBI challenge scores a slice) and the minutes of training.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from skimage import measure

from segmentation.benchmarks.fine_tune import run
from segmentation.benchmarks.peers import Annotated, score
from segmentation.benchmarks.speed import ROOT
from segmentation.checkpoints import read_progress
from segmentation.data.cache import normalize_volume
from segmentation.data.preprocess import normalize_image
from segmentation.data.synthetic_volumes import Z_RATIO, synthetic_em_volume
from segmentation.inference.trained import Trained, load_trained
from segmentation.metrics import em_segmentation_scores, matching_scores, object_matching

VOLUME_SETS = ("damaged", "isbi", "nuclei3d")
NUCLEI_BLOCKS = ((0, 16), (16, 21), (21, 31))  # sections of stardist's 3D test nuclei: training, validation, test
NUCLEI_RECIPE = (
    "unet.input_channels=[8, 16, 32]",
    "unet.padding=1",
    "train.tile_size=48",
    "train.samples_per_image=16",
    "train.batch_size=2",
    "train.best_metric=val_dice",
)
DAMAGED_VOLUMES = (12, 2, 4)  # training, validation, held-out volumes of the damaged set
DAMAGED_SHAPE = (16, 64)  # sections, side: small, so that a 2-core CPU trains either network in minutes
DAMAGED_RECIPE = (
    "unet.input_channels=[8, 16, 32]",
    "unet.padding=1",
    "train.tile_size=64",  # the side of the volumes: in-plane tiles of the whole section, 2D and 3D alike
    "train.samples_per_image=2",
    "train.batch_size=2",
    "train.class_weights=none",
    "train.w_0=0",
    "train.best_metric=val_pixel_error",
    "train.lr=0.002",
)
DAMAGED_VARIANTS = ("3D", "3D-z", "2D")
ROW = "{:>8} {:>4} {:>6} {:>12} {:>12} {:>12} {:>12} {:>8}"


def write_damaged_set(root: Path, seed: int) -> list[np.ndarray]:
    """Write the damaged volumes as ``images/vNN.tif`` and ``masks/vNN.tif`` (0/255) stacks with their ImageJ
    spacing; returns the damaged section indices of each volume."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    sections, side = DAMAGED_SHAPE
    damaged = []
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(sum(DAMAGED_VOLUMES))):
        image, label, _, broken = synthetic_em_volume(sections, side, np.random.default_rng(child))
        metadata = {"spacing": Z_RATIO, "axes": "ZYX"}
        pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
        tifffile.imwrite(root / "images" / f"v{index:02d}.tif", pixels, imagej=True, metadata=metadata)
        tifffile.imwrite(root / "masks" / f"v{index:02d}.tif", label * 255, imagej=True, metadata=metadata)
        damaged.append(broken)
    return damaged


def section_classes(trained: Trained, volume: np.ndarray) -> np.ndarray:
    """(D, H, W) int64 classes of a gray (D, H, W) ``volume``: a 3D model predicts it whole, a 2D one section by
    section."""
    predictor = trained.predictor
    if trained.plan.dims == 3:
        return predictor.classes(predictor.probabilities(torch.from_numpy(normalize_volume(volume, 1)))).numpy()
    sections = [predictor.probabilities(torch.from_numpy(normalize_image(s, 1))) for s in volume]
    return np.stack([predictor.classes(probabilities).numpy() for probabilities in sections])


def section_scores(checkpoint: Path, folder: Path, volumes: list[int], damaged: list[np.ndarray]) -> dict:
    """Pixel and Rand error of a model's predictions of ``volumes`` (indices into ``folder``), per section,
    pooled over the damaged and over the intact sections: ``{"damaged": (pixel, rand), "intact": ...}``."""
    trained, scores = load_trained(checkpoint), {"damaged": [], "intact": []}
    for index in volumes:
        image = tifffile.imread(folder / "images" / f"v{index:02d}.tif")
        label = (tifffile.imread(folder / "masks" / f"v{index:02d}.tif") > 0).astype(np.int64)
        classes = section_classes(trained, image)
        for section in range(len(image)):
            kind = "damaged" if section in damaged[index] else "intact"
            rand = em_segmentation_scores(classes[section] == 1, label[section])["rand_error"]
            scores[kind].append((float(np.mean(classes[section] != label[section])), rand))
    return {kind: tuple(np.mean(values, axis=0)) for kind, values in scores.items()}


def damaged_experiment(
    epochs_3d: int,
    epochs_2d: int,
    seeds: list[int],
    root: Path,
    variants: tuple[str, ...] = DAMAGED_VARIANTS,
    minutes: float | None = None,
) -> None:
    """Train the damaged set's recipe per seed as each of ``variants`` and print the held-out scores: ``3D`` as the
    plan decides from the spacing (z convolved at the deepest level alone), ``3D-z`` with ``train.spacing: [1, 1,
    1]`` (3 x 3 x 3 kernels and z pooled at every level, as for isotropic voxels), ``2D`` (see the module). With
    ``minutes`` every run has that wall time (``train.max_minutes``), the epochs an upper bound."""
    train_count, val_count, held = DAMAGED_VOLUMES
    damaged = write_damaged_set(root / "damaged", seed=100)
    sections = DAMAGED_SHAPE[0]
    held_out = list(range(train_count + val_count, train_count + val_count + held))
    print(ROW.format("network", "seed", "epochs", "px damaged", "rand damaged", "px intact", "rand intact", "minutes"))
    for seed in seeds:
        for variant in variants:
            dims, epochs = (2, epochs_2d) if variant == "2D" else (3, epochs_3d)
            geometry = ["train.spacing=[1, 1, 1]"] if variant == "3D-z" else []
            geometry += [f"train.max_minutes={minutes}"] if minutes else []
            # 2D: every section an image, so the validation and held-out volumes are their sections
            unit = 1 if dims == 3 else sections
            val = list(range(train_count * unit, (train_count + val_count) * unit))
            test = list(range((train_count + val_count) * unit, (train_count + val_count + held) * unit))
            name = f"d{variant}-s{seed}"
            took = train_folder(root, "damaged", name, [*DAMAGED_RECIPE, *geometry], dims, val, test, epochs, seed)
            scores = section_scores(root / "weights" / name / "best.pt", root / "damaged", held_out, damaged)
            numbers = [f"{value:.4f}" for kind in ("damaged", "intact") for value in scores[kind]]
            trained = read_progress(root / "weights" / name / "last.pt").epoch
            print(ROW.format(variant, seed, trained, *numbers, f"{took:.1f}"), flush=True)


def train_folder(
    root: Path, data: str, name: str, recipe: list[str], dims: int, val: list, test: list, epochs: int, seed: int
) -> float:
    """Train ``recipe`` on the folder ``root / data`` as run ``name`` (its runs and cache under ``root``), with
    ``unet.dims``, the validation and test images (samples: volumes in 3D, sections in 2D), epochs and seed;
    returns the minutes it took."""
    overrides = [
        *recipe,
        f"unet.dims={dims}",
        "train.dataset_name=folder",
        f"train.data={root / data}",
        f"train.val_images={val}",
        f"train.test_images={test}",
        f"train.max_epochs={epochs}",
        f"train.seed={seed}",
        f"train.run_name={name}",
        f"train.cache_dir={root / 'cache'}",
        f"train.save_path={root / 'weights'}",
        f"train.log_path={root / 'logs'}",
    ]
    start = time.perf_counter()
    run("training.py", *overrides)
    return (time.perf_counter() - start) / 60


def isbi_experiment(
    epochs_3d: int, epochs_2d: int, isbi: Path, folds: list[int], root: Path, minutes: float | None = None
) -> None:
    """ISBI 2012 in 3D (blocks of sections) against the 2D recipe per contiguous fold, both scored section by
    section on the fold's 6 held-out sections (``held_out_section_scores``). With ``minutes`` each run trains for
    that wall time (``train.max_minutes``), the epochs an upper bound."""
    volume, labels = tifffile.imread(isbi / "train-volume.tif"), tifffile.imread(isbi / "train-labels.tif")
    print(ROW.format("dims", "fold", "epochs", "pixel error", "Rand error", "Dice", "object F1", "minutes"))
    for fold in folds:
        for dims, epochs, recipe in ((3, epochs_3d, "isbi2012_3d_cpu.yaml"), (2, epochs_2d, "isbi2012_cpu.yaml")):
            name = f"isbi{dims}d"
            folders = [
                f"train.cache_dir={root / 'cache'}",
                f"train.save_path={root / 'weights'}",
                f"train.log_path={root / 'logs'}",
            ]
            split = ["train.folds=5", f"train.fold={fold}", "train.val_images=null", "train.test_images=null"]
            overrides = [f"train.data={isbi}", f"train.max_epochs={epochs}", f"train.run_name={name}", *split]
            overrides += [f"train.max_minutes={minutes}"] if minutes else []
            start = time.perf_counter()
            run("training.py", "--config", str(ROOT / "configs" / recipe), *overrides, *folders)
            took = (time.perf_counter() - start) / 60
            checkpoint = root / "weights" / f"{name}-fold{fold}" / "best.pt"
            held = slice(6 * fold, 6 * fold + 6)  # contiguous folds: 6 neighbouring sections each, in 2D and 3D
            scores = held_out_section_scores(checkpoint, volume[held], labels[held] == 255)
            numbers = [f"{scores[key]:.4f}" for key in ("pixel_error", "rand_error", "dice", "object_f1")]
            trained = read_progress(checkpoint.with_name("last.pt")).epoch
            print(ROW.format(f"{dims}D", fold, trained, *numbers, f"{took:.1f}"), flush=True)


def held_out_section_scores(checkpoint: Path, volume: np.ndarray, cells: np.ndarray) -> dict[str, float]:
    """``peers.score`` of a model's predictions of a (D, H, W) ``volume`` against its (D, H, W) bool ``cells``,
    section by section, the same for a 3D model (the volume predicted whole) as for a 2D one (each section): the
    pixel error, foreground Dice, the adapted Rand error of each section's 4-connected cells and object F1."""
    classes = section_classes(load_trained(checkpoint), volume)
    truths = [
        Annotated(str(index), section, truth, measure.label(truth, connectivity=1).astype(np.int32), False)
        for index, (section, truth) in enumerate(zip(volume, cells))
    ]
    found = [(section == 1, measure.label(section == 1, connectivity=1)) for section in classes]
    return score(truths, found)


def nuclei_experiment(epochs_3d: int, epochs_2d: int, nuclei: Path, seeds: list[int], root: Path) -> None:
    """stardist's 3D test nuclei (``img3d.tif``, ``mask3d.tif`` in ``nuclei``; 31 x 61 x 57 voxels, 51 nuclei):
    sections 0-15 train, 16-20 validate, 21-30 are held out; object F1 at IoU 0.5 of the nuclei in 3D (a 2D
    model's objects are the 6-connected components of its stacked section masks), per seed."""
    image, ids = tifffile.imread(nuclei / "img3d.tif"), tifffile.imread(nuclei / "mask3d.tif")
    (root / "nuclei" / "images").mkdir(parents=True)
    (root / "nuclei" / "masks").mkdir()
    for index, (start, stop) in enumerate(NUCLEI_BLOCKS):
        tifffile.imwrite(root / "nuclei" / "images" / f"b{index}.tif", image[start:stop], photometric="minisblack")
        tifffile.imwrite(root / "nuclei" / "masks" / f"b{index}.tif", ids[start:stop], photometric="minisblack")
    test_image, test_ids = image[slice(*NUCLEI_BLOCKS[2])], ids[slice(*NUCLEI_BLOCKS[2])]
    print(ROW.format("dims", "seed", "epochs", "object F1", "precision", "recall", "objects", "minutes"))
    for seed in seeds:
        for dims, epochs in ((3, epochs_3d), (2, epochs_2d)):
            lengths = [stop - start for start, stop in NUCLEI_BLOCKS]
            val = [1] if dims == 3 else list(range(lengths[0], lengths[0] + lengths[1]))
            test = [2] if dims == 3 else list(range(lengths[0] + lengths[1], sum(lengths)))
            name = f"n{dims}-s{seed}"
            recipe = [*NUCLEI_RECIPE, "train.spacing=[1, 1, 1]"]
            minutes = train_folder(root, "nuclei", name, recipe, dims, val, test, epochs, seed)
            found = volume_objects(root / "weights" / name / "best.pt", test_image)
            scores = matching_scores(object_matching(test_ids, found))
            numbers = [f"{scores[key]:.4f}" for key in ("f1", "precision", "recall")]
            print(ROW.format(f"{dims}D", seed, epochs, *numbers, int(found.max()), f"{minutes:.1f}"), flush=True)


def volume_objects(checkpoint: Path, volume: np.ndarray) -> np.ndarray:
    """(D, H, W) object ids a model finds in a (D, H, W) volume: a 3D model's objects, or the 6-connected
    components of a 2D model's objects stacked section by section."""
    trained = load_trained(checkpoint)
    predictor = trained.predictor
    if trained.plan.dims == 3:
        return predictor.objects(predictor.probabilities(torch.from_numpy(normalize_volume(volume, 1))))
    sections = [predictor.objects(predictor.probabilities(torch.from_numpy(normalize_image(s, 1)))) for s in volume]
    return measure.label(np.stack(sections) > 0, connectivity=1)


def volume_experiment(
    sets: dict[str, tuple[int, int]],
    seeds: list[int],
    isbi: Path | None = None,
    folds: list[int] | None = None,
    nuclei: Path | None = None,
    minutes: float | None = None,
) -> None:
    """Run the experiments of ``sets`` (name -> (epochs in 3D, epochs in 2D)); see the module's docstring. With
    ``minutes``, the damaged and isbi sets' runs train for that wall time each (the epochs an upper bound)."""
    root = Path(tempfile.mkdtemp(prefix="unet-bench-volumes-"))
    try:
        if "damaged" in sets:
            damaged_experiment(*sets["damaged"], seeds, root, minutes=minutes)
        if "isbi" in sets:
            isbi_experiment(*sets["isbi"], isbi, folds or [0], root, minutes)
        if "nuclei3d" in sets:
            nuclei_experiment(*sets["nuclei3d"], nuclei, seeds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
