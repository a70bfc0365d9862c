"""Reading annotated images from disk: the layouts of ISBI 2012, Penn-Fudan and a folder of images and masks.

Listing a data set reads no pixels (a TIFF's header, to count the images of a stack): each reader returns
``FileSample``s, which say where an image and its mask lie and how the mask is read; ``FileSample.read``
reads one of them when it is needed (the preprocessing cache reads each image once), through
``images.py`` (one rule for TIFF pages, the pixel limit, the finite check). Problems with a file are
one-line ``UserError``s naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from skimage import measure

from losses import IGNORE_LABEL
from segmentation.config import UserError
from segmentation.console import note as console_note
from segmentation.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageLayout,
    image_layout,
    layout_image,
    layout_images,
    tiff_spacing,
)
from segmentation.settings import DataSettings

LISTED_VALUES = 9  # distinct values of a mask kept to name in messages (the 9th says there are more)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Sample:
    """One annotated image as read from disk: ``image`` (H, W) or (H, W, C) of the file's dtype,
    ``label`` (H, W) uint8 class indices, ``instances`` (H, W) int32 object ids (0 = none) for the
    weight map, ``name`` (file or slice) for messages, ``mask_read_as``: how its mask was read
    (``classes`` or ``instances``; ``generated`` for synthetic images), and, where ``train.mask_type:
    auto`` decided that per mask, ``mask_values``: its first distinct values (at most ``LISTED_VALUES``),
    so that the data set can be checked to read one way (``dataset.one_mask_reading``). A volume's arrays are
    its sections stacked first: ``image`` (D, H, W), (D, H, W, C) or (D, C, H, W), ``label`` and ``instances``
    (D, H, W); ``spacing`` its voxel size (z, y, x) where known (the file's metadata, or the data set's)."""

    image: np.ndarray
    label: np.ndarray
    instances: np.ndarray
    name: str
    mask_read_as: str = "classes"
    mask_values: tuple[float, ...] = ()
    spacing: tuple[float, ...] | None = None


@dataclass(frozen=True)
class MaskSettings:
    """What reading a mask depends on: ``unet.num_classes`` and ``train.mask_type``, ``mask_values``,
    ``mask_colors``, ``ignore_value`` and ``ignore_color`` (see ``label_from_mask``)."""

    num_classes: int = 2
    mask_type: str = "auto"
    mask_values: Sequence[float] | None = None
    mask_colors: Sequence[Sequence[int]] | None = None
    ignore_value: float | None = None
    ignore_color: Sequence[int] | None = None

    @classmethod
    def from_settings(cls, num_classes: int, data: DataSettings) -> MaskSettings:
        """The mask settings of a config: ``unet.num_classes`` and the data settings' mask keys."""
        masks = (data.mask_type, data.mask_values, data.mask_colors, data.ignore_value, data.ignore_color)
        return cls(num_classes, *masks)

    def unannotated(self, mask: np.ndarray, volume: bool = False) -> np.ndarray | None:
        """(H, W) bool: the pixels of a mask as stored (gray (H, W), or colour (H, W, 3|4); a gray volume's
        (D, H, W) where ``volume``) that nobody annotated (``train.ignore_value``, or ``ignore_color`` for colour
        masks); None where none are set apart."""
        if mask.ndim == 3 and mask.shape[-1] in (3, 4) and not volume:
            if self.ignore_color is not None:
                return colour_codes(mask) == colour_code(self.ignore_color)
            # a gray mask stored as RGB holds the ignore value in every channel
            return None if self.ignore_value is None else (mask[..., :3] == self.ignore_value).all(axis=-1)
        return None if self.ignore_value is None else mask == self.ignore_value


@dataclass(frozen=True)
class FileSample:
    """One annotated image on disk, not yet read: ``image`` and ``mask`` files (``page``: the image's index
    in a TIFF stack and the mask's page, as ``image_layout`` counts them; None for single images) and how
    its data set's masks are read by default (``mask_kind``: ``auto``, ``classes`` or ``instances``;
    ``train.mask_type`` overrides it unless that is auto); ``channels`` (``unet.image_channels``) and
    ``max_pixels`` (``train.max_image_pixels``) as reading the files needs them."""

    name: str
    image: Path
    mask: Path
    mask_kind: str = "auto"
    page: int | None = None
    channels: int = 1
    max_pixels: int = DEFAULT_MAX_PIXELS
    sections: tuple[int, int] | None = None
    spacing: tuple[float, ...] | None = None

    @property
    def volume(self) -> bool:
        """Whether this sample is a volume: sections ``sections`` (start, stop) of the files' stacks."""
        return self.sections is not None

    def identity(self) -> list:
        """What the pixels depend on: the files (resolved path, size, modification time in ns), the
        page (or a volume's sections and spacing) and the mask kind; a changed file gives a new identity."""
        files = []
        for path in (self.image, self.mask):
            status = path.stat()
            files.append([str(path.resolve()), status.st_size, status.st_mtime_ns])
        volume = [list(self.sections), self.spacing] if self.volume else []
        return ["file", files, self.page, self.mask_kind, *volume]

    def read(self, settings: MaskSettings) -> Sample:
        """Read the image and its mask as a ``Sample``, the mask as ``settings`` say; a UserError names
        a file that does not fit (sizes compared from the headers, before the pixels are read)."""
        if self.volume:
            return self.read_volume(settings)
        images = image_layout(self.image, self.channels, self.max_pixels)
        masks = image_layout(self.mask, 1, self.max_pixels)
        problem = size_mismatch(images, masks, self.page, self.name)
        if problem:
            raise UserError(problem)
        image, mask = layout_image(images, self.page), layout_image(masks, self.page, palette=True)
        where = masks.where(self.page)
        kind = settings.mask_type if settings.mask_type != "auto" else self.mask_kind
        label, instances, read_as = label_from_mask(mask, settings, where, kind)
        decided = kind == "auto" and settings.mask_values is None and mask.ndim == 2
        annotated = mask if settings.ignore_value is None or not decided else mask[mask != settings.ignore_value]
        values = tuple(np.unique(annotated)[:LISTED_VALUES].tolist()) if decided else ()
        return Sample(image, label, instances, self.name, read_as, values)

    def read_volume(self, settings: MaskSettings) -> Sample:
        """Read sections ``sections`` of the image and mask stacks as one volume (``Sample``)."""
        images = image_layout(self.image, self.channels, self.max_pixels)
        masks = image_layout(self.mask, 1, self.max_pixels)
        start, stop = self.sections
        for page in range(start, stop):
            problem = size_mismatch(images, masks, page, self.name)
            if problem:
                raise UserError(problem)
        image = np.stack(list(layout_images(images, range(start, stop))))
        mask = np.stack(list(layout_images(masks, range(start, stop), palette=True)))
        if mask.ndim != 3:
            raise UserError(f"{self.mask}: a mask stack of sections of shape {mask.shape[1:]}; expected gray sections")
        kind = settings.mask_type if settings.mask_type != "auto" else self.mask_kind
        label, instances, read_as = label_from_mask(mask, settings, str(self.mask), kind, volume=True)
        return Sample(image, label, instances, self.name, read_as, (), self.spacing)


def size_mismatch(image: ImageLayout, mask: ImageLayout, page: int | None, name: str) -> str | None:
    """The line that names a mask whose size (width x height, from the headers) differs from its image's,
    for image ``page`` of the files (None: one image); None where they agree."""
    if not (page or 0) < min(image.count, mask.count):
        return pages_mismatch(image, mask, name) or f"{mask.path}: no page {page}; it holds {mask.count} image(s)"
    (width, height), (mask_width, mask_height) = image.sizes[page or 0], mask.sizes[page or 0]
    if (width, height) == (mask_width, mask_height):
        return None
    return f"{mask.where(page)}: mask is {mask_width}x{mask_height} px but its image {name} is {width}x{height}"


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; a UserError if there is none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = sorted(
        path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    )
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def pair_by_stem(image_folder: Path, mask_folder: Path) -> list[tuple[Path, Path]]:
    """Each image with its mask: the mask file of the same stem, or of the stem plus ``_mask``; a
    UserError names the first image without exactly one mask."""
    pairs, problems, _ = match_by_stem(image_folder, mask_folder)
    if problems:
        raise UserError(problems[0])
    return pairs


def match_by_stem(image_folder: Path, mask_folder: Path) -> tuple[list[tuple[Path, Path]], list[str], list[Path]]:
    """``(pairs, problems, masks without an image)``: the images with exactly one mask of the same
    stem (or the stem plus ``_mask``), a line per image with none or several and per mask that several
    images match (``c0.png`` and ``c0.tif``), and the unused masks."""
    masks: dict[str, list[Path]] = {}
    for path in image_files(mask_folder):
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        masks.setdefault(stem, []).append(path)
    pairs, problems, images = [], [], image_files(image_folder)
    twins: dict[str, list[Path]] = {}
    for image in images:
        twins.setdefault(image.stem, []).append(image)
    for image in images:
        found, same_stem = masks.get(image.stem, []), twins[image.stem]
        if not found:
            problems.append(f"{image}: no mask named {image.stem}.* or {image.stem}_mask.* in {mask_folder}")
        elif len(found) > 1:
            problems.append(f"{image}: several masks match ({', '.join(p.name for p in found)}); keep one")
        elif len(same_stem) > 1:
            if image == same_stem[0]:
                others = " and ".join(path.name for path in same_stem[1:])
                problems.append(
                    f"{image} and {others}: {len(same_stem)} images match the one mask {found[0]}; keep one image, "
                    "or rename the others and give each its own mask"
                )
        else:
            pairs.append((image, found[0]))
    stems = {image.stem for image in images}
    return pairs, problems, [path for stem, paths in masks.items() if stem not in stems for path in paths]


def label_from_mask(
    mask: np.ndarray, settings: MaskSettings, name: str, kind: str = "auto", volume: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """``(label, instances, read_as)`` of a mask's values: (H, W) uint8 class indices (``IGNORE_LABEL``
    where nobody annotated: ``settings.unannotated``), (H, W) int32 object ids for the weight map (0
    there), and ``classes`` or ``instances``. The unannotated pixels are set apart before the rest is read
    as the mask's kind says, so that they decide nothing (a region of them in a mask of object ids is no
    object; the objects around it are).

    - RGB masks map colours to classes by ``mask_colors`` (``[[r, g, b], ...]``, class i = colour i);
      gray masks stored as RGB (equal channels) are gray.
    - ``mask_values`` maps gray values to classes (class i = value i), e.g. ``[0, 128, 255]``.
    - ``kind`` ``instances``: one integer id per object, 0 = background; class 1 where id > 0 (two
      classes), but for a 1 px line where two objects touch (``separation_lines``). ``classes``: class
      indices 0..num_classes-1, or 0/255 (and 0/1, 0.0/1.0) for two classes; objects are the
      4-connected components of each class. ``auto``: instances when there
      are two classes and the mask holds other values than 0/1 or 0/255, else classes.

    ``volume``: ``mask`` is a (D, H, W) stack of gray sections of one volume (objects and their ids span
    sections; colour masks are read section by section only in 2D).

    A value or colour outside the mapping is a UserError that lists the values found and the key to set.
    """
    unannotated = settings.unannotated(mask, volume)
    if unannotated is None or not unannotated.any():
        return annotated_label(mask, settings, name, kind, volume)
    standing_in = stand_in(mask, unannotated, settings, volume)
    label, instances, read_as = annotated_label(standing_in, settings, name, kind, volume)
    label[unannotated], instances[unannotated] = IGNORE_LABEL, 0
    return label, instances, read_as


def stand_in(mask: np.ndarray, unannotated: np.ndarray, settings: MaskSettings, volume: bool = False) -> np.ndarray:
    """A copy of ``mask`` whose ``unannotated`` pixels hold the value (or colour) of class 0, the background:
    read like that they split no object and add no class, and they are marked unannotated afterwards."""
    mask = mask.copy()
    if mask.ndim == 3 and not volume:
        background = settings.mask_colors[0] if settings.mask_colors is not None else (0, 0, 0)
        mask[unannotated, :3] = background
    else:
        mask[unannotated] = settings.mask_values[0] if settings.mask_values is not None else 0
    return mask


def annotated_label(
    mask: np.ndarray, settings: MaskSettings, name: str, kind: str = "auto", volume: bool = False
) -> tuple[np.ndarray, np.ndarray, str]:
    """``label_from_mask`` of a mask whose every pixel is annotated."""
    num_classes = settings.num_classes
    if volume:
        if mask.ndim != 3:
            raise UserError(f"{name}: a mask volume of shape {mask.shape}; expected gray sections (D, H, W)")
    elif mask.ndim == 3 and mask.shape[-1] in (3, 4):
        if settings.mask_colors is not None:
            codes = [colour_code(colour) for colour in settings.mask_colors]
            label = mapped(colour_codes(mask), codes, name, "colour", "train.mask_colors", colours_of(mask))
            return label, object_instances(label), "classes"
        if not (np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2])):
            raise UserError(
                f"{name}: mask is a colour image with the colours {listed(colours_of(mask))}: set "
                "train.mask_colors: [[r, g, b], ...] (class i = colour i), or save masks with one channel of "
                "class indices"
            )
        mask = mask[..., 0]
    elif mask.ndim != 2:
        raise UserError(f"{name}: a mask of shape {mask.shape}; expected one channel (H, W) or RGB (H, W, 3)")
    values = np.unique(mask)
    if settings.mask_values is not None:
        label = mapped(mask, list(settings.mask_values), name, "value", "train.mask_values", values.tolist())
        return label, object_instances(label), "classes"
    integers = bool(np.all(values == np.round(values))) and values.min() >= 0
    binary = set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}
    if kind == "auto":
        kind = "instances" if num_classes == 2 and integers and not binary else "classes"
    if kind == "instances":
        if not integers:
            raise UserError(f"{name}: instance masks hold integer ids >= 0, found {listed(values.tolist())}")
        instances = mask.astype(np.int32)
        instances[separation_lines(instances)] = 0
        return (instances > 0).astype(np.uint8), instances, "instances"
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
        label = (mask == 255).astype(np.uint8)
        return label, object_instances(label), "classes"
    if not integers or values.max() >= num_classes:
        bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))][0]
        hint = (
            f"train.mask_values: {values.tolist()} maps them to classes 0..{num_classes - 1}"
            if len(values) == num_classes
            else f"set train.mask_values to map {num_classes} values to classes 0..{num_classes - 1}"
        )
        raise UserError(
            f"{name}: mask value {bad:g} is not a class of unet.num_classes={num_classes} (values found: "
            f"{listed(values.tolist())}; expected 0..{num_classes - 1}, or 0/255 for two classes): {hint}"
        )
    label = mask.astype(np.uint8)
    return label, object_instances(label), "classes"


def separation_lines(instances: np.ndarray) -> np.ndarray:
    """(H, W) or (D, H, W) bool: the pixels of an object that touch another object (4-neighbours, the one of the
    larger id), a line 1 px wide between touching objects. As background they separate the objects
    in the label, as the paper's cell masks do, and the border term of the weight map weighs them."""
    lines = np.zeros(instances.shape, dtype=bool)
    for axis in range(instances.ndim):  # (D, H, W) volumes: 6-neighbours
        here = [slice(None)] * instances.ndim
        there = [slice(None)] * instances.ndim
        here[axis], there[axis] = slice(1, None), slice(None, -1)
        a, b = instances[tuple(here)], instances[tuple(there)]
        touching = (a > 0) & (b > 0) & (a != b)
        lines[tuple(here)] |= touching & (a > b)
        lines[tuple(there)] |= touching & (b > a)
    return lines


def colour_code(colour) -> int:
    """An RGB colour ``[r, g, b]`` as one integer ``r * 65536 + g * 256 + b``."""
    return int(colour[0]) << 16 | int(colour[1]) << 8 | int(colour[2])


def colours_of(mask: np.ndarray) -> list[list[int]]:
    """The distinct ``[r, g, b]`` colours of an (H, W, 3 or 4) mask, sorted."""
    return [[int(code) >> 16, int(code) >> 8 & 255, int(code) & 255] for code in np.unique(colour_codes(mask))]


def colour_codes(mask: np.ndarray) -> np.ndarray:
    """(H, W) int64 ``colour_code`` of each pixel of an (H, W, 3 or 4) mask (alpha ignored)."""
    rgb = mask[..., :3].astype(np.int64)
    return rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]


def mapped(values: np.ndarray, table: list, name: str, what: str, key: str, found: list) -> np.ndarray:
    """(H, W) uint8: the index in ``table`` of each of ``values``; a UserError lists what was found
    when a value is not in the table."""
    keys = np.asarray(table, dtype=np.float64)
    order = np.argsort(keys)
    positions = np.clip(np.searchsorted(keys[order], values), 0, len(keys) - 1)
    known = keys[order][positions] == values
    if not np.all(known):
        bad = values[~known].flat[0]
        shown = [int(bad) >> 16, int(bad) >> 8 & 255, int(bad) & 255] if what == "colour" else f"{bad:g}"
        raise UserError(f"{name}: mask {what} {shown} is not in {key} (found: {listed(found)}): add it to {key}")
    return order[positions].astype(np.uint8)


def listed(items: list, shown: int = 8) -> str:
    """The first ``shown`` items, and how many there are in all when there are more."""
    return ", ".join(str(item) for item in items[:shown]) + (
        f", ... ({len(items)} in all)" if len(items) > shown else ""
    )


def object_instances(label: np.ndarray) -> np.ndarray:
    """(H, W) int32 ids of the 4-connected components of every foreground class (0 on background):
    scikit-image's labelling of the regions of equal value."""
    return measure.label(label, background=0, connectivity=1).astype(np.int32)


def pair_samples(
    image: Path,
    mask: Path,
    mask_kind: str = "auto",
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    unit: str = "page",
) -> tuple[list[FileSample], str | None]:
    """``(samples, note)`` of an image file and its mask: one sample, or for a TIFF stack (pages read as
    ``tiff_image_pages`` says for ``channels``) a sample per image paired with the same page of the mask's
    stack, named ``<name> <unit> <index>`` (``image`` where its pages are channels); ``note``: how the
    image's pages were read, where the user should know. Only TIFF headers are read; a UserError names a
    mask whose pages do not match its image's."""
    name = name or image.name
    tiffs = image.suffix.lower() in (".tif", ".tiff") or mask.suffix.lower() in (".tif", ".tiff")
    images = image_layout(image, channels, max_pixels) if tiffs else None
    masks = image_layout(mask, 1, max_pixels) if tiffs else None
    if images is None or images.count == masks.count == 1:
        return [
            FileSample(name, image, mask, mask_kind, None, channels, max_pixels)
        ], None if images is None else images.note
    problem = pages_mismatch(images, masks, name)
    if problem:
        raise UserError(problem)
    unit = unit if all(len(pages) == 1 for pages in images.pages) else "image"  # an image of several pages
    return [
        FileSample(f"{name} {unit} {index}", image, mask, mask_kind, index, channels, max_pixels)
        for index in range(images.count)
    ], images.note


def volume_samples(
    image: Path,
    mask: Path,
    mask_kind: str = "auto",
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    spacing: Sequence[float] | None = None,
    blocks: int = 1,
) -> tuple[list[FileSample], str | None]:
    """``(samples, note)`` of a TIFF stack and its mask stack read as a volume (``unet.dims: 3``): one sample, or
    ``blocks`` samples of contiguous sections (for splits and folds along z), named ``<image> sections a-b``.
    The voxel size is ``spacing`` where given (``train.spacing``, or the data set's), else the file's metadata's
    (``images.tiff_spacing``), else isotropic, with a ``note`` saying so and naming the key that sets it. A UserError
    names a file that is no stack (a 2D image for a 3D model) or a mask stack of another length."""
    images, masks = image_layout(image, channels, max_pixels), image_layout(mask, 1, max_pixels)
    if images.count < 2:
        raise UserError(
            f"{image}: one 2D image, but unet.dims: 3 trains on volumes: give a TIFF stack per volume (an image "
            "and a mask stack of as many sections), or set unet.dims: 2"
        )
    problem = pages_mismatch(images, masks, image.name)
    if problem:
        raise UserError(problem)
    found, note = tiff_spacing(image) if spacing is None else tuple(float(size) for size in spacing), None
    if found is None:
        found = (1.0, 1.0, 1.0)
        note = (
            f"{image}: its metadata states no voxel spacing; assumed isotropic voxels (1, 1, 1): set train.spacing: "
            "[z, y, x] if its sections are thicker than its pixels are wide"
        )
    bounds = np.linspace(0, images.count, min(blocks, images.count) + 1).round().astype(int)
    name = image.name
    samples = [
        FileSample(
            name if blocks == 1 else f"{name} sections {start}-{stop - 1}",
            image,
            mask,
            mask_kind,
            None,
            channels,
            max_pixels,
            (int(start), int(stop)),
            found,
        )
        for start, stop in zip(bounds[:-1], bounds[1:])
    ]
    return samples, note


def pages_mismatch(images: ImageLayout, masks: ImageLayout, name: str) -> str | None:
    """The line that names a mask that does not hold one page per image of its image file; else None."""
    if images.count == masks.count:
        return None
    how = f" ({images.note.partition(': ')[2]})" if images.note else ""
    return (
        f"{masks.path}: {masks.count} page(s) but its image {name} holds {images.count} image(s){how}: a stack of "
        "images needs a stack of masks, one page per image"
    )


def read_folder_pairs(
    image_folder: Path,
    mask_folder: Path,
    mask_kind: str = "auto",
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    note: Callable[[str], None] = console_note,
    dims: int = 2,
    spacing: Sequence[float] | None = None,
) -> list[FileSample]:
    """Images and masks paired by stem (``pair_by_stem``), named by the image file, a TIFF stack giving a
    sample per image (``pair_samples``), or with ``dims`` 3 a volume each (``volume_samples``, ``spacing``
    where given, else its metadata's); how TIFF pages were read, or what spacing was assumed, where the user should
    know, goes to ``note`` (once, for the first such file)."""
    samples, notes = [], []
    for image, mask in pair_by_stem(image_folder, mask_folder):
        if dims == 3:
            found, message = volume_samples(image, mask, mask_kind, channels, max_pixels, spacing)
        else:
            found, message = pair_samples(image, mask, mask_kind, channels, max_pixels)
        samples += found
        notes += [message] if message else []
    if notes:
        note(notes[0] + (f"; the same for {len(notes) - 1} more file(s)" if len(notes) > 1 else ""))
    return samples


ISBI_SPACING = (50.0, 4.0, 4.0)  # nm (z, y, x): serial-section TEM of the Drosophila ventral nerve cord
ISBI_BLOCKS = 10  # as a volume: blocks of 3 contiguous sections, the units of its splits (5 folds: 2 blocks each)


def read_isbi2012(
    root: Path,
    channels: int = 1,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    note: Callable[[str], None] = console_note,
    dims: int = 2,
    spacing: Sequence[float] | None = None,
) -> list[FileSample]:
    """The ISBI 2012 training slices: the challenge's TIFF stacks (a ``FileSample`` per page), or
    ``images/`` + ``labels/`` folders. ``dims`` 3: the stacks as one volume of ``ISBI_SPACING`` (or
    ``spacing``), in ``ISBI_BLOCKS`` samples of contiguous sections.

    Labels: 255 = cell interior -> class 1, 0 = membrane -> class 0; cells are the 4-connected
    components of class 1.
    """
    volume, labels = root / "train-volume.tif", root / "train-labels.tif"
    if volume.is_file():
        if not labels.is_file():
            raise UserError(f"{labels}: not found next to {volume.name}; ISBI 2012 needs both stacks")
        if dims == 3:
            return volume_samples(
                volume, labels, "classes", channels, max_pixels, spacing or ISBI_SPACING, ISBI_BLOCKS
            )[0]
        samples, message = pair_samples(volume, labels, "classes", channels, max_pixels, volume.name, "slice")
        if message:
            note(message)
        return samples
    for folder in (root, root / "train"):
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            folders = (folder / "images", folder / "labels", "classes", channels, max_pixels, note)
            return read_folder_pairs(*folders, dims, spacing or ISBI_SPACING)
    raise UserError(
        f"{root}: no ISBI 2012 data: expected train-volume.tif and train-labels.tif, or images/ and labels/ (see "
        "python dataset.py download isbi2012)"
    )


def read_pennfudan(
    root: Path, channels: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, note: Callable[[str], None] = console_note
) -> tuple[list[FileSample], list[FileSample] | None]:
    """Penn-Fudan pedestrians: ``(training samples, validation samples or None)``.

    Reads the official layout (``PNGImages/``, ``PedMasks/``) or the common mirror's layout
    (``train_images/``, ``train_masks/``, ``valid_images/``, ``valid_masks/``, whose split is kept).
    Masks hold instance ids; every id > 0 is class 1 (person), and the ids are the instances.
    """
    if not (root / "PNGImages").is_dir() and (root / "PennFudanPed").is_dir():
        root = root / "PennFudanPed"
    if (root / "PNGImages").is_dir():
        return read_folder_pairs(root / "PNGImages", root / "PedMasks", "instances", channels, max_pixels, note), None
    if (root / "train_images").is_dir():
        return tuple(
            read_folder_pairs(root / f"{part}_images", root / f"{part}_masks", "instances", channels, max_pixels, note)
            for part in ("train", "valid")
        )
    raise UserError(
        f"{root}: no Penn-Fudan data: expected PNGImages/ and PedMasks/, or train_images/, train_masks/, "
        "valid_images/, valid_masks/ (python dataset.py download pennfudan)"
    )
