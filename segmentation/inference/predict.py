"""Segment image files with a trained model: a mask per input (and optionally probabilities and overlays).

For two classes a mask is a 0/255 PNG (255 = class 1; for ISBI 2012 the challenge's label convention),
for more classes a PNG of class indices; a multi-page TIFF gives a multi-page TIFF of masks. Images
pass through the preprocessing of training (``preprocess.normalize_image``) and the tiled predictor.
Inputs are read as training reads them (``data.images``: the TIFF pages rule, ``train.max_image_pixels``
from the headers, NaN refused); outputs are named by the input's stem, or by its whole name where inputs
share a stem, and never overwrite an input or each other.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
import torch
from torch import Tensor

from segmentation.config import UserError
from segmentation.console import note
from segmentation.data.images import (
    DEFAULT_MAX_PIXELS,
    ImageLayout,
    check_finite,
    image_layout,
    layout_image,
    layout_images,
    tiff_memmap,
)
from segmentation.data.preprocess import image_statistics, network_margin, normalize_image, row_axis
from segmentation.data.readers import IMAGE_SUFFIXES, image_files, object_instances
from segmentation.inference.infer import Predictor, uniform_prediction_note
from segmentation.inference.volumes import predict_volume

BAND_PIXELS = 16 * 2**20  # a single image with more pixels is predicted in bands of about this many rows x width
BYTES_PER_PIXEL = {"mask": 1, "probability": 4, "instances": 2}  # of the TIFF outputs, for the BigTIFF decision

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


def input_layout(path: Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageLayout:
    """The ``images.ImageLayout`` of an input from its header (its TIFF pages read as the model's
    ``channels`` say, each image within ``max_pixels``); a UserError names a file whose images have a
    channel count the model cannot take, a note one it converts and how a TIFF's pages were read."""
    layout = image_layout(path, channels, max_pixels)
    for found in sorted(set(layout.channels)):
        if found not in (1, 3, 4):
            raise UserError(f"{path}: an image of {found} channels; the model takes {channels} (unet.image_channels)")
        if found != channels and not (found == 4 and channels == 3):
            note(f"{path.name} has {found} channel(s), the model takes {channels}: converting it as training does")
    if layout.note:
        note(layout.note)
    return layout


def is_large(layout: ImageLayout) -> bool:
    """Whether an input is one image of more than ``BAND_PIXELS`` pixels, predicted in bands."""
    return layout.count == 1 and layout.sizes[0][0] * layout.sizes[0][1] > BAND_PIXELS


def output_targets(
    inputs: list[Path], layouts: list[ImageLayout], output: Path, outputs: set[str]
) -> list[dict[str, Path]]:
    """Where each input's outputs go: ``{key: path}``, keys ``mask``, and from ``outputs`` ``probability``,
    ``instances`` and ``overlay`` (``overlay <index>`` for each image of a stack; large images get
    neither ids nor overlays). Outputs are named by the input's stem, or by its whole name where inputs
    share a stem (``a.png`` and ``a.jpg``: ``a.png.png``, ``a.jpg.png``, ``a.png_probability.tif``). A
    UserError, before anything is written, where two outputs would be one file or an output an input."""
    stems = Counter(path.stem for path in inputs)
    every = []
    for path, layout in zip(inputs, layouts):
        name, stack, large = path.name if stems[path.stem] > 1 else path.stem, layout.count > 1, is_large(layout)
        tiff = stack or large or path.suffix.lower() in (".tif", ".tiff")
        targets = {"mask": output / f"{name}{'.tif' if tiff else '.png'}"}
        if "probability" in outputs:
            targets["probability"] = output / f"{name}_probability.tif"
        if "instances" in outputs and not large:
            targets["instances"] = output / f"{name}_instances.tif"
        if "overlay" in outputs and not large:
            for index in range(layout.count):
                targets[f"overlay {index}"] = output / (
                    f"{name}_{index:03d}_overlay.png" if stack else f"{name}_overlay.png"
                )
        every.append(targets)
    sources = {path.resolve(): path for path in inputs}
    written: dict[Path, Path] = {}
    for path, targets in zip(inputs, every):
        for target in targets.values():
            key = target.resolve()
            if key in sources:
                whose = "its input" if sources[key] == path else "the input"
                raise UserError(
                    f"--output {output}: {target.name} would overwrite {whose} {sources[key]}; choose another folder"
                )
            if written.setdefault(key, path) != path:
                raise UserError(
                    f"--output {output}: {target.name} would be written for both {written[key]} and {path}; rename one "
                    "of them"
                )
    return every


def mask_image(classes: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """(H, W) uint8 mask of (H, W) class indices (``infer.predicted_classes``): 0/255 for two classes
    (255 = class 1), else the class indices."""
    mask = classes.astype(np.uint8)
    if num_classes == 2:
        mask *= 255  # in place: a mask of a large image is a large array
    return mask


def overlay_image(image: np.ndarray, classes: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """(H, W, 3) uint8: the input ((H, W), (H, W, C) or (C, H, W)) in gray or colour with each predicted
    class > 0 tinted in its colour."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 3 and row_axis(pixels.shape) == 1:  # channels first: planar pages, pages that are channels
        pixels = np.moveaxis(pixels, 0, -1)
    pixels = pixels.reshape(pixels.shape[:2] + (-1,))
    pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
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
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[Path]:
    """Write a mask (and optionally probabilities, object ids and overlays) for every input, as
    ``predictor`` predicts and decides its pixels; returns the masks.

    Every input's header is read first (``input_layout``: images over ``max_pixels``, which is
    ``train.max_image_pixels``, refused) and every output named (``output_targets``), so that a refusal
    comes before anything is written. A multi-page TIFF is read, predicted and written a page at a time,
    so memory follows one page, not the stack. Outputs are written under temporary names and renamed when
    all of an input's are complete: an interrupted or refused input leaves nothing. ``instances`` writes
    ``<name>_instances.tif``: uint16 object ids, the 4-connected components of class 1 after the
    watershed cut of ``predict.watershed_seeds``.
    """
    channels = predictor.model.image_channels
    layouts = [input_layout(path, channels, max_pixels) for path in inputs]
    asked = {"probability": probabilities, "overlay": overlay, "instances": instances}
    every = output_targets(inputs, layouts, output, {key for key, wanted in asked.items() if wanted})
    output.mkdir(parents=True, exist_ok=True)
    written, uniform, total = [], [], 0
    for path, layout, targets in zip(inputs, layouts, every):
        if instances and is_large(layout) and getattr(predictor.model, "dims", 2) == 2:
            note(
                f"{path.name}: no object ids for an image over {BAND_PIXELS // 2**20} Mpixel (it is predicted in bands)"
            )
        try:
            if getattr(predictor.model, "dims", 2) == 3:
                described = predict_volume(predictor, layout, targets, partial)
            elif is_large(layout):
                described = predict_large_image(predictor, layout, targets)
            else:
                found = predict_file(predictor, layout, targets)
                uniform, total = uniform + found, total + layout.count
                described = f"{layout.count} slices" if layout.count > 1 else ""
        except BaseException:
            for target in targets.values():
                partial(target).unlink(missing_ok=True)
            raise
        for target in targets.values():
            os.replace(partial(target), target)
        written.append(targets["mask"])
        print(f"{path} -> {targets['mask']}" + (f" ({described})" if described else ""))
    if uniform:
        note(uniform_prediction_note(uniform, total, "predicted images"))
    return written


def predict_file(predictor: Predictor, layout: ImageLayout, targets: dict[str, Path]) -> list[str]:
    """Predict the images of one input (a page of a stack at a time) into the temporary files of its
    ``targets`` (``partial``); returns the names of the images predicted as one class everywhere."""
    stack, path = layout.count > 1, layout.path
    pixels = sum(width * height for width, height in layout.sizes)
    uniform = []
    with contextlib.ExitStack() as open_files:
        writers = {
            key: open_files.enter_context(
                tifffile.TiffWriter(partial(target), bigtiff=needs_bigtiff(BYTES_PER_PIXEL[key] * pixels))
            )
            for key, target in targets.items()
            if key in BYTES_PER_PIXEL and target.suffix == ".tif"
        }
        for index, image in enumerate(layout_images(layout)):
            name = path.name + (f" page {index}" if stack else "")
            page = predict_page(predictor, image, set(targets), name)
            for key, writer in writers.items():
                writer.write(page[key], photometric="minisblack", contiguous=True)
            if "mask" not in writers:
                skimage.io.imsave(partial(targets["mask"]), page["mask"], check_contrast=False)
            if f"overlay {index}" in targets:
                overlay = overlay_image(image, page["classes"])
                skimage.io.imsave(partial(targets[f"overlay {index}"]), overlay, check_contrast=False)
            uniform += [name] if page["uniform"] else []
    return uniform


def predict_page(predictor: Predictor, image: np.ndarray, outputs: set[str], name: str) -> dict:
    """One image's ``classes`` (H, W) int64 and, as they are written, its ``mask``, its class-1
    ``probability`` (float32) and its object ids (``instances``, uint16) where ``outputs`` asks for
    them, and whether it is a single class everywhere (``uniform``)."""
    normalized = normalize_image(image, predictor.model.image_channels)
    result = check_prediction(predictor.probabilities(torch.from_numpy(normalized).to(predictor.device)), name)
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


def check_prediction(probabilities: Tensor, name: str) -> Tensor:
    """``probabilities`` where all are numbers; else a UserError: no output of NaN is ever written."""
    if not bool(torch.isfinite(probabilities).all()):
        raise UserError(
            f"{name}: the model's probabilities are NaN (the image's values overflow float32 arithmetic, or the "
            "checkpoint's weights are NaN): rescale the image, or use another checkpoint"
        )
    return probabilities


def needs_bigtiff(data_bytes: int) -> bool:
    """Whether a TIFF of this much pixel data needs the BigTIFF format (classic TIFF ends at 4 GiB;
    a margin is left for the tags)."""
    return data_bytes > 2**32 - 2**26


def partial(path: Path) -> Path:
    """Where ``path`` is written until it is complete (same folder and suffix, so readers know the format)."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def predict_large_image(predictor: Predictor, layout: ImageLayout, targets: dict[str, Path]) -> str:
    """Predict one large image in bands of rows, each with enough rows of context above and below
    that its output rows see what they would see in one pass over the whole image, into memory-mapped
    output TIFFs (the temporary files of ``targets``' mask and probability, whatever the input's format):
    memory follows one band, not the image. With padding 0 the result equals the whole image's; with
    padding 1 the tiles fall elsewhere within a band than within the whole image, and since each tile
    sees zero padding at its edges the blended probabilities differ slightly (as between two tile
    sizes). The watershed cut of ``predict.watershed_seeds`` runs per band (with its context); no
    overlay is written. Returns what it did, for the output line."""
    model, path = predictor.model, layout.path
    channels, depth, padding = model.image_channels, model.depth, model.padding
    image = tiff_memmap(path) if layout.pages == ((0,),) else None  # a one-page TIFF: read only where used
    image = layout_image(layout) if image is None else image  # decoded whole (PNG, compressed TIFF)
    axis = row_axis(image.shape)
    height, width = image.shape[axis], image.shape[axis + 1]
    period = 2**depth
    # context: the network's reach (padding 0), or half a tile of blending (padding 1), in whole periods
    reach = network_margin(depth, padding) if padding == 0 else predictor.plan.predict_tile_size // 2
    context = -(-reach // period) * period
    band_rows = max(period, BAND_PIXELS // width // period * period)
    statistics = image_statistics(image, channels)
    if not np.all(np.isfinite(statistics)):  # a memory-mapped image is not checked on reading: count its NaN here
        check_finite(image, str(path))
    outputs = {
        key: tifffile.memmap(
            partial(targets[key]),
            shape=(height, width),
            dtype=dtype,
            photometric="minisblack",
            bigtiff=needs_bigtiff(BYTES_PER_PIXEL[key] * height * width),
        )
        for key, dtype in (("mask", np.uint8), ("probability", np.float32))
        if key in targets
    }
    for top in range(0, height, band_rows):
        start, bottom, stop = (
            max(0, top - context),
            min(height, top + band_rows),
            min(height, top + band_rows + context),
        )
        band = np.take(image, range(start, stop), axis=axis)
        normalized = normalize_image(band, channels, statistics)
        result = predictor.probabilities(torch.from_numpy(normalized).to(predictor.device))
        classes = predictor.classes(check_prediction(result, f"{path.name} rows {start}-{stop - 1}")).numpy()
        result = predictor.class_probabilities(result)
        outputs["mask"][top:bottom] = mask_image(classes[top - start : bottom - start], result.shape[0])
        if "probability" in outputs:
            channel = 1 if result.shape[0] > 1 else 0
            outputs["probability"][top:bottom] = result[channel, top - start : bottom - start].numpy()
    for array in outputs.values():
        array.flush()
    return f"{width}x{height} px in bands of {band_rows} rows"
