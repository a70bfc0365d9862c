"""Reading annotated images from disk: the layouts of ISBI 2012, Penn-Fudan and a folder of images and masks.

Listing a data set reads no pixels: each reader returns ``FileSample``s, which say where an image and
its mask lie and how the mask is read; ``FileSample.read`` reads one of them when it is needed (the
preprocessing cache reads each image once). Problems with a file are one-line ``UserError``s naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
from skimage import measure

from config import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Sample:
    """One annotated image as read from disk: ``image`` (H, W) or (H, W, C) of the file's dtype,
    ``label`` (H, W) uint8 class indices, ``instances`` (H, W) int32 object ids (0 = none) for the
    weight map, and ``name`` (file or slice) for messages."""

    image: np.ndarray
    label: np.ndarray
    instances: np.ndarray
    name: str


@dataclass(frozen=True)
class FileSample:
    """One annotated image on disk, not yet read: ``image`` and ``mask`` files (``page``: the slice of
    multi-page TIFF stacks, None for single images) and how the mask is read: ``classes`` (class
    indices, or 0/255 for two classes; objects are the 4-connected components of each class) or
    ``instances`` (one id per object, every id > 0 is class 1, as Penn-Fudan's masks)."""

    name: str
    image: Path
    mask: Path
    mask_kind: str = "classes"
    page: int | None = None

    def identity(self) -> list:
        """What the pixels depend on: the files (resolved path, size, modification time in ns), the
        page and the mask kind; a changed file gives a new identity."""
        files = []
        for path in (self.image, self.mask):
            status = path.stat()
            files.append([str(path.resolve()), status.st_size, status.st_mtime_ns])
        return ["file", files, self.page, self.mask_kind]

    def read(self, num_classes: int) -> Sample:
        """Read the image and its mask as a ``Sample``; a UserError names a file that does not fit."""
        image, mask = read_image(self.image, self.page), read_image(self.mask, self.page)
        where = f"{self.mask} page {self.page}" if self.page is not None else str(self.mask)
        if image.shape[:2] != mask.shape[:2]:
            raise UserError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image {self.name} is {image.shape[1]}x{image.shape[0]}")
        if self.mask_kind == "instances":
            instances = (mask[..., 0] if mask.ndim == 3 else mask).astype(np.int32)
            return Sample(image, (instances > 0).astype(np.uint8), instances, self.name)
        label = label_from_mask(mask, num_classes, where)
        return Sample(image, label, object_instances(label), self.name)


def read_image(path: Path, page: int | None = None) -> np.ndarray:
    """Pixels of an image file (PNG, JPEG, TIFF, BMP), as stored, or of one ``page`` of a multi-page
    TIFF (only that page is read); a UserError names an unreadable file."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            if page is None:
                return tifffile.imread(path)
            with tifffile.TiffFile(path) as tiff:
                return tiff.pages[page].asarray()
        return skimage.io.imread(path)
    except Exception as error:  # the readers raise many types for broken files
        raise UserError(f"{path}: cannot read this image ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; a UserError if there is none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def pair_by_stem(image_folder: Path, mask_folder: Path) -> list[tuple[Path, Path]]:
    """Each image with its mask: the mask file of the same stem, or of the stem plus ``_mask``."""
    masks: dict[str, list[Path]] = {}
    for path in image_files(mask_folder):
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        masks.setdefault(stem, []).append(path)
    pairs = []
    for image in image_files(image_folder):
        found = masks.get(image.stem, [])
        if not found:
            raise UserError(f"{image}: no mask named {image.stem}.* or {image.stem}_mask.* in {mask_folder}")
        if len(found) > 1:
            raise UserError(f"{image}: several masks match ({', '.join(p.name for p in found)}); keep one")
        pairs.append((image, found[0]))
    return pairs


def label_from_mask(mask: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """Class indices (H, W) uint8 from a mask file's pixels: 0/255 binary masks become 0/1.

    Masks must hold one channel (gray or identical RGB channels) of class indices 0..num_classes-1,
    or 0 and 255 only when there are two classes.
    """
    if mask.ndim == 3:
        if mask.shape[-1] in (3, 4) and np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2]):
            mask = mask[..., 0]
        else:
            raise UserError(f"{name}: mask is a colour image; save masks with one channel of class indices (0..{num_classes - 1}) or 0/255")
    values = np.unique(mask)
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    if values.min() < 0 or values.max() >= num_classes or not np.array_equal(values, np.round(values)):
        bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))][0]
        raise UserError(f"{name}: mask value {bad:g} is not a class of unet.num_classes={num_classes} (expected 0..{num_classes - 1}, or 0/255 for two classes)")
    return mask.astype(np.uint8)


def object_instances(label: np.ndarray) -> np.ndarray:
    """(H, W) int32 ids of the 4-connected components of every foreground class (0 on background)."""
    instances = np.zeros(label.shape, dtype=np.int32)
    for value in np.unique(label[label > 0]):
        components, count = measure.label(label == value, connectivity=1, return_num=True)
        instances[components > 0] = components[components > 0] + instances.max()
    return instances


def tiff_pages(path: Path) -> list[tuple[int, ...]]:
    """The shape of each page of a TIFF file, read from its tags (no pixels); a UserError names an unreadable file."""
    try:
        with tifffile.TiffFile(path) as tiff:
            return [page.shape for page in tiff.pages]
    except Exception as error:  # tifffile raises many types for broken files
        raise UserError(f"{path}: cannot read this TIFF ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def read_folder_pairs(image_folder: Path, mask_folder: Path, mask_kind: str = "classes") -> list[FileSample]:
    """Images and masks paired by stem (``pair_by_stem``), named by the image file."""
    return [FileSample(image.name, image, mask, mask_kind) for image, mask in pair_by_stem(image_folder, mask_folder)]


def read_isbi2012(root: Path) -> list[FileSample]:
    """The ISBI 2012 training slices: the challenge's TIFF stacks (a ``FileSample`` per page), or
    ``images/`` + ``labels/`` folders.

    Labels: 255 = cell interior -> class 1, 0 = membrane -> class 0; cells are the 4-connected
    components of class 1.
    """
    volume, labels = root / "train-volume.tif", root / "train-labels.tif"
    if volume.is_file():
        if not labels.is_file():
            raise UserError(f"{labels}: not found next to {volume.name}; ISBI 2012 needs both stacks")
        image_pages, label_pages = tiff_pages(volume), tiff_pages(labels)
        if image_pages != label_pages:
            raise UserError(f"{labels}: {len(label_pages)} pages of {label_pages[0]} px differ from {volume.name}'s {len(image_pages)} of {image_pages[0]}")
        return [FileSample(f"{volume.name} slice {index}", volume, labels, page=index) for index in range(len(image_pages))]
    for folder in (root, root / "train"):
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            return read_folder_pairs(folder / "images", folder / "labels")
    raise UserError(f"{root}: no ISBI 2012 data: expected train-volume.tif and train-labels.tif, or images/ and labels/ (see python dataset.py download isbi2012)")


def read_pennfudan(root: Path) -> tuple[list[FileSample], list[FileSample] | None]:
    """Penn-Fudan pedestrians: ``(training samples, validation samples or None)``.

    Reads the official layout (``PNGImages/``, ``PedMasks/``) or the common mirror's layout
    (``train_images/``, ``train_masks/``, ``valid_images/``, ``valid_masks/``, whose split is kept).
    Masks hold instance ids; every id > 0 is class 1 (person), and the ids are the instances.
    """
    if not (root / "PNGImages").is_dir() and (root / "PennFudanPed").is_dir():
        root = root / "PennFudanPed"
    if (root / "PNGImages").is_dir():
        return read_folder_pairs(root / "PNGImages", root / "PedMasks", "instances"), None
    if (root / "train_images").is_dir():
        return read_folder_pairs(root / "train_images", root / "train_masks", "instances"), read_folder_pairs(root / "valid_images", root / "valid_masks", "instances")
    raise UserError(f"{root}: no Penn-Fudan data: expected PNGImages/ and PedMasks/, or train_images/, train_masks/, valid_images/, valid_masks/ (python dataset.py download pennfudan)")
