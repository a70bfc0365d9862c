"""Side by side with what users would pick instead: ours, nnU-Net v2 and StarDist on the same images and minutes.

``bench.py --peers nnunet,stardist --data TRAIN --held HELD --minutes M [--csv OUT] [--config OURS.yaml]``

- ``ours``: ``python training.py`` with the given config (default the shipped defaults) on TRAIN, with
  ``train.max_minutes: M`` (the epochs and the schedule planned to end by then; ``train.max_epochs`` lifted out
  of the way) and the split keys replaced: validation images drawn from TRAIN by ``train.val_fraction``, no
  test images (HELD is the test); then HELD predicted by ``load_trained``'s predictor (objects included).
- ``nnunet``: TRAIN written in nnU-Net's raw layout (a Dataset folder with imagesTr, labelsTr and dataset.json,
  PNG files for its 2D natural-image reader; label 1 = the foreground), then ``peer_nnunet.py`` in nnU-Net's own
  Python: its fingerprint, plan and preprocessing, the 2d configuration on fold 0 for M minutes, HELD predicted
  by its predictor. Its objects are the 4-connected components of its foreground.
- ``stardist``: where TRAIN's masks are object ids, ``peer_stardist.py`` in StarDist's own Python: StarDist2D
  with its 2D example's settings for M minutes, HELD predicted with ``predict_instances``.

Each system's M minutes count from its start, its preprocessing included; prediction comes after. Systems run
one after another, never together. One scorer for all (``score``): pixel error and foreground Dice and IoU
pooled over HELD's pixels, the adapted Rand error (scikit-image, foreground-restricted) of the objects against
the true objects averaged over the images, and object F1 at IoU 0.5 pooled as stardist's ``matching_dataset``.

Peers run in Pythons of their own (nnU-Net pulls torchvision, which must match the torch beside it; StarDist
pulls TensorFlow): ``--peer-python nnunet=PATH`` names one, else ``cache/peers/<peer>/bin/python`` is used,
which ``--install-peers`` builds once (``PEER_PACKAGES``). A missing environment or a failing peer is one line
in its row, not the end of the table; temporary folders are removed afterwards.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.io
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error

from segmentation.benchmarks.speed import ROOT
from segmentation.checkpoints import read_progress
from segmentation.config import UserError
from segmentation.data.datacheck import detect_layout
from segmentation.data.preprocess import normalize_image
from segmentation.data.readers import MaskSettings, read_folder_pairs, read_isbi2012, read_pennfudan
from segmentation.inference.trained import load_trained
from segmentation.metrics import confusion_matrix, matching_scores, object_matching, segmentation_scores

PEERS = ("nnunet", "stardist")
# what each peer's environment installs; torch and torchvision as a pair that imports together (nnU-Net's trainer
# lookup imports timm, which imports torchvision)
PEER_PACKAGES = {
    "nnunet": ["torch==2.14.1", "torchvision==0.29.1", "nnunetv2==2.8.1"],
    "stardist": ["tensorflow-cpu==2.15.1", "stardist==0.9.2"],
}
PEER_SCRIPTS = {"nnunet": "peer_nnunet.py", "stardist": "peer_stardist.py"}
CSV_COLUMNS = ("system", "minutes", "pixel_error", "dice", "rand_error", "object_f1")
ROW = "{:<9} {:>7} {:>11} {:>7} {:>7} {:>10} {:>9} {:>8}  {}"
ENVIRONMENTS = ROOT / "cache" / "peers"  # the peers' environments, one folder each
INSTALLED = "installed"  # written into a peer's environment once its packages are in
NNUNET_DATASET_ID = 901  # nnU-Net's datasets are numbered; this one lives only in the temporary folder


@dataclass
class Annotated:
    """One image with its truth, as our folder reader reads it: ``image`` as stored ((H, W) or (H, W, C)),
    ``foreground`` (H, W) bool, ``ids`` (H, W) int32 objects (0: none) and whether the mask gave them
    (``ids_given``: object ids, not classes)."""

    name: str
    image: np.ndarray
    foreground: np.ndarray
    ids: np.ndarray
    ids_given: bool


def read_annotated(folder: Path, channels: int) -> list[Annotated]:
    """The images and masks of ``folder`` in any layout ``dataset.py check`` recognises (``detect_layout``):
    ISBI 2012's (its stacks, or images/ + labels/), Penn-Fudan's, or images/ + masks/ (any mask our reader reads:
    0/255, class indices, object ids); foreground is class 1, or the objects of id masks; objects are the ids, or
    the 4-connected components of the foreground."""
    layout = detect_layout(folder)
    if layout == "isbi2012":
        samples = read_isbi2012(folder, channels)
    elif layout == "pennfudan":
        training, validation = read_pennfudan(folder, channels)
        samples = training + (validation or [])
    else:
        samples = read_folder_pairs(folder / "images", folder / "masks", channels=channels)
    found = []
    for sample in samples:
        read = sample.read(MaskSettings())
        ids_given = read.mask_read_as == "instances"
        foreground = read.instances > 0 if ids_given else read.label == 1
        ids = read.instances if ids_given else measure.label(foreground, connectivity=1)
        found.append(Annotated(read.name, read.image, foreground, ids.astype(np.int32), ids_given))
    if not found:
        raise UserError(f"{folder}: no images")
    return found


def score(truths: list[Annotated], predictions: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """The scores of ``predictions`` ((foreground (H, W) bool, objects (H, W) int) per image of ``truths``)."""
    confusion, rand, counts = torch.zeros(2, 2, dtype=torch.int64), [], np.zeros(4)
    for truth, (foreground, objects) in zip(truths, predictions, strict=True):
        confusion += confusion_matrix(torch.from_numpy(foreground), torch.from_numpy(truth.foreground), 2)
        rand.append(adapted_rand_error(truth.ids, np.asarray(objects, np.int64), ignore_labels=(0,))[0])
        counts += object_matching(truth.ids, objects)
    pixels = segmentation_scores(confusion)
    return {
        "pixel_error": pixels["pixel_error"],
        "dice": pixels["dice"],
        "iou": pixels["iou"],
        "rand_error": float(np.mean(rand)),
        "object_f1": matching_scores(counts)["f1"],
    }


def train_ours(train: Path, held: list[Annotated], minutes: float, config: Path | None, work: Path) -> tuple[list, str]:
    """Train ours on ``train`` for ``minutes`` (``train.max_minutes``); its predictions of ``held`` (foreground,
    objects) and its last line."""
    overrides = [
        f"train.dataset_name={detect_layout(train)}",
        f"train.data={train}",
        f"train.max_minutes={minutes}",
        "train.max_epochs=1000000",
        "train.val_images=null",
        "train.test_images=null",
        "train.val_data=null",
        "train.folds=null",
        "train.run_name=ours",
        f"train.cache_dir={work / 'cache'}",
        f"train.save_path={work / 'weights'}",
        f"train.log_path={work / 'logs'}",
    ]
    command = [sys.executable, str(ROOT / "training.py"), *(["--config", str(config)] if config else []), *overrides]
    run_quietly(command, 60 * minutes * 3 + 600, "ours")
    progress = read_progress(work / "weights" / "ours" / "last.pt")
    line = f"ours: {progress.epoch} epochs, {progress.step} steps, {progress.seconds:.0f} s"
    trained = load_trained(work / "weights" / "ours" / "best.pt")
    predictor, channels, device = trained.predictor, trained.config.unet.image_channels, trained.device
    found = []
    for sample in held:
        image = torch.from_numpy(normalize_image(sample.image, channels)).to(device)
        probabilities = predictor.probabilities(image)
        objects = predictor.objects(probabilities)
        found.append((predictor.classes(probabilities, objects).numpy() == 1, objects))
    return found, line


def write_nnunet_raw(train: list[Annotated], held: list[Annotated], root: Path) -> None:
    """``train`` and ``held`` as nnU-Net's raw Dataset folder under ``root`` (PNG, label 1 = foreground)."""
    dataset = root / "nnUNet_raw" / f"Dataset{NNUNET_DATASET_ID}_peers"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / sub).mkdir(parents=True)
    for index, sample in enumerate(train):
        skimage.io.imsave(
            dataset / "imagesTr" / f"case{index:04d}_0000.png", png_pixels(sample.image), check_contrast=False
        )
        label = sample.foreground.astype(np.uint8)
        skimage.io.imsave(dataset / "labelsTr" / f"case{index:04d}.png", label, check_contrast=False)
    for index, sample in enumerate(held):
        skimage.io.imsave(
            dataset / "imagesTs" / f"held{index:04d}_0000.png", png_pixels(sample.image), check_contrast=False
        )
    rgb = train[0].image.ndim == 3
    channels = {"0": "R", "1": "G", "2": "B"} if rgb else {"0": "gray"}
    description = {
        "channel_names": channels,
        "labels": {"background": 0, "foreground": 1},
        "numTraining": len(train),
        "file_ending": ".png",
    }
    (dataset / "dataset.json").write_text(json.dumps(description, indent=2))


def png_pixels(image: np.ndarray) -> np.ndarray:
    """``image`` as PNG can hold it: uint8 and uint16 as they are, any other type scaled to uint16."""
    if image.dtype in (np.uint8, np.uint16):
        return image
    low, high = float(image.min()), float(image.max())
    return ((image - low) / max(high - low, 1e-12) * 65535).astype(np.uint16)


def run_nnunet(
    python: Path, train: list[Annotated], held: list[Annotated], minutes: float, work: Path
) -> tuple[list, str]:
    """nnU-Net on ``train`` for ``minutes`` in its own Python; its predictions of ``held``."""
    write_nnunet_raw(train, held, work)
    script = Path(__file__).with_name(PEER_SCRIPTS["nnunet"])
    line = run_quietly(
        [str(python), str(script), str(work), str(NNUNET_DATASET_ID), str(minutes)], 60 * minutes * 3 + 1800, "nnunet"
    )
    found = []
    for index in range(len(held)):
        foreground = skimage.io.imread(work / "predictions" / f"held{index:04d}.png") == 1
        found.append((foreground, measure.label(foreground, connectivity=1)))
    return found, line


def run_stardist(
    python: Path, train: list[Annotated], held: list[Annotated], minutes: float, work: Path
) -> tuple[list, str]:
    """StarDist on ``train`` (object ids) for ``minutes`` in its own Python; its predictions of ``held``."""
    arrays = {f"train_image_{i}": sample.image for i, sample in enumerate(train)}
    arrays |= {f"train_mask_{i}": sample.ids for i, sample in enumerate(train)}
    arrays |= {f"held_image_{i}": sample.image for i, sample in enumerate(held)}
    np.savez(work / "data.npz", **arrays)
    script = Path(__file__).with_name(PEER_SCRIPTS["stardist"])
    line = run_quietly([str(python), str(script), str(work), str(minutes)], 60 * minutes * 3 + 1800, "stardist")
    with np.load(work / "predictions.npz") as predictions:
        found = [(predictions[f"held_{i}"] > 0, predictions[f"held_{i}"]) for i in range(len(held))]
    return found, line


def run_quietly(command: list[str], timeout: float, system: str) -> str:
    """Run ``command``; its last line of output. A failure raises PeerFailed with its last line of errors."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        raise PeerFailed(f"{system} ran past {timeout / 60:.0f} minutes: stopped") from None
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise PeerFailed(f"{system} failed: {lines[-1] if lines else f'exit status {done.returncode}'}")
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else ""


class PeerFailed(Exception):
    """A system that could not be trained or could not predict: its one line."""


def peer_python(peer: str, given: dict[str, Path], install: bool) -> Path:
    """The Python that runs ``peer``: ``--peer-python``'s, else cache/peers/<peer>/bin/python, built now under
    ``install``; PeerFailed with the commands that build it where there is none."""
    if peer in given:
        if not given[peer].is_file():
            raise PeerFailed(f"{peer}: --peer-python {given[peer]} not found")
        return given[peer]
    folder = ENVIRONMENTS / peer
    python = folder / "bin" / "python"
    if environment_ready(peer):
        return python
    pip = f"{folder}/bin/pip install {' '.join(PEER_PACKAGES[peer])}"
    if not install:
        raise PeerFailed(
            f"{peer}: no environment; build it with --install-peers, or: python -m venv {folder} && {pip} && "
            f"touch {folder / INSTALLED}"
        )
    print(f"building {peer}'s environment in {folder} (once): {pip}", flush=True)
    venv.create(folder, with_pip=True)
    run_quietly([str(folder / "bin" / "pip"), "install", "-q", *PEER_PACKAGES[peer]], 3600, f"installing {peer}")
    (folder / INSTALLED).touch()  # an install cut short leaves none: the next --install-peers completes it
    return python


def peer_table(
    peers: list[str],
    train: Path,
    held: Path,
    minutes: float,
    config: Path | None = None,
    csv_path: Path | None = None,
    pythons: dict[str, Path] | None = None,
    install: bool = False,
) -> list[dict]:
    """Train ours and each of ``peers`` on ``train`` for ``minutes``, one after another, score them on ``held``
    and print the table (and write ``csv_path``); returns the rows."""
    from segmentation.config import load_config

    channels = load_config(config, []).unet.image_channels
    train_set, held_set = read_annotated(train, channels), read_annotated(held, channels)
    print(f"{len(train_set)} training images ({train}), {len(held_set)} held out ({held}), {minutes:g} minutes each")
    print(ROW.format("system", "minutes", "pixel error", "Dice", "IoU", "Rand error", "object F1", "seconds", ""))
    rows = []
    for system in ["ours", *peers]:
        work = Path(tempfile.mkdtemp(prefix=f"unet-peers-{system}-"))
        start, row = time.monotonic(), {"system": system, "minutes": minutes}
        try:
            row |= run_system(system, train, train_set, held_set, minutes, config, work, pythons or {}, install)
        except PeerFailed as failure:
            row["note"] = str(failure)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row.setdefault("seconds", time.monotonic() - start)
        rows.append(row)
        print(format_row(row), flush=True)
    if csv_path:
        with csv_path.open("w", newline="") as file:
            writer = csv.DictWriter(file, CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                scores = {key: rounded(row.get(key, "")) for key in CSV_COLUMNS[2:]}
                writer.writerow({"system": row["system"], "minutes": f"{row['minutes']:g}", **scores})
    return rows


def run_system(system, train, train_set, held_set, minutes, config, work, pythons, install) -> dict:
    """Train and predict one system; its scores, seconds of training and prediction and its runner's line."""
    start = time.monotonic()
    if system == "ours":
        found, line = train_ours(train, held_set, minutes, config, work)
    elif system == "stardist" and not all(sample.ids_given for sample in train_set):
        raise PeerFailed("stardist: skipped, the masks are classes, not object ids (StarDist trains on ids)")
    else:
        python = peer_python(system, pythons, install)
        runner = run_nnunet if system == "nnunet" else run_stardist
        found, line = runner(python, train_set, held_set, minutes, work)
    return {**score(held_set, found), "seconds": time.monotonic() - start, "note": line}


def rounded(value):
    return f"{value:.4f}" if isinstance(value, float) else value


def format_row(row: dict) -> str:
    """One line of the table: a system's scores and seconds, or its note."""
    scores = [
        rounded(row[key]) if key in row else "-" for key in ("pixel_error", "dice", "iou", "rand_error", "object_f1")
    ]
    return ROW.format(row["system"], f"{row['minutes']:g}", *scores, f"{row['seconds']:.0f}", row.get("note", ""))


def environment_ready(peer: str) -> bool:
    """Whether ``cache/peers/<peer>`` holds a completed environment (its Python and the ``INSTALLED`` mark)."""
    folder = ENVIRONMENTS / peer
    return (folder / INSTALLED).is_file() and os.access(folder / "bin" / "python", os.X_OK)


Curves = dict[str, dict[str, list[tuple[float, dict[str, float]]]]]  # data set -> system -> (minutes, scores)
LOWER_IS_BETTER = ("pixel_error", "rand_error")
CURVE_SCORES = ("pixel_error", "rand_error", "object_f1")  # the scores plotted and caught up with


def read_peer_tables(tables: list[Path]) -> Curves:
    """The scored rows of CSV files that ``--peers --csv`` wrote, named ``<data set>-<anything>.csv``
    (``isbi-10.csv``), per data set and system, sorted by minutes; a UserError when none has scores."""
    curves: Curves = {}
    for table in tables:
        with table.open(newline="") as file:
            for row in csv.DictReader(file):
                if row.get("pixel_error"):
                    curve = curves.setdefault(table.stem.split("-")[0], {}).setdefault(row["system"], [])
                    curve.append((float(row["minutes"]), {key: float(row[key]) for key in CSV_COLUMNS[2:]}))
    if not curves:
        raise UserError(f"{', '.join(map(str, tables))}: no scored rows to plot")
    for systems in curves.values():
        for curve in systems.values():
            curve.sort(key=lambda point: point[0])
    return curves


def catch_up_lines(curves: Curves, reference_minutes: float = 10.0) -> list[str]:
    """For each data set, peer and score: the fewest measured minutes at which the peer scored at least as well
    as ours did in ``reference_minutes`` (ours' budget nearest to it), bracketed by the budget before, or the
    longest budget at which it had not."""
    lines = []
    for data, systems in sorted(curves.items()):
        if "ours" not in systems:
            continue
        minutes, ours = min(systems["ours"], key=lambda point: abs(point[0] - reference_minutes))
        for system, curve in sorted(systems.items()):
            if system == "ours":
                continue
            parts = []
            for key in CURVE_SCORES:
                target = ours[key]
                reached = [
                    at
                    for at, scores in curve
                    if (scores[key] <= target if key in LOWER_IS_BETTER else scores[key] >= target)
                ]
                if reached:
                    before = [at for at, _ in curve if at < reached[0]]
                    since = f" (not at {before[-1]:g})" if before else ""
                    parts.append(f"{key} {target:.4f} by {reached[0]:g} min{since}")
                else:
                    best = (min if key in LOWER_IS_BETTER else max)(scores[key] for _, scores in curve)
                    parts.append(f"{key} {target:.4f} not by {curve[-1][0]:g} min (best {best:.4f})")
            lines.append(f"{data}: {system} to reach ours at {minutes:g} min: " + "; ".join(parts))
    return lines


def plot_peer_curves(tables: list[Path], figure: Path) -> list[str]:
    """Scores against minutes per system, one column of panels per data set, from the CSV files ``tables``
    (``read_peer_tables``); a PNG at ``figure``. Returns ``catch_up_lines`` of the same tables."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    points = read_peer_tables(tables)
    plot = Figure(figsize=(4 * len(points), 3 * len(CURVE_SCORES)), layout="constrained")
    axes = plot.subplots(len(CURVE_SCORES), len(points), squeeze=False)
    for column, (data, systems) in enumerate(sorted(points.items())):
        for row, key in enumerate(CURVE_SCORES):
            axis = axes[row][column]
            for system, curve in sorted(systems.items()):
                axis.plot([m for m, _ in curve], [s[key] for _, s in curve], marker="o", label=system)
            axis.set_xscale("log")
            budgets = sorted({minutes for curve in systems.values() for minutes, _ in curve})
            axis.xaxis.set_minor_locator(NullLocator())  # ticks at the budgets measured, written as plain minutes
            axis.set_xticks(budgets, [f"{minutes:g}" for minutes in budgets])
            axis.set_title(f"{data}: {key.replace('_', ' ')}")
            axis.set_xlabel("minutes of training (2-core CPU)")
            axis.legend(fontsize="small")
    plot.savefig(figure, dpi=100)
    return catch_up_lines(points)
