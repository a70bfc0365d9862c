"""Segment image files with a trained model: a mask per input (and optionally probabilities and overlays).

For two classes a mask is a 0/255 PNG (255 = class 1; for ISBI 2012 the challenge's label convention),
for more classes a PNG of class indices; a multi-page TIFF gives a multi-page TIFF of masks. Images
pass through the preprocessing of training (``preprocess.normalize_image``) and the tiled predictor.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
import torch

from segmentation.config import UserError
from segmentation.console import note
from segmentation.data.preprocess import image_statistics, network_margin, normalize_image, row_axis
from segmentation.data.readers import (
    IMAGE_SUFFIXES,
    image_files,
    object_instances,
    read_image,
    tiff_pages,
)
from segmentation.inference.infer import Predictor, uniform_prediction_note

BAND_PIXELS = 16 * 2**20  # a single image with more pixels is predicted in bands of about this many rows x width

OVERLAY_COLOURS = np.array(
    [(0, 0, 0), (255, 60, 60), (60, 160, 255), (80, 220, 80), (255, 200, 40), (200, 80, 255)], dtype=np.float32
)


def input_images(path: Path) -> list[Path]:
    """The image files named by ``--input``: one file, or every image of a folder."""
    if path.is_dir():
        return image_files(path)
    if not path.is_file():
        raise UserError(f"--input {path}: no such file or folder")
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--input {path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
    return [path]


def image_pages(path: Path, channels: int) -> tuple[list[tuple[int, ...]], Iterator[np.ndarray]]:
    """``(shapes, pages)``: the shape of each image in ``path`` and an iterator that reads them one at
    a time, as stored: the pages of a multi-page TIFF, or the one image of any other file. A UserError
    names a file whose images have a channel count the model cannot take."""
    image = None
    if path.suffix.lower() in (".tif", ".tiff"):
        shapes = tiff_pages(path)  # from the tags: no pixels read yet
    else:
        image = read_image(path)
        shapes = [image.shape]
    shape = shapes[0]
    found = 1 if len(shape) == 2 else min(shape[0], shape[-1])  # channels first or last
    if found not in (1, 3, 4):
        raise UserError(f"{path}: an image of {found} channels; the model takes {channels} (unet.image_channels)")
    if found != channels and not (found == 4 and channels == 3):
        note(f"{path.name} has {found} channel(s), the model takes {channels}: converting it as training does")

    def pages() -> Iterator[np.ndarray]:
        if len(shapes) == 1:  # (3, H, W) in one page is one RGB image, not a stack
            yield read_image(path) if image is None else image
            return
        with tifffile.TiffFile(path) as tiff:  # open once: finding page k walks the pages before it
            for page in tiff.pages:
                yield page.asarray()

    return shapes, pages()


def mask_image(classes: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """(H, W) uint8 mask of (H, W) class indices (``infer.predicted_classes``): 0/255 for two classes
    (255 = class 1), else the class indices."""
    mask = classes.astype(np.uint8)
    if num_classes == 2:
        mask *= 255  # in place: a mask of a large image is a large array
    return mask


def overlay_image(image: np.ndarray, classes: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the input in gray or colour with each predicted class > 0 tinted in its colour."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = (
        pixels
        if pixels.ndim == 3 and pixels.shape[-1] >= 3
        else np.repeat(pixels.reshape(pixels.shape[:2] + (1,)), 3, axis=-1)
    )
    pixels = pixels[..., :3]
    pixels = 255 * (pixels - pixels.min()) / max(float(pixels.max() - pixels.min()), 1e-12)
    colours = OVERLAY_COLOURS[classes % len(OVERLAY_COLOURS)]
    tint = (classes > 0)[..., None]
    return np.where(tint, (1 - opacity) * pixels + opacity * colours, pixels).astype(np.uint8)


def predict_files(
    predictor: Predictor,
    inputs: list[Path],
    output: Path,
    probabilities: bool = False,
    overlay: bool = False,
    instances: bool = False,
) -> list[Path]:
    """Write a mask (and optionally probabilities, object ids and overlays) for every input, as
    ``predictor`` predicts and decides its pixels; returns the masks.

    A multi-page TIFF is read, predicted and written a page at a time, so memory follows one page,
    not the stack. Outputs are written under temporary names and renamed when complete: an
    interrupted run leaves no half-written mask. ``instances`` writes ``<name>_instances.tif``: uint16
    object ids, the 4-connected components of class 1 after the watershed cut of
    ``predict.watershed_seeds``.
    """
    channels = predictor.model.image_channels
    output.mkdir(parents=True, exist_ok=True)
    written, uniform, total = [], [], 0
    for path in inputs:
        shapes, pages = image_pages(path, channels)
        stack = len(shapes) > 1
        if not stack and plane_pixels(shapes[0]) > BAND_PIXELS:
            if instances:
                note(
                    f"{path.name}: no object ids for an image over {BAND_PIXELS // 2**20} Mpixel (it is predicted "
                    "in bands)"
                )
            image = tiff_memmap(path) if path.suffix.lower() in (".tif", ".tiff") else None
            written.append(
                predict_large_image(predictor, path, next(pages) if image is None else image, output, probabilities)
            )
            continue
        targets = {
            "mask": output / (path.stem + (".tif" if stack or path.suffix.lower() in (".tif", ".tiff") else ".png"))
        }
        if probabilities:
            targets["probability"] = output / f"{path.stem}_probability.tif"
        if instances:
            targets["instances"] = output / f"{path.stem}_instances.tif"
        if targets["mask"].resolve() == path.resolve():
            raise UserError(f"--output {output}: the mask would overwrite its input {path}; choose another folder")
        pixels = sum(plane_pixels(shape) for shape in shapes)
        bytes_per_pixel = {"mask": 1, "probability": 4, "instances": 2}
        with contextlib.ExitStack() as open_files:
            writers = {
                key: open_files.enter_context(
                    tifffile.TiffWriter(partial(target), bigtiff=needs_bigtiff(bytes_per_pixel[key] * pixels))
                )
                for key, target in targets.items()
                if target.suffix == ".tif"
            }
            for index, image in enumerate(pages):
                page = predict_page(
                    predictor, image, set(targets), f"{path.name}" + (f" page {index}" if stack else "")
                )
                for key, writer in writers.items():
                    writer.write(page[key], photometric="minisblack", contiguous=True)
                if "mask" not in writers:
                    skimage.io.imsave(partial(targets["mask"]), page["mask"], check_contrast=False)
                if overlay:
                    skimage.io.imsave(
                        output / (f"{path.stem}_{index:03d}_overlay.png" if stack else f"{path.stem}_overlay.png"),
                        overlay_image(image, page["classes"]),
                        check_contrast=False,
                    )
                uniform += [f"{path.name}" + (f" page {index}" if stack else "")] if page["uniform"] else []
                total += 1
        for target in targets.values():
            os.replace(partial(target), target)
        written.append(targets["mask"])
        print(f"{path} -> {targets['mask']}" + (f" ({len(shapes)} slices)" if stack else ""))
    if uniform:
        note(uniform_prediction_note(uniform, total, "predicted images"))
    return written


def predict_page(predictor: Predictor, image: np.ndarray, outputs: set[str], name: str) -> dict:
    """One image's ``classes`` (H, W) int64 and, as they are written, its ``mask``, its class-1
    ``probability`` (float32) and its object ids (``instances``, uint16) where ``outputs`` asks for
    them, and whether it is a single class everywhere (``uniform``)."""
    normalized = normalize_image(image, predictor.model.image_channels)
    result = predictor.probabilities(torch.from_numpy(normalized).to(predictor.device))
    wanted = predictor.decides_by_objects or ("instances" in outputs and predictor.model.num_classes == 2)
    objects = predictor.objects(result) if wanted else None
    classes = predictor.classes(result, objects).numpy()
    result = predictor.class_probabilities(result)
    page = {"classes": classes, "mask": mask_image(classes, result.shape[0]), "uniform": classes.min() == classes.max()}
    if "probability" in outputs:
        page["probability"] = result[1 if result.shape[0] > 1 else 0].numpy().astype(np.float32)
    if "instances" in outputs:
        objects = object_instances(classes) if objects is None else objects
        if objects.max() >= 2**16:
            raise UserError(
                f"{name}: {objects.max()} objects, more than a uint16 TIFF of object ids holds (65535): split the image"
            )
        page["instances"] = objects.astype(np.uint16)
    return page


def needs_bigtiff(data_bytes: int) -> bool:
    """Whether a TIFF of this much pixel data needs the BigTIFF format (classic TIFF ends at 4 GiB;
    a margin is left for the tags)."""
    return data_bytes > 2**32 - 2**26


def partial(path: Path) -> Path:
    """Where ``path`` is written until it is complete (same folder and suffix, so readers know the format)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def plane_pixels(shape: tuple[int, ...]) -> int:
    """Height x width of an image of ``shape`` (H, W), (H, W, C) or (C, H, W)."""
    axis = row_axis(shape)
    return shape[axis] * shape[axis + 1]


def tiff_memmap(path: Path) -> np.ndarray | None:
    """The pixels of a one-page TIFF memory-mapped (read only when used), or None where its layout
    does not allow it (compressed, not contiguous)."""
    try:
        return tifffile.memmap(path, mode="r")
    except ValueError:
        return None


def predict_large_image(
    predictor: Predictor, path: Path, image: np.ndarray, output: Path, probabilities: bool = False
) -> Path:
    """Predict one large image in bands of rows, each with enough rows of context above and below
    that its output rows see what they would see in one pass over the whole image, into memory-mapped
    output TIFFs (whatever the input's format): memory follows one band, not the image. With padding 0
    the result equals the whole image's; with padding 1 the tiles fall elsewhere within a band than
    within the whole image, and since each tile sees zero padding at its edges the blended
    probabilities differ slightly (as between two tile sizes). The watershed cut of
    ``predict.watershed_seeds`` runs per band (with its context); no overlay is written."""
    model = predictor.model
    channels, depth, padding = model.image_channels, model.depth, model.padding
    axis = row_axis(image.shape)
    height, width = image.shape[axis], image.shape[axis + 1]
    period = 2**depth
    # context: the network's reach (padding 0), or half a tile of blending (padding 1), in whole periods
    reach = network_margin(depth, padding) if padding == 0 else predictor.plan.predict_tile_size // 2
    context = -(-reach // period) * period
    band_rows = max(period, BAND_PIXELS // width // period * period)
    statistics = image_statistics(image, channels)
    mask_path, probability_path = output / f"{path.stem}.tif", output / f"{path.stem}_probability.tif"
    masks = tifffile.memmap(
        partial(mask_path),
        shape=(height, width),
        dtype=np.uint8,
        photometric="minisblack",
        bigtiff=needs_bigtiff(height * width),
    )
    cells = (
        tifffile.memmap(
            partial(probability_path),
            shape=(height, width),
            dtype=np.float32,
            photometric="minisblack",
            bigtiff=needs_bigtiff(4 * height * width),
        )
        if probabilities
        else None
    )
    for top in range(0, height, band_rows):
        start, bottom, stop = (
            max(0, top - context),
            min(height, top + band_rows),
            min(height, top + band_rows + context),
        )
        band = np.take(image, range(start, stop), axis=axis)
        normalized = normalize_image(band, channels, statistics)
        result = predictor.probabilities(torch.from_numpy(normalized).to(predictor.device))
        classes = predictor.classes(result).numpy()
        result = predictor.class_probabilities(result)
        masks[top:bottom] = mask_image(classes[top - start : bottom - start], result.shape[0])
        if cells is not None:
            cells[top:bottom] = result[1 if result.shape[0] > 1 else 0, top - start : bottom - start].numpy()
    masks.flush()
    os.replace(partial(mask_path), mask_path)
    if cells is not None:
        cells.flush()
        os.replace(partial(probability_path), probability_path)
    print(f"{path} -> {mask_path} ({height}x{width} px in bands of {band_rows} rows)")
    return mask_path
