"""What a U-Net of given widths needs in memory, by arithmetic alone: its parameters and the activations of a tile.

Set-up refuses a training step, and test.py a prediction, that cannot fit the device before anything is
allocated (``device.require_memory``). The counts follow the network of ``model.py`` block by block, in 2D or
3D, with its kernel and pooling sizes per level and axis; checked against built networks and against what
autograd keeps (``tests/test_memory.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from model import default_geometry

# the backward pass holds about this many copies of the largest feature map at once: gradients of a block's output
# and input, the skip's gradient waiting for the encoder, the concatenation's, the kernels' reordered copies
# (measured on a CPU, steps of 1 to 8 tiles: 3 to 8)
GRADIENT_MAPS = 10
PREDICTION_MAPS = 3  # a block predicting without gradients holds its input, a convolution's output and the norm's


def geometry(unet, kernel_sizes, pool_sizes) -> tuple[tuple, tuple]:
    """The kernel and pooling sizes per level and axis of the network (the paper's where None are given)."""
    kernels, pools = default_geometry(len(unet.input_channels), getattr(unet, "dims", 2))
    return (kernels if kernel_sizes is None else tuple(kernel_sizes)), (
        pools if pool_sizes is None else tuple(pool_sizes)
    )


def unet_parameter_count(
    unet,
    out_channels: int,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    pool_sizes: Sequence[Sequence[int]] | None = None,
) -> int:
    """The trainable parameters of the U-Net of a config's ``unet`` section (``build_model``; any object with
    its fields) with ``out_channels`` outputs, counted from the widths alone, without building it."""
    kernels, pools = geometry(unet, kernel_sizes, pool_sizes)
    widths, per_channel = tuple(unet.input_channels), 1 if unet.norm == "none" else 2  # a bias; a norm's 2

    def double(c_in: int, c_out: int, level: int) -> int:
        taps = math.prod(kernels[level])
        return taps * c_in * c_out + taps * c_out * c_out + 2 * per_channel * c_out

    deeper = (*widths[1:], 2 * widths[-1])  # the output widths of the Downs and the bottleneck
    total = sum(
        double(c_in, c_out, level)
        for level, (c_in, c_out) in enumerate(zip((unet.image_channels, *widths), (widths[0], *deeper)))
    )
    for level, (c_deep, c_skip) in enumerate(zip(deeper, widths)):
        half = c_deep // 2
        taps = math.prod(pools[level]) if unet.upsample == "transpose" else 1
        total += taps * c_deep * half + half + double(c_skip + half, c_skip, level)
    return total + (widths[0] + 1) * out_channels


def forward_maps(
    unet,
    out_channels: int,
    tile: int | Sequence[int],
    element_size: int = 4,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    pool_sizes: Sequence[Sequence[int]] | None = None,
) -> list[tuple[list[int], int]]:
    """The tensors that one tile (``tile`` px along each axis, or its sizes per axis) makes in a training forward
    pass of the U-Net of a config's ``unet`` section with ``out_channels`` outputs, block by block (``inc``, each
    ``Down``, the bottleneck, each ``Up``, then the output layer and the loss): ``(bytes of each tensor that the
    block makes and autograd keeps for the backward pass, bytes of the block's output)``. Feature maps take
    ``element_size`` bytes a value (4: fp32, 2: bf16 or fp16 autocast), pooling indices 8, dropout masks 1;
    ``tile`` must be a valid input."""
    kernels, pools = geometry(unet, kernel_sizes, pool_sizes)
    dims = len(kernels[0])
    shape = (tile,) * dims if isinstance(tile, int) else tuple(tile)
    widths = tuple(unet.input_channels)
    deeper = (*widths[1:], 2 * widths[-1])
    copies = 1 if unet.norm == "none" else 2  # a convolution's output, and the norm's (ReLU works in place)

    def maps(channels: int, sizes: Sequence[int], size: int = element_size) -> int:
        return channels * math.prod(sizes) * size

    def double(channels: int, sizes: Sequence[int], level: int) -> tuple[list[int], tuple[int, ...]]:
        # a convolution's loss of side along each axis: (kernel - 1) with valid convolutions, 0 with same ones
        shrink = [kernel - 1 if unet.padding == 0 else 0 for kernel in kernels[level]]
        first = tuple(size - cut for size, cut in zip(sizes, shrink))
        second = tuple(size - 2 * cut for size, cut in zip(sizes, shrink))
        return [maps(channels, first)] * copies + [maps(channels, second)] * copies, second

    tensors, sizes = double(widths[0], shape, 0)
    blocks = [(tensors, maps(widths[0], sizes))]
    for level, (c_in, c_out) in enumerate(zip(widths, deeper)):
        pooled = tuple(size // factor for size, factor in zip(sizes, pools[level]))
        tensors, sizes = double(c_out, pooled, level + 1)
        blocks.append(([maps(c_in, pooled), maps(c_in, pooled, 8), *tensors], maps(c_out, sizes)))  # pooled, indices
    if unet.dropout > 0:  # the deepest encoder level and the bottleneck: each an output and a mask
        for level in (len(widths) - 1, len(widths)):
            tensors, output = blocks[level]
            blocks[level] = ([*tensors, output, output // element_size], output)
    for level in range(len(widths) - 1, -1, -1):
        c_deep, c_skip = deeper[level], widths[level]
        sizes, half = tuple(size * factor for size, factor in zip(sizes, pools[level])), c_deep // 2
        upsampled = [maps(half, sizes)] if unet.upsample == "transpose" else [maps(c_deep, sizes), maps(half, sizes)]
        tensors, out = double(c_skip, sizes, level)
        blocks.append(([*upsampled, maps(c_skip + half, sizes), *tensors], maps(c_skip, out)))
        sizes = out
    # the logits, then the loss's log-probabilities, per-pixel loss and weighted loss (fp32)
    blocks.append(([maps(out_channels, sizes), maps(out_channels + 3, sizes, 4)], maps(out_channels, sizes)))
    return blocks


def training_activation_bytes(blocks: list[tuple[list[int], int]], checkpointing: bool = False) -> int:
    """The bytes of one image's activations in a training step, from its ``forward_maps``: every tensor
    autograd keeps (with activation checkpointing the blocks' outputs, and one block's inside while it is
    recomputed), and the gradients of the largest maps that the backward pass holds at once."""
    largest = max(size for tensors, _ in blocks for size in tensors)
    if checkpointing:
        return (
            sum(output for _, output in blocks) + max(sum(tensors) for tensors, _ in blocks) + GRADIENT_MAPS * largest
        )
    return sum(sum(tensors) for tensors, _ in blocks) + GRADIENT_MAPS * largest


def prediction_activation_bytes(blocks: list[tuple[list[int], int]]) -> int:
    """The bytes of one tile's activations when predicting without gradients, from its ``forward_maps``: the
    encoder's outputs (the skips, kept until the decoder takes them) and the largest maps a block holds."""
    depth = (len(blocks) - 2) // 2
    largest = max(size for tensors, _ in blocks for size in tensors)
    return sum(output for _, output in blocks[:depth]) + PREDICTION_MAPS * largest


def shown_tile(tile: int | Sequence[int]) -> str:
    """A tile's sides as messages name them: ``572x572`` for a side, ``24x96x96`` for a volume's tile."""
    return "x".join(map(str, tile)) if isinstance(tile, Sequence) else f"{tile}x{tile}"
