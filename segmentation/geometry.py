"""Network geometry of volumes: kernel and pooling sizes per level and axis, and tile sides, from the voxel spacing.

Serial-section electron microscopy cuts sections 40-50 nm thick and images them at 4-5 nm per pixel: a voxel is
ten times deeper than it is wide. Pooling z as often as y and x would merge sections that lie 100s of nm apart
before the network has looked at each, and a 3 x 3 x 3 kernel there sees mostly the section above and below.
nnU-Net's rule (Isensee et al. 2021, ``get_pool_and_conv_props``) is followed instead of resampling z: at each
level, an axis is pooled, and convolved with a kernel of 3, only while its current spacing is at most twice the
finest current spacing; the other axes are pooled (doubling their spacing) until they catch up, with a kernel of
1 along the coarse axis meanwhile. An axis whose tile is too short to halve again is not pooled either.
"""

from __future__ import annotations

from collections.abc import Sequence

from model import nearest_valid_input_size, output_size, valid_input_sizes

ANISOTROPY = 2.0  # an axis whose spacing exceeds this multiple of the finest is neither pooled nor convolved
MIN_POOLED_SIDE = 4  # a feature map is pooled along an axis only while it keeps at least this many voxels there
VOXEL_BUDGET_3D = {0: 116 * 116 * 116, 1: 96 * 96 * 96}  # input voxels of an automatic 3D tile, by padding
KernelSizes = tuple[tuple[int, ...], ...]


def kernels_and_pools(
    spacing: Sequence[float], depth: int, tile: Sequence[int] | None = None
) -> tuple[KernelSizes, KernelSizes]:
    """``(kernel_sizes, pool_sizes)`` of a U-Net of ``depth`` poolings on voxels of ``spacing`` (one size per
    axis, any unit): ``depth + 1`` kernels of 3 or 1 per axis (one per level) and ``depth`` pooling factors
    of 2 or 1 per axis, by nnU-Net's rule (see the module's docstring). ``tile``: the input tile's side per
    axis in voxels, where known: an axis is not pooled below ``MIN_POOLED_SIDE`` voxels.

    >>> kernels_and_pools((50, 4, 4), 4)[1]
    ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    """
    if not spacing or min(spacing) <= 0:
        raise ValueError(f"spacing must be positive sizes, one per axis, got {tuple(spacing)}")
    current = [float(size) for size in spacing]
    sides = None if tile is None else [float(side) for side in tile]
    kernels, pools = [], []
    for level in range(depth + 1):
        finest = min(current)
        fine = [size <= ANISOTROPY * finest for size in current]
        kernels.append(tuple(3 if is_fine else 1 for is_fine in fine))
        if level == depth:
            break
        pool = tuple(
            2 if is_fine and (sides is None or sides[axis] / 2 >= MIN_POOLED_SIDE) else 1
            for axis, is_fine in enumerate(fine)
        )
        pools.append(pool)
        current = [size * factor for size, factor in zip(current, pool)]
        sides = None if sides is None else [side / factor for side, factor in zip(sides, pool)]
    return tuple(kernels), tuple(pools)


def axis_geometry(kernels: KernelSizes, pools: KernelSizes, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The kernel sizes of the levels and the pooling factors along ``axis``, as the size functions take them."""
    return tuple(kernel[axis] for kernel in kernels), tuple(pool[axis] for pool in pools)


def volume_tile(
    spacing: Sequence[float],
    depth: int,
    padding: int,
    in_plane: int | None,
    sections: int | None,
    largest: Sequence[int] | None = None,
) -> tuple[tuple[int, int, int], KernelSizes, KernelSizes]:
    """``((tile_depth, tile_side, tile_side), kernel_sizes, pool_sizes)`` of a 3D run: the input tile in voxels,
    valid along every axis for the geometry ``kernels_and_pools`` plans for it. ``in_plane`` and ``sections``
    are ``train.tile_size`` and ``train.tile_depth`` (None: automatic): an automatic tile holds about
    ``VOXEL_BUDGET_3D`` voxels and spans about the same physical extent along z as in-plane (as nnU-Net's 3D
    patches do), with at least the smallest valid number of sections, and reaches no further than the
    ``largest`` volume's (D, H, W) needs (with the network's context margins for padding 0)."""
    ratio = float(spacing[0]) / float(spacing[-1])
    budget = VOXEL_BUDGET_3D[padding]
    side = in_plane or round((budget * ratio) ** (1 / 3))
    planned_sections = sections or max(1, round(side / ratio))
    if in_plane is None and sections is not None:
        side = round((budget / sections) ** 0.5)
    kernels, pools = kernels_and_pools(spacing, depth, (planned_sections, side, side))
    if largest is not None:  # no further than the largest volume needs, with the context of the geometry planned
        contexts = []
        for axis in (0, 1):
            along = axis_geometry(kernels, pools, axis)
            smallest = valid_input_sizes(1, depth, padding, *along)[1]
            contexts.append(smallest - output_size(smallest, depth, padding, *along))
        planned_sections = planned_sections if sections else min(planned_sections, largest[0] + contexts[0])
        side = side if in_plane else min(side, max(largest[1:]) + contexts[1])
        kernels, pools = kernels_and_pools(spacing, depth, (planned_sections, side, side))
    tile = []
    for axis, wanted in enumerate((planned_sections, side, side)):
        along = axis_geometry(kernels, pools, axis)
        smallest = valid_input_sizes(1, depth, padding, *along)[1]
        tile.append(max(smallest, nearest_valid_input_size(wanted, depth, padding, *along)))
    return (int(tile[0]), int(tile[1]), int(tile[2])), kernels, pools
