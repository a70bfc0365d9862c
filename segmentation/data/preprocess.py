"""Preprocessing shared by training and inference: normalisation, rescaling and mirror padding.

Training tiles, validation images and images segmented by test.py all pass through these functions,
so that the network sees every image on the same scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from model import output_size, valid_input_sizes


def normalize_image(image: np.ndarray, channels: int, statistics: tuple[float, float] | None = None) -> np.ndarray:
    """The one preprocessing step shared by training and inference.

    Parameters
    ----------
    image : (H, W), (H, W, C) or (C, H, W) array of any numeric dtype (uint8 0..255, float ...).
        A trailing axis of size 1, 3 or 4 is read as channels-last.
    channels : 1 (grayscale) or 3 (RGB): what the network expects. RGB is averaged to gray and gray is
        repeated to RGB; an alpha channel is dropped.
    statistics : ``(mean, std)`` to normalise with instead of the image's own: those of the whole
        image (``image_statistics``) when ``image`` is one band of it.

    Returns
    -------
    (channels, H, W) float32 array with zero mean and unit standard deviation per image, so that
    images of different brightness and bit depth reach the network on one scale; rounded to float16
    precision (11 significant bits), in which the preprocessing cache stores it, so that an image
    predicted from its file and from the cache is the same image.
    """
    array = channels_first(image, channels)
    if array is image or np.shares_memory(array, image):
        array = array.copy()  # normalised in place below: never the caller's array
    mean, std = statistics if statistics is not None else (array.mean(), array.std())
    array -= mean
    array /= std if std > 0 else 1.0
    return array.astype(np.float16).astype(np.float32)


def channels_first(image: np.ndarray, channels: int) -> np.ndarray:
    """(channels, H, W) float32 of an (H, W), (H, W, C) or (C, H, W) image, with the channel
    conversion of ``normalize_image``."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {array.shape}")
    elif row_axis(array.shape) == 0:
        array = np.moveaxis(array, -1, 0)
    if array.shape[0] == 4:
        array = array[:3]
    if array.shape[0] != channels:
        array = (
            array.mean(axis=0, keepdims=True)
            if channels == 1
            else np.repeat(array.mean(axis=0, keepdims=True), channels, axis=0)
        )
    return array


def row_axis(shape: tuple[int, ...]) -> int:
    """The axis of the rows of an image of ``shape``: 0 for (H, W) and (H, W, C), 1 for (C, H, W). A
    trailing axis of 1, 3 or 4 is read as channels-last unless the first axis is one too."""
    return 0 if len(shape) == 2 or (shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4)) else 1


def image_statistics(image: np.ndarray, channels: int, band_rows: int = 1024) -> tuple[float, float]:
    """Mean and standard deviation of an image too large to convert whole (a memory-mapped file, say),
    after the channel conversion of ``normalize_image``, summed in float64 over bands of rows."""
    axis = row_axis(image.shape)
    total = squares = count = 0.0
    for top in range(0, image.shape[axis], band_rows):
        band = channels_first(
            np.take(image, range(top, min(top + band_rows, image.shape[axis])), axis=axis), channels
        ).astype(np.float64)
        total, squares, count = total + band.sum(), squares + np.square(band).sum(), count + band.size
    mean = total / count
    return mean, float(np.sqrt(max(squares / count - mean**2, 0.0)))


def volume_statistics(source: np.ndarray, chunk: int = 16) -> tuple[float, float]:
    """Mean and standard deviation over all voxels and channels of a (C, D, H, W) volume of any numeric dtype that
    may be larger than memory (an ``np.memmap``), read ``chunk`` planes along D at a time in float64. Chunks are
    merged by their means and sums of squared deviations (Chan et al.), which stays exact for large means."""
    count, mean, squares = 0, 0.0, 0.0
    for start in range(0, source.shape[1], chunk):
        block = np.asarray(source[:, start : start + chunk], dtype=np.float64)
        block_mean = float(block.mean())
        block_squares = float(np.square(block - block_mean).sum())
        total = count + block.size
        delta = block_mean - mean
        mean += delta * block.size / total
        squares += block_squares + delta**2 * count * block.size / total
        count = total
    return mean, float(np.sqrt(squares / count))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` times ``scale``, rounded, at least 1 px."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) float image resized to ``size`` bilinearly, anti-aliased when shrinking: how training
    and prediction both rescale images for ``train.image_scale``."""
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) integer mask (classes or instance ids) resized to ``size`` by nearest neighbour."""
    resized = F.interpolate(torch.from_numpy(mask.astype(np.float64))[None, None], size=size, mode="nearest-exact")
    return resized[0, 0].numpy().astype(mask.dtype)


def mirror_pad(array: np.ndarray, before: int, after_height: int, after_width: int) -> np.ndarray:
    """Mirror the last two axes outwards: ``before`` pixels on top and left, the given amounts after.

    The overlap-tile strategy of the paper: context missing at the image border is filled by mirroring.
    NumPy's ``reflect`` mode keeps mirroring for pads larger than the image.
    """
    pad = [(0, 0)] * (array.ndim - 2) + [(before, after_height), (before, after_width)]
    return np.pad(array, pad, mode="reflect") if any(p for pair in pad for p in pair) else array


def mirrored_indices(start: int, length: int, size: int) -> np.ndarray:
    """Indices into an axis of ``size`` pixels for the positions ``start .. start + length - 1`` of
    that axis mirrored outwards as ``mirror_pad`` does (NumPy's ``reflect``: d c b | a b c d | c b a,
    repeated for positions more than one image away): (length,) int64 in ``[0, size)``."""
    positions = np.arange(start, start + length)
    if size == 1:
        return np.zeros(length, dtype=np.int64)
    period = 2 * (size - 1)
    folded = np.mod(positions, period)
    return np.where(folded < size, folded, period - folded).astype(np.int64)


def take_window(array: np.ndarray, *indices: np.ndarray) -> np.ndarray:
    """``array`` at the index arrays ``indices`` (from ``mirrored_indices``) along its last ``len(indices)`` axes,
    ``array[..., rows, :][..., cols]`` for two, reading only the block they span from a memory-mapped ``array``
    (..., H, W) or (..., D, H, W); a new in-memory array."""
    block = np.asarray(array[(..., *(slice(int(index.min()), int(index.max()) + 1) for index in indices))])
    for axis, index in enumerate(indices, start=array.ndim - len(indices)):
        block = block.take(index - int(index.min()), axis=axis)
    return block


def network_margin(
    depth: int, padding: int, kernels: Sequence[int] | None = None, pools: Sequence[int] | None = None
) -> int:
    """Pixels the network's output loses on each side of its input along an axis of ``kernels`` and ``pools`` (the
    kernel size of each level and the pooling factors, default 3 and 2): 0 with padding 1, 92 for the paper's
    network."""
    smallest = valid_input_sizes(1, depth, padding, kernels, pools)[1]
    return (smallest - output_size(smallest, depth, padding, kernels, pools)) // 2


def pad_for_model(
    image: np.ndarray, depth: int, padding: int, axes: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None
) -> np.ndarray:
    """Mirror-pad a whole ``(C, H, W)`` image to a valid network input whose output covers it.

    The output's pixel (i, j) then lies over the image's pixel (i, j): crop the output to
    ``[..., :H, :W]``. With padding 0 the image gets the network's context margin on every side. A volume
    ``(C, D, H, W)`` is padded along its three axes, by the network's ``(kernels, pools)`` along each
    (``axes``, as ``UNet.axis`` gives them).
    """
    if axes is not None:
        pads = [(0, 0)]
        for side, (kernels, pools) in zip(image.shape[1:], axes):
            margin = network_margin(depth, padding, kernels, pools)
            pads.append(
                (margin, valid_input_sizes(side + 2 * margin, depth, padding, kernels, pools)[1] - side - margin)
            )
        return np.pad(image, pads, mode="reflect")
    height, width = image.shape[-2:]
    margin = network_margin(depth, padding)
    sizes = [valid_input_sizes(side + 2 * margin, depth, padding)[1] for side in (height, width)]
    return mirror_pad(image, margin, sizes[0] - height - margin, sizes[1] - width - margin)
