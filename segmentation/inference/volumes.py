"""Predicting volumes with a 3D model: a mask stack per TIFF stack, streamed along z so memory follows a slab.

A stack stored uncompressed is memory-mapped and read a tile at a time; its mean and standard deviation (the
training normalisation) come from one streaming pass (``preprocess.volume_statistics``), and the network's
probabilities arrive slab by slab along z (``infer.predict_slabs``), each written to the output stacks as it
is finished. Objects (``--instances``, or models whose masks are their objects: the border class, object
clean-up) and test-time scales need the whole volume at once: those volumes are predicted in memory.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import tifffile
import torch

from segmentation.config import UserError
from segmentation.data.images import ImageLayout, layout_images, tiff_memmap
from segmentation.data.preprocess import volume_statistics
from segmentation.data.readers import object_instances
from segmentation.inference.infer import Predictor, predict_slabs, predicted_classes


def volume_source(layout: ImageLayout, channels: int) -> np.ndarray:
    """(C, D, H, W) view of a TIFF stack's voxels as stored: memory-mapped where the file allows it (uncompressed,
    contiguous), else read into memory. A UserError names a file that is no stack or of other channels than
    ``channels`` (``unet.image_channels``)."""
    if layout.count < 2 and not (layout.pages and len(layout.pages[0]) > 1):
        raise UserError(f"{layout.path}: one 2D image, but the model is 3D (unet.dims: 3): give a TIFF stack")
    voxels = tiff_memmap(layout.path)
    voxels = np.stack(list(layout_images(layout))) if voxels is None else voxels
    if voxels.ndim == 3:
        voxels = voxels[None]
    elif voxels.ndim == 4 and voxels.shape[-1] in (3, 4):
        voxels = np.moveaxis(voxels, -1, 0)[:3]
    if voxels.ndim != 4 or voxels.shape[0] != channels:
        raise UserError(
            f"{layout.path}: a stack of shape {voxels.shape}; the model takes volumes of {channels} channel(s) "
            "(sections of one channel, or RGB sections for unet.image_channels: 3)"
        )
    return voxels


def predict_volume(predictor: Predictor, layout: ImageLayout, targets: dict[str, Path], partial) -> str:
    """Predict one TIFF stack into the temporary files (``partial(target)``) of its ``targets``: the mask stack
    (0/255, or class indices), and where asked the class-1 probability (float32) and object ids (uint16).
    Returns what it did, for the output line."""
    source = volume_source(layout, predictor.model.image_channels)
    mean, std = volume_statistics(source)
    if not np.isfinite([mean, std]).all():
        raise UserError(f"{layout.path}: NaN or infinite voxel values; replace them before predicting")

    def normalize(window: np.ndarray) -> np.ndarray:  # as training's normalize_image rounds: to float16
        return ((window - mean) / (std if std > 0 else 1.0)).astype(np.float16).astype(np.float32)

    depth, height, width = source.shape[1:]
    whole = predictor.decides_by_objects or "instances" in targets or tuple(predictor.settings.scales) != (1.0,)
    whole = whole or predictor.image_scale != 1
    with contextlib.ExitStack() as files:
        writers = {
            key: files.enter_context(tifffile.TiffWriter(partial(target), bigtiff=True))
            for key, target in targets.items()
            if key in ("mask", "probability", "instances")
        }
        if whole:
            write_whole_volume(predictor, normalize(np.asarray(source, dtype=np.float32)), writers, layout.path)
            return f"{depth} sections of {width}x{height} px, in memory"
        plan, settings = predictor.plan, predictor.settings
        slabs = predict_slabs(
            predictor.model,
            source,
            normalize,
            plan.predict_tile,
            settings.overlap,
            predictor.batch_size,
            predictor.transforms,
        )
        for start, slab in slabs:
            write_sections(predictor, slab, writers, f"{layout.path.name} sections from {start}")
    return f"{depth} sections of {width}x{height} px, streamed in slabs"


def write_whole_volume(predictor: Predictor, normalized: np.ndarray, writers: dict, path: Path) -> None:
    """Predict a whole (C, D, H, W) normalised volume in memory, objects included, and write its sections."""
    probabilities = predictor.probabilities(torch.from_numpy(normalized))
    write_sections(predictor, probabilities, writers, path.name, whole=True)


def write_sections(predictor: Predictor, probabilities: torch.Tensor, writers: dict, name: str, whole=False) -> None:
    """Decide the classes of (K, d, H, W) ``probabilities`` (objects only for a ``whole`` volume) and append their
    sections to the output stacks of ``writers`` (``mask``, ``probability``, ``instances``)."""
    if not bool(torch.isfinite(probabilities).all()):
        raise UserError(f"{name}: the model's probabilities are NaN (the checkpoint's weights?): use another")
    objects, user = None, predictor.class_probabilities(probabilities)  # the user's classes, the border in its object
    if whole and (predictor.decides_by_objects or "instances" in writers) and predictor.model.num_classes == 2:
        objects = predictor.objects(probabilities)
    if whole:
        classes = predictor.classes(probabilities, objects).numpy()
    else:
        classes = predicted_classes(user, predictor.threshold).numpy()
    mask = classes.astype(np.uint8) * (255 if user.shape[0] == 2 else 1)
    for index in range(mask.shape[0]):
        writers["mask"].write(mask[index], photometric="minisblack", contiguous=True)
        if "probability" in writers:
            channel = 1 if user.shape[0] > 1 else 0
            writers["probability"].write(user[channel, index].numpy(), photometric="minisblack", contiguous=True)
        if "instances" in writers:
            ids = objects if objects is not None else object_instances(classes)
            writers["instances"].write(ids[index].astype(np.uint16), photometric="minisblack", contiguous=True)
