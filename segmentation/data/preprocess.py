"""Preprocessing shared by training and inference: normalisation, rescaling and mirror padding.

Training tiles, validation images and images segmented by test.py all pass through these functions,
so that the network sees every image on the same scale.
"""

from __future__ import annotations

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


def take_window(array: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``array[..., rows, :][..., cols]`` for index arrays from ``mirrored_indices``, reading only the
    block they span from a memory-mapped ``array`` (..., H, W); a new in-memory array."""
    top, left = int(rows.min()), int(cols.min())
    block = np.asarray(array[..., top : int(rows.max()) + 1, left : int(cols.max()) + 1])
    return block.take(rows - top, axis=-2).take(cols - left, axis=-1)


def network_margin(depth: int, padding: int) -> int:
    """Pixels the network's output loses on each side of its input: 0 with padding 1, 92 for the paper's network."""
    smallest = valid_input_sizes(1, depth, padding)[1]
    return (smallest - output_size(smallest, depth, padding)) // 2


def pad_for_model(image: np.ndarray, depth: int, padding: int) -> np.ndarray:
    """Mirror-pad a whole ``(C, H, W)`` image to a valid network input whose output covers it.

    The output's pixel (i, j) then lies over the image's pixel (i, j): crop the output to
    ``[..., :H, :W]``. With padding 0 the image gets the network's context margin on every side.
    """
    height, width = image.shape[-2:]
    margin = network_margin(depth, padding)
    sizes = [valid_input_sizes(side + 2 * margin, depth, padding)[1] for side in (height, width)]
    return mirror_pad(image, margin, sizes[0] - height - margin, sizes[1] - width - margin)
