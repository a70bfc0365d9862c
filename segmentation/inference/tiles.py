"""Where the tiles of an image or volume lie, and how their predictions join into finished slabs.

The tiling of ``infer.predict_probabilities`` and ``infer.predict_slabs``, per spatial axis: each axis has the
network's context margin, pooling period (the product of its pooling factors) and valid sizes along it
(``UNet.axis``), which differ along z in an anisotropic 3D network. ``SlabAccumulator`` joins the tiles'
probabilities along the first spatial axis in a buffer one tile deep, so that a volume's probabilities can be
handed on slab by slab instead of held whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from model import UNet, output_size, valid_input_sizes
from segmentation.data.preprocess import mirrored_indices, network_margin
from segmentation.plan import DEFAULT_PREDICT_TILE

DEFAULT_VOLUME_TILE = {0: 116, 1: 96}  # a 3D network's input tile side per axis (padding 0: rounded up to valid)


@dataclass(frozen=True)
class TileGrid:
    """Where an image's tiles lie, per spatial axis, in px: the image's ``sizes``, the network's context ``margins``,
    the output ``frame`` (a valid output side covering the image; its pixel i lies over the image's pixel i, as in
    ``preprocess.pad_for_model``), the tiles' output sides ``tile`` and their ``starts`` in the frame."""

    sizes: tuple[int, ...]
    margins: tuple[int, ...]
    frame: tuple[int, ...]
    tile: tuple[int, ...]
    starts: tuple[list[int], ...]

    def window(self, position: tuple[int, ...]) -> tuple[np.ndarray, ...]:
        """Per axis, the (tile + 2 margin,) int64 mirrored image indices of the input of the tile at ``position``."""
        return tuple(
            mirrored_indices(start - margin, side + 2 * margin, size)
            for start, margin, side, size in zip(position, self.margins, self.tile, self.sizes)
        )


def tile_grid(model: UNet, sizes: Sequence[int], tile_size: int | Sequence[int] | None, overlap: float) -> TileGrid:
    """The tiles of ``infer.predict_probabilities`` over an image of spatial ``sizes`` (px), each axis with its own
    kernel and pooling sizes (``model.axis``; the paper's 3 and 2 for a model without it). ``tile_size``: the
    largest input tile, one side for every axis or one per axis; None: ``DEFAULT_PREDICT_TILE`` for images,
    ``DEFAULT_VOLUME_TILE`` for volumes. ``overlap``: the fraction of a tile its neighbour shares, with padding 1."""
    depth, padding, dims = model.depth, model.padding, len(sizes)
    if tile_size is None:
        tile_size = (DEFAULT_PREDICT_TILE if dims == 2 else DEFAULT_VOLUME_TILE)[padding]
    requested = (int(tile_size),) * dims if np.ndim(tile_size) == 0 else tuple(int(side) for side in tile_size)
    if len(requested) != dims:
        raise ValueError(f"tile_size must be one int or {dims}, one per spatial axis, got {tile_size!r}")
    fraction = 1.0 if padding == 0 else 1 - overlap
    geometry = [
        model.axis(axis) if hasattr(model, "axis") else ((3,) * (depth + 1), (2,) * depth) for axis in range(dims)
    ]
    axes = [
        _axis_grid(size, side, fraction, depth=depth, padding=padding, kernels=kernels, pools=pools)
        for size, side, (kernels, pools) in zip(sizes, requested, geometry)
    ]
    margins, frame, tile, starts = zip(*axes)
    return TileGrid(tuple(int(size) for size in sizes), margins, frame, tile, starts)


def _axis_grid(
    size: int, requested: int, stride_fraction: float, *, depth: int, padding: int, kernels: tuple, pools: tuple
) -> tuple[int, int, int, list[int]]:
    """``(margin, frame side, tile output side, tile starts)`` along an axis of ``size`` px, ``kernels`` and ``pools``,
    for input tiles of at most ``requested`` px (rounded up to a valid size)."""
    margin, period = network_margin(depth, padding, kernels, pools), math.prod(pools)

    def valid(side: int) -> int:
        return valid_input_sizes(side, depth, padding, kernels, pools)[1]

    def out(side: int) -> int:
        return output_size(side, depth, padding, kernels, pools)

    frame = valid(size + 2 * margin) - 2 * margin
    largest = out(valid(max(requested, period + 2 * margin)))  # must reach one period, so that tiles can move
    tile, starts = _axis_tiles(frame, largest, out(valid(1)), period, stride_fraction)
    return margin, frame, tile, starts


class SlabAccumulator:
    """The tiles' probabilities, written (padding 0: tiles meet or overlap with equal values) or summed with
    Gaussian weights (padding 1), in a buffer one tile deep along the first spatial axis, from which finished
    slabs are cut as the tiles move on along it."""

    def __init__(self, channels: int, grid: TileGrid, blend: bool):
        self.grid, self.base = grid, 0  # the buffer's first plane is plane ``base`` of the frame
        block = (grid.tile[0], *grid.frame[1:])
        self.weight = gaussian_importance_map(*grid.tile) if blend else None
        self.total = torch.zeros(channels, *block)
        self.weight_sum = None if self.weight is None else torch.zeros(block)

    def add(self, position: tuple[int, ...], probabilities: Tensor) -> None:
        """Put one tile's (channels, *tile) probabilities, whose output starts at ``position`` in the frame, in."""
        offsets = (position[0] - self.base, *position[1:])
        window = tuple(slice(start, start + side) for start, side in zip(offsets, self.grid.tile))
        if self.weight_sum is None:
            self.total[(slice(None), *window)] = probabilities
        else:
            self.total[(slice(None), *window)] += probabilities * self.weight
            self.weight_sum[window] += self.weight

    def release(self, end: int) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(start, probabilities)`` of the finished planes ``base .. end - 1`` cropped to the image, where
        it reaches them, and move the buffer on to start at ``end``."""
        start, count, sizes = self.base, end - self.base, self.grid.sizes
        if count == 0:
            return
        if start < sizes[0]:
            crop = (slice(0, min(end, sizes[0]) - start), *(slice(0, size) for size in sizes[1:]))
            finished = self.total[(slice(None), *crop)]
            yield start, finished.clone() if self.weight_sum is None else finished / self.weight_sum[crop]
        for buffer in (self.total, self.weight_sum):
            if buffer is not None:
                _shift(buffer, count, buffer.ndim - len(sizes))
        self.base = end


def _shift(buffer: Tensor, count: int, axis: int) -> None:
    """Move ``buffer``'s contents ``count`` <= its length places towards the start along ``axis``, in place, zeros
    after them: copying only what stays, where a new buffer would hold two at once."""
    rest = buffer.shape[axis] - count
    buffer.narrow(axis, 0, rest).copy_(buffer.narrow(axis, count, rest).clone())
    buffer.narrow(axis, rest, count).zero_()


def gaussian_importance_map(*sides: int) -> Tensor:
    """(*sides) float32 blending weights of a tile: a Gaussian centred on it, sigma = side / 8 per axis.

    The peak is 1; the smallest weight, at a corner, is about exp(-8) per axis (1e-7 in 2D), far above
    float32's underflow, so a pixel that only a tile's corner reaches still gets that tile's prediction. Unlike
    MONAI we set no floor (nnU-Net does not either): one as large as 1e-3 would give the corners of
    tiles along the image border as much weight as the inner parts of their neighbours there.
    """
    axes = [
        torch.exp(-0.5 * ((torch.arange(side, dtype=torch.float32) - (side - 1) / 2) / (side / 8)) ** 2)
        for side in sides
    ]
    weight = axes[0]
    for axis in axes[1:]:
        weight = weight[..., None] * axis  # in 2D the outer product
    return weight


def _axis_tiles(
    frame_side: int, largest: int, smallest: int, period: int, stride_fraction: float
) -> tuple[int, list[int]]:
    """Output side of the tiles along one axis of the output frame, and where they start.

    Tile output sides are valid ones, ``smallest + k * period`` px up to ``largest``; strides are
    ``stride_fraction`` of a tile rounded down to a multiple of ``period``, and the last tile ends
    at the frame's border. We take the smallest tiles that still cover the frame with as few tiles
    as the largest need: a 516 px frame takes two 260 px tiles rather than two of 388 px that
    overlap by 260 px, and a frame smaller than a tile takes one tile of its own size.
    """

    def stride(side: int) -> int:
        return max(period, int(side * stride_fraction) // period * period)

    def starts(side: int) -> list[int]:
        return [*range(0, frame_side - side, stride(side)), frame_side - side]

    count = len(starts(largest))
    side = smallest
    # Frame sides are valid output sides too, so a single tile stops exactly at the frame's size.
    while side < frame_side and (side < period or (count - 1) * stride(side) + side < frame_side):
        side += period
    return side, starts(side)
