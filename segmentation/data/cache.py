"""The preprocessing cache: each image normalised, labelled and weighted once, then memory-mapped from disk.

Training and validation read their images from here, a tile or an image at a time, so memory does not
grow with the number of images, and a second run (or a resumed one) starts without preprocessing.
An entry is a folder ``cache_dir/<image name>-<key>/`` holding

- ``image.npy``  (C, H, W) float16: the image after ``preprocess.normalize_image`` and the resize of
  ``train.image_scale``;
- ``label.npy``  (H, W) uint8: class indices; for masks of object ids (two classes) the border pixels of
  each object are ``BOUNDARY`` (2), which ``unet.boundary_class`` learns as a class of its own and
  training without it reads as the object (``dataset.py`` folds it); ``losses.IGNORE_LABEL`` (255) where
  nobody annotated (``train.ignore_value``);
- ``border.npy`` (H, W) float16: the border term of the paper's weight map (absent where it is 0
  everywhere). The class weights are added per tile (``weight_maps.add_class_weights``), so an entry
  depends neither on the split nor on the class balance;
- ``instances.npy`` (H, W) uint16 (uint32 beyond 65535 objects): the object ids, for the instance
  scores of validation and test images (only in entries at the image's own size);
- ``annotated.npy`` (N, 2) int32: where some pixels are not annotated, up to ``ANNOTATED_POINTS`` annotated
  ones (row, column), around which training tiles are cut;
- ``meta.json``: name, shape, channels of the source image, the pixel count of each class and of the
  unannotated pixels, how the mask was read, and the areas (pixels at the image's own size) of its objects
  that do not touch the image border, from which ``predict.min_object_size: auto`` learns how small an object can be.

The key hashes everything the arrays depend on: the source (the files' path, size and modification
time, or a synthetic image's seed and index), the settings of preprocessing (``unet.image_channels``,
``unet.num_classes``, ``train.image_scale``, ``train.w_0``, ``train.sigma``, ``train.mask_type``,
``mask_values``, ``mask_colors``) and the code that
computes them (the text of this module and of images, readers, synthetic, preprocess and weight_maps). Change
any of them and the entry is built anew: nothing stale is read. Old entries stay until the folder is
deleted, which is safe at any time.

Why float16 suffices: a normalised image has zero mean and unit standard deviation, and float16 keeps
11 significant bits, a step of 2^-8 = 0.004 for values within +-2 and 0.03 at 16 standard deviations;
one gray level of an 8-bit image with a standard deviation of 30 levels is 0.033 units, and the
network's bf16 autocast keeps only 8 bits. The border term (0 to ``w_0``) is kept to 0.05 % of its
value, a difference no loss weight feels. Labels are exact.

Entries are written to a temporary folder and renamed when complete, so a run killed while building
leaves no half entry (the finished ones are kept: the next run builds the rest); an entry found
incomplete or damaged (a missing or truncated file) is named in a note and rebuilt. Missing entries
are built in parallel over the CPU cores with a progress bar; under torchrun each process builds its
share and waits for the others'.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from skimage import segmentation
from tqdm import tqdm

from losses import IGNORE_LABEL
from segmentation.config import UserError
from segmentation.console import first_line
from segmentation.data.preprocess import (
    channels_first,
    normalize_image,
    resize_image,
    resize_mask,
    row_axis,
    scaled_size,
)
from segmentation.data.readers import MaskSettings
from segmentation.data.weight_maps import border_weights, class_counts
from segmentation.settings import DataSettings

BOUNDARY = 2  # label value of an object's border pixels in entries of object-id masks (two classes)
CODE_MODULES = ("cache", "images", "readers", "synthetic", "preprocess", "weight_maps")  # their text is in every key
MIN_PARALLEL = 8  # fewer missing entries are built in this process, without starting workers
POLL_SECONDS = 0.5  # under torchrun: how often a process looks whether the others have built their share
ANNOTATED_POINTS = 2**16  # annotated pixels kept per entry of a sparsely annotated image, to cut its tiles around


@dataclass(frozen=True)
class PreparedImage:
    """One image's cache entry: ``shape`` (H, W) of its arrays, ``source_channels`` of the image file,
    ``class_counts`` (pixels of each class), ``has_border`` (False: the border term is 0 everywhere),
    ``mask_read_as`` (``classes``, ``instances`` or ``generated``), ``has_instances`` (the object
    ids are stored: entries at the image's own size, which validation and test images use) and
    ``mask_values`` (``readers.Sample.mask_values``), ``object_areas`` (``whole_object_areas`` at the
    image's own size) and ``has_boundary`` (the label marks the objects' borders as ``BOUNDARY``). A volume's
    entry has ``shape`` (D, H, W), its arrays one more axis, and its voxel ``spacing`` (z, y, x)."""

    folder: Path
    name: str
    shape: tuple[int, ...]
    source_channels: int
    class_counts: tuple[int, ...]
    has_border: bool
    mask_read_as: str = "classes"
    has_instances: bool = False
    mask_values: tuple[float, ...] = ()
    object_areas: tuple[int, ...] = ()
    has_boundary: bool = False
    unannotated: int = 0
    spacing: tuple[float, ...] | None = None

    @property
    def dims(self) -> int:
        """2 for an image, 3 for a volume (``shape`` (D, H, W))."""
        return len(self.shape)

    @property
    def annotated(self) -> int:
        """The pixels that carry a class (all but ``unannotated``, ``train.ignore_value``'s)."""
        return int(sum(self.class_counts))

    def annotated_points(self) -> np.ndarray:
        """(N, 2) int32 (row, column) of up to ``ANNOTATED_POINTS`` annotated pixels drawn at random, stored
        where some pixels are not annotated: training tiles are cut around them."""
        return np.load(self.folder / "annotated.npy")

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(image (C, H, W) float16, label (H, W) uint8, border (H, W) float16 or None)``, memory-mapped
        read-only: only what is indexed is read, and the mapping closes when the arrays are dropped, so
        nothing stays in the process's memory."""
        border = np.load(self.folder / "border.npy", mmap_mode="r") if self.has_border else None
        return (
            np.load(self.folder / "image.npy", mmap_mode="r"),
            np.load(self.folder / "label.npy", mmap_mode="r"),
            border,
        )

    def instances(self) -> np.ndarray:
        """(H, W) object ids (0 = none) of the image, in memory; a ValueError where they are not stored."""
        if not self.has_instances:
            raise ValueError(f"{self.folder}: this entry stores no object ids (a resized training image)")
        return np.load(self.folder / "instances.npy")


@dataclass(frozen=True)
class PreprocessingSettings:
    """The settings that enter an entry (besides the per-image ``train.image_scale``): the channels
    (``unet.image_channels``), the border term's ``train.w_0`` and ``train.sigma``, and how masks are read."""

    channels: int
    w_0: float
    sigma: float
    masks: MaskSettings

    @classmethod
    def from_settings(cls, image_channels: int, num_classes: int, data: DataSettings) -> PreprocessingSettings:
        """The preprocessing settings of ``unet.image_channels``, ``unet.num_classes`` and the data settings."""
        return cls(image_channels, data.w_0, data.sigma, MaskSettings.from_settings(num_classes, data))


def prepare_images(
    samples: Sequence,
    scales: Sequence[float],
    settings: PreprocessingSettings,
    cache_dir: str | Path,
    note: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
) -> list[PreparedImage]:
    """The cache entries of ``samples`` (``readers.FileSample`` or ``synthetic.SyntheticSample``), each
    resized by its ``scales`` factor, building the missing ones; in the order of ``samples``."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        remove_abandoned_temporaries(cache_dir)
    except OSError as error:
        raise UserError(
            f"train.cache_dir: cannot write to {cache_dir} ({error.strerror or error}): "
            "set train.cache_dir to a writable folder"
        ) from None
    folders = [cache_dir / entry_name(sample, scale, settings) for sample, scale in zip(samples, scales)]
    entries: dict[int, PreparedImage] = {}
    missing = []
    for index, folder in enumerate(folders):
        entry, problem = read_entry(folder)
        if entry is not None:
            entries[index] = entry
            continue
        if problem:
            note(f"cache entry {folder} of {samples[index].name} is incomplete or damaged ({problem}): rebuilding it")
        missing.append(index)
    # an image listed twice is built once
    first = {folder: index for index, folder in reversed(list(enumerate(folders)))}
    # Under torchrun each process builds every world_size-th image of the whole list, missing or not, so that
    # a process starting late, which finds part of the others' share built, still agrees on who builds the rest.
    missing_set = set(missing)
    share = [index for index in sorted(first.values())[rank::world_size] if index in missing_set]
    for index in share:
        shutil.rmtree(folders[index], ignore_errors=True)
    jobs = [(samples[index], scales[index], folders[index]) for index in share]
    build_entries(
        jobs,
        settings,
        f"preparing {len(missing)} image(s) into {cache_dir} (once)",
        show_progress=rank == 0,
        workers=max(1, (os.cpu_count() or 1) // world_size),
    )
    for index in missing:
        entries[index] = wait_for_entry(folders[index], samples[index].name, waiting=world_size > 1)
    return [entries[index] for index in range(len(folders))]


def entry_name(sample, scale: float, settings: PreprocessingSettings) -> str:
    """``<image name>-<key>``: the name for people, the key (20 hex digits of a SHA-256) for correctness."""
    identity = {
        "source": sample.identity(),
        "scale": scale,
        "settings": dataclasses.asdict(settings),
        "code": code_version(),
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', sample.name)[:40]}-{key}"


@lru_cache(maxsize=1)
def code_version() -> str:
    """A hash of the text of the modules that compute entries: new code, new entries."""
    digest = hashlib.sha256()
    for module in CODE_MODULES:
        digest.update((Path(__file__).with_name(f"{module}.py")).read_bytes())
    return digest.hexdigest()[:16]


def read_entry(folder: Path) -> tuple[PreparedImage | None, str | None]:
    """``(entry, None)`` for a complete entry, ``(None, None)`` where there is none, ``(None, problem)``
    for a damaged one. Reads meta.json and the header of each array (a few hundred bytes), and checks
    that each file holds all the bytes its header announces."""
    if not folder.is_dir():
        return None, None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        channels, *spatial = meta["shape"]
        spatial = tuple(spatial)
        expected = {"image": ((channels, *spatial), np.float16), "label": (spatial, np.uint8)}
        if meta["has_border"]:
            expected["border"] = (spatial, np.float16)
        if meta["instances_dtype"]:
            expected["instances"] = (spatial, np.dtype(meta["instances_dtype"]))
        if meta.get("unannotated"):
            expected["annotated"] = ((meta["annotated_points"], len(spatial)), np.int32)
        for array, (shape, dtype) in expected.items():
            check_array_file(folder / f"{array}.npy", shape, dtype)
        entry = PreparedImage(
            folder,
            meta["name"],
            spatial,
            meta["source_channels"],
            tuple(meta["class_counts"]),
            meta["has_border"],
            meta["mask_read_as"],
            bool(meta["instances_dtype"]),
            tuple(meta.get("mask_values", ())),
            tuple(meta.get("object_areas", ())),
            meta.get("has_boundary", False),
            meta.get("unannotated", 0),
            None if meta.get("spacing") is None else tuple(meta["spacing"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"{type(error).__name__}: {first_line(error)}"
    return entry, None


def check_array_file(path: Path, shape: tuple[int, ...], dtype) -> None:
    """Raise ValueError unless ``path`` is a .npy file of ``shape`` and ``dtype`` with all its data."""
    with path.open("rb") as file:
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found_shape, fortran_order, found_dtype = read_header(file)
        size = os.fstat(file.fileno()).st_size
        needed = file.tell() + int(np.prod(shape)) * np.dtype(dtype).itemsize
    if tuple(found_shape) != tuple(shape) or found_dtype != np.dtype(dtype) or fortran_order:
        raise ValueError(
            f"{path.name} holds {found_dtype} {tuple(found_shape)}, expected {np.dtype(dtype)} {tuple(shape)}"
        )
    if size != needed:
        raise ValueError(f"{path.name} has {size} bytes, expected {needed}")


def build_entries(
    jobs: list[tuple], settings: PreprocessingSettings, description: str, show_progress: bool, workers: int
) -> None:
    """Build the entries of ``jobs`` (sample, scale, folder): in worker processes when there are many."""
    if not jobs:
        return
    with tqdm(total=len(jobs), desc=description, unit="image", disable=not show_progress, leave=False) as bar:
        workers = min(workers, len(jobs))
        if workers == 1 or len(jobs) < MIN_PARALLEL:
            for job in jobs:
                build_entry(*job, settings)
                bar.update()
            return
        # fork where it is safe (Linux), as torch's DataLoader does: workers start at once and the
        # caller's script need not guard its code with if __name__ == "__main__"; one torch thread per
        # worker, as in DataLoader workers, keeps the cores shared and torch's OpenMP pool out of forks
        context = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(1,))
        futures = [pool.submit(build_entry, *job, settings) for job in jobs]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def build_entry(sample, scale: float, folder: Path, settings: PreprocessingSettings) -> None:
    """Read one image, preprocess it as training needs it and write its entry atomically."""
    data = sample.read(settings.masks)
    volume = data.label.ndim == 3
    image = (
        normalize_volume(data.image, settings.channels) if volume else normalize_image(data.image, settings.channels)
    )
    label, instances = data.label, data.instances
    areas = whole_object_areas(instances)
    if scale != 1:
        size = scaled_size(*label.shape[-2:], scale)  # a volume's sections in-plane; z is never resampled
        flat = torch.from_numpy(image.reshape(-1, *image.shape[-2:]))  # (C[, D], H, W): every plane alike
        image = resize_image(flat, size).numpy().reshape(*image.shape[:-2], *size)
        label, instances = resize_planes(label, size), resize_planes(instances, size)
    border = border_weights(label, instances, settings.w_0, settings.sigma, data.spacing)
    has_boundary = data.mask_read_as == "instances" and settings.masks.num_classes == 2
    if has_boundary:
        # at the network's scale, so that a border stays a line of pixels after train.image_scale
        objects = (label > 0) & (label != IGNORE_LABEL)
        label = np.where(segmentation.find_boundaries(instances, mode="inner") & objects, BOUNDARY, label)
    source_channels = image_source_channels(data.image, volume)
    try:
        # object ids only where validation and test can use them: at the image's own size
        write_entry(
            folder,
            data.name,
            image,
            label,
            border,
            source_channels,
            settings.masks.num_classes + has_boundary,
            instances if scale == 1 else None,
            data.mask_read_as,
            data.mask_values,
            areas,
            has_boundary,
            data.spacing,
        )
    except OSError as error:  # a full disk, a folder without write permission
        raise UserError(
            f"train.cache_dir: cannot write {folder} ({error.strerror or error}): free some space or set "
            "train.cache_dir to another folder"
        ) from None


def write_entry(
    folder: Path,
    name: str,
    image: np.ndarray,
    label: np.ndarray,
    border: np.ndarray | None,
    source_channels: int,
    num_classes: int,
    instances: np.ndarray | None = None,
    mask_read_as: str = "classes",
    mask_values: tuple[float, ...] = (),
    object_areas: np.ndarray | None = None,
    has_boundary: bool = False,
    spacing: tuple[float, ...] | None = None,
) -> PreparedImage:
    """Write an entry from its arrays (``image`` (C, H, W), ``label`` (H, W), ``border`` and
    ``instances`` (H, W) or None) into a temporary folder, then rename it to ``folder``: it appears
    whole or not at all. Object ids are stored as uint16 where they fit, else uint32."""
    temporary = folder.with_name(f".{folder.name}.{host_name()}.{os.getpid()}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    points = annotated_points(label)
    meta = {
        "name": name,
        "shape": list(image.shape),
        "source_channels": source_channels,
        "class_counts": class_counts(label, num_classes).tolist(),
        "has_border": border is not None,
        "instances_dtype": None if instances is None else ("uint16" if instances.max(initial=0) < 2**16 else "uint32"),
        "mask_read_as": mask_read_as,
        "mask_values": list(mask_values),
        "object_areas": [] if object_areas is None else np.asarray(object_areas).tolist(),
        "has_boundary": has_boundary,
        "unannotated": int(np.count_nonzero(label == IGNORE_LABEL)),
        "annotated_points": None if points is None else len(points),
    }
    if spacing is not None:
        meta["spacing"] = list(spacing)
    try:
        temporary.mkdir()
        np.save(temporary / "image.npy", np.ascontiguousarray(image, dtype=np.float16))
        np.save(temporary / "label.npy", np.ascontiguousarray(label, dtype=np.uint8))
        if border is not None:
            np.save(temporary / "border.npy", np.ascontiguousarray(border, dtype=np.float16))
        if instances is not None:
            np.save(temporary / "instances.npy", np.ascontiguousarray(instances, dtype=meta["instances_dtype"]))
        if points is not None:
            np.save(temporary / "annotated.npy", points)
        (temporary / "meta.json").write_text(json.dumps(meta))
        os.rename(temporary, folder)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if not (isinstance(error, OSError) and folder.is_dir()):  # else another process built the same entry first
            raise
    return read_entry(folder)[0]


def annotated_points(label: np.ndarray) -> np.ndarray | None:
    """(N, 2) int32 (row, column) of up to ``ANNOTATED_POINTS`` pixels of (H, W) ``label`` that carry a
    class ((N, 3) (section, row, column) of a volume's (D, H, W)), drawn at random with a fixed seed (an entry
    is the same whenever it is built); None where every pixel is annotated (tiles are cut anywhere then)."""
    given = label != IGNORE_LABEL
    if given.all():
        return None
    points = np.stack(np.nonzero(given), axis=1).astype(np.int32)
    if len(points) > ANNOTATED_POINTS:
        points = points[np.sort(np.random.default_rng(0).choice(len(points), ANNOTATED_POINTS, replace=False))]
    return points


def whole_object_areas(instances: np.ndarray) -> np.ndarray:
    """(N,) int64 pixel counts of the objects of (H, W) ``instances`` (0 = none) that do not touch the image
    border: the border cuts the others to any size. Of a volume's (D, H, W) ids: voxel counts of the objects
    that touch no face of the volume."""
    counts = np.bincount(instances.ravel().astype(np.int64))
    faces = [np.take(instances, index, axis=axis).ravel() for axis in range(instances.ndim) for index in (0, -1)]
    edge = np.concatenate(faces).astype(np.int64)
    whole = counts > 0
    whole[0] = False
    whole[edge] = False
    return counts[whole]


def resize_planes(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``preprocess.resize_mask`` of an (H, W) mask, or of each section of a (D, H, W) one."""
    return resize_mask(mask, size) if mask.ndim == 2 else np.stack([resize_mask(plane, size) for plane in mask])


def normalize_volume(image: np.ndarray, channels: int) -> np.ndarray:
    """(channels, D, H, W) float32 of a volume's sections stacked first ((D, H, W), (D, H, W, C) or
    (D, C, H, W)), each converted as ``normalize_image`` converts an image, normalised over the whole volume."""
    sections = np.stack([channels_first(section, channels) for section in image], axis=1)
    return normalize_image(sections.reshape(channels, -1, sections.shape[-1]), channels).reshape(sections.shape)


def image_source_channels(image: np.ndarray, volume: bool) -> int:
    """The channels of an image (or a volume's section) as its file stores them."""
    section = image[0] if volume else image
    return 1 if section.ndim == 2 else section.shape[-1 if row_axis(section.shape) == 0 else 0]


def wait_for_entry(folder: Path, name: str, waiting: bool) -> PreparedImage:
    """The entry at ``folder``, waiting for another process to build it when ``waiting`` (a damaged
    entry that process is about to replace may be seen meanwhile; torchrun stops every process if
    the builder fails)."""
    while True:
        entry, problem = read_entry(folder)
        if entry is not None:
            return entry
        if not waiting:
            raise UserError(
                f"cache entry {folder} of {name} was not built ({problem or 'missing'}): delete it and run again"
            )
        time.sleep(POLL_SECONDS)


def remove_abandoned_temporaries(cache_dir: Path) -> None:
    """Delete the temporary folders of builds on this machine whose process is gone (killed mid-build)."""
    host = host_name()
    for path in cache_dir.glob(".*.tmp"):
        parts = path.name.rsplit(".", 3)
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and not process_alive(int(parts[2])):
            shutil.rmtree(path, ignore_errors=True)


def host_name() -> str:
    """This machine's name, without dots (temporary folders split their names at dots)."""
    return re.sub(r"\W", "_", socket.gethostname())


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
