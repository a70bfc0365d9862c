"""Image files: what each holds, read from its header (sizes, channels, the images of a TIFF's pages), checked
before its pixels take memory, then its pixels.

Every path that reads an image or mask file (training's readers, ``python dataset.py check``, ``test.py
--input``) goes through ``image_layout`` and ``layout_images``, so that one rule decides what a TIFF's pages
are (``tiff_image_pages``: a stack of images, or the channels of one), one limit refuses images too large
(``check_pixels``, ``train.max_image_pixels``, from the header) and one check refuses NaN or infinite pixels
(``check_finite``). Problems with a file are one-line ``UserError``s naming it (and its page).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import skimage.io
import tifffile

from segmentation.config import UserError
from segmentation.settings import DataSettings

DEFAULT_MAX_PIXELS = DataSettings.max_image_pixels  # train.max_image_pixels' default: 2**30 px
FINITE_CHUNK = 2**24  # values tested for NaN at a time: memory follows this, not the image
PIL_CHANNELS = {"1": 1, "L": 1, "I": 1, "I;16": 1, "I;16B": 1, "F": 1, "P": 3, "LA": 2}  # P: read as RGB
PIL_DTYPES = {"1": "bool", "I": "int32", "I;16": "uint16", "I;16B": "uint16", "F": "float32"}


@dataclass(frozen=True)
class ImageLayout:
    """What an image file holds, from its header alone (``image_layout``; no pixel read): its images, each
    of ``sizes`` (width, height) px and ``channels``; ``dtype``: the pixels' type as stored; ``pages``: for
    a TIFF, the pages of each image (one page, or the pages that are its channels: ``tiff_image_pages``),
    None for other formats (one image); ``palette``: a palette image (PNG, BMP); ``note``: how the pages
    were read where the user should know, else None."""

    path: Path
    sizes: tuple[tuple[int, int], ...]
    channels: tuple[int, ...]
    dtype: str
    pages: tuple[tuple[int, ...], ...] | None = None
    palette: bool = False
    note: str | None = None

    @property
    def count(self) -> int:
        """The number of images in the file: more than 1 for a stack."""
        return len(self.sizes)

    def where(self, index: int | None) -> str:
        """How messages name image ``index`` of the file: the file, and the page (or image) of a stack."""
        if index is None or self.count == 1:
            return str(self.path)
        return f"{self.path} {'image' if self.pages and len(self.pages[index]) > 1 else 'page'} {index}"


def image_layout(path: Path, channels: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageLayout:
    """The ``ImageLayout`` of an image file (PNG, JPEG, TIFF, BMP) from its header, its TIFF pages read as
    ``tiff_image_pages`` says for ``channels`` (``unet.image_channels``), and each image checked against
    ``max_pixels`` (``check_pixels``) before any pixel takes memory; a UserError names an unreadable file."""
    with reading(path):
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tiff:
                groups, message = tiff_image_pages(tiff, channels, path)
                sizes, counts = [], []
                for group in groups:
                    page = tiff.pages[group[0]]
                    axes, shape = page.axes, page.shape
                    sizes.append((shape[axes.index("X")], shape[axes.index("Y")]))
                    samples = int(np.prod([size for axis, size in zip(axes, shape) if axis not in "YX"]))
                    counts.append(len(group) * samples)
                dtype = str(tiff.pages[0].dtype)
            layout = ImageLayout(path, tuple(sizes), tuple(counts), dtype, tuple(groups), note=message)
        else:
            with PIL.Image.open(path) as image:
                mode, size, bands = image.mode, image.size, len(image.getbands())
            channels_found = PIL_CHANNELS.get(mode, bands)
            layout = ImageLayout(path, (size,), (channels_found,), PIL_DTYPES.get(mode, "uint8"), None, mode == "P")
    for index, size in enumerate(layout.sizes):
        check_pixels(layout.where(index), size, max_pixels)
    return layout


def tiff_image_pages(tiff: tifffile.TiffFile, channels: int, path: Path) -> tuple[list[tuple[int, ...]], str | None]:
    """The one rule for the pages of a TIFF: ``(the pages of each image, note)``.

    One page is one image (its samples, RGB or planar, are its channels). Several pages are a stack of
    images, a page each, unless ImageJ (``channels=``) or OME (``SizeC``) metadata says that pages are
    the channels of an image (then each image is its channels' pages), or the file has no such metadata
    and as many 2D pages of one size as ``channels`` (``unet.image_channels`` > 1): then they are the
    channels of one image, and ``note`` says so and which key changes it (else None)."""
    count = len(tiff.pages)
    if count == 1:
        return [(0,)], None
    if tiff.is_imagej or tiff.is_ome:
        series = tiff.series[0]
        lead = [(axis, size) for axis, size in zip(series.axes, series.shape) if axis not in "YXS"]
        axes, sizes = [axis for axis, _ in lead], [size for _, size in lead]
        if "C" not in axes or int(np.prod(sizes)) > count:
            return [(index,) for index in range(count)], None
        first = series.pages[0].index  # the series' pages follow one another in the file
        order = np.moveaxis(np.arange(int(np.prod(sizes))).reshape(sizes), axes.index("C"), -1)
        return [tuple(first + int(page) for page in row) for row in order.reshape(-1, sizes[axes.index("C")])], None
    shapes = {tiff.pages[index].shape for index in range(count)} if count == channels else set()
    if len(shapes) == 1 and len(shapes.pop()) == 2:
        return [tuple(range(count))], (
            f"{path}: read its {count} pages as the {count} channels of one image, as many as unet.image_channels "
            f"and no ImageJ or OME metadata says otherwise (with unet.image_channels: 1, a stack of {count} images)"
        )
    return [(index,) for index in range(count)], None


def tiff_spacing(path: Path) -> tuple[float, float, float] | None:
    """The voxel size ``(z, y, x)`` a TIFF stack's metadata states, in its unit, or None where it states no
    section spacing: OME's ``PhysicalSizeZ/Y/X``, or ImageJ's ``spacing`` with the X and Y resolution tags
    (pixels per unit; a missing in-plane size is taken as 1)."""
    with reading(path), tifffile.TiffFile(path) as tiff:
        if tiff.is_ome:
            pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", tiff.ome_metadata or "")
            found = {} if pixels is None else dict(re.findall(r'PhysicalSize([XYZ])="([^"]+)"', pixels.group(0)))
            if "Z" in found:
                return float(found["Z"]), float(found.get("Y", 1.0)), float(found.get("X", 1.0))
        if tiff.is_imagej and (tiff.imagej_metadata or {}).get("spacing"):
            page = tiff.pages[0]
            sizes = []
            for tag in ("YResolution", "XResolution"):
                resolution = page.tags.get(tag)
                numerator, denominator = resolution.value if resolution is not None else (1, 1)
                sizes.append(denominator / numerator if numerator else 1.0)
            return float(tiff.imagej_metadata["spacing"]), float(sizes[0]), float(sizes[1])
    return None


def check_pixels(where: str, size: tuple[int, int], max_pixels: int) -> None:
    """A UserError where an image of ``size`` (width, height) px has more pixels than ``max_pixels``
    (``train.max_image_pixels``): checked from the header, before its pixels take memory."""
    width, height = size
    if width * height > max_pixels:
        raise UserError(
            f"{where}: {width} x {height} px ({width * height / 1e6:.4g} Mpx) is more than train.max_image_pixels "
            f"({max_pixels}): raise it if memory allows, or split the image"
        )


def check_finite(image: np.ndarray, where: str) -> None:
    """A UserError where a float image holds NaN or infinite values: the network would turn every probability
    into NaN. Counted ``FINITE_CHUNK`` values at a time, so that a memory-mapped image is not copied whole."""
    if image.dtype.kind not in "fc":
        return
    flat = image.reshape(-1)
    bad = sum(
        int(np.count_nonzero(~np.isfinite(flat[start : start + FINITE_CHUNK])))
        for start in range(0, flat.size, FINITE_CHUNK)
    )
    if bad:
        raise UserError(
            f"{where}: {bad} {'pixels' if image.ndim == 2 else 'pixel values'} are NaN or infinite: replace them "
            "(e.g. with 0) before training or predicting"
        )


@contextlib.contextmanager
def reading(path: Path) -> Iterator[None]:
    """Read an image file: errors of the image libraries become one-line UserErrors naming ``path``, and
    PIL's decompression-bomb guard is off, so that ``train.max_image_pixels`` (``check_pixels``) decides."""
    limit, PIL.Image.MAX_IMAGE_PIXELS = PIL.Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    except UserError:
        raise
    except Exception as error:  # the readers raise many types for broken files
        raise UserError(
            f"{path}: cannot read this image ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    finally:
        PIL.Image.MAX_IMAGE_PIXELS = limit


def layout_images(layout: ImageLayout, indices: Sequence[int] | None = None, palette: bool = False) -> Iterator:
    """The pixels of the images of ``layout`` (all, or ``indices``), one at a time, as stored: (H, W),
    (H, W, C), or (C, H, W) for planar pages and pages that are channels; a TIFF is opened once and only
    the pages asked for are read. ``palette``: a palette image gives its indices, not its colours. A
    UserError names an unreadable file, or an image with NaN or infinite values (``check_finite``)."""
    with contextlib.ExitStack() as files:
        tiff = None
        if layout.pages is not None:
            with reading(layout.path):
                tiff = files.enter_context(tifffile.TiffFile(layout.path))
        for index in range(layout.count) if indices is None else indices:
            with reading(layout.path):
                if tiff is not None:
                    pages = [tiff.pages[page].asarray() for page in layout.pages[index]]
                    image = pages[0] if len(pages) == 1 else np.stack(pages)
                elif palette and layout.palette:
                    with PIL.Image.open(layout.path) as opened:
                        image = np.array(opened)
                else:
                    image = skimage.io.imread(layout.path)
            check_finite(image, layout.where(index))
            yield image


def layout_image(layout: ImageLayout, page: int | None = None, palette: bool = False) -> np.ndarray:
    """The pixels of image ``page`` of ``layout`` (``layout_images``; ``page`` None for a file of one image).
    A UserError names a stack where one image is expected, or a page it does not hold."""
    if page is None and layout.count > 1:
        raise UserError(f"{layout.path}: a stack of {layout.count} images where one image is expected")
    if page is not None and not 0 <= page < layout.count:
        raise UserError(f"{layout.path}: no page {page}; it holds {layout.count} image(s)")
    (image,) = layout_images(layout, [page or 0], palette)
    return image


def tiff_memmap(path: Path) -> np.ndarray | None:
    """The pixels of a TIFF (one page, or a stack of same-shaped pages) memory-mapped, read only where used, or
    None where its layout does not allow it (compressed, not contiguous)."""
    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:
        return None
