"""U-Net (Ronneberger, Fischer & Brox, 2015) in 2D and 3D, with the paper's size arithmetic.

The network is built from small named blocks (``DoubleConv``, ``Down``,
``Up``) in the style of milesial/Pytorch-UNet.  With ``padding=0`` it is the
paper's network: unpadded ("valid") 3x3 convolutions, so the output is smaller
than the input (572x572 -> 388x388) and only some input sizes fit.  The module
functions ``output_size`` and ``valid_input_sizes`` do that arithmetic so that
callers can pick tile sizes and crop targets without running the network.

The spatial dimensions are an argument (``dims``: 2 for images, 3 for volumes, as MONAI's
``spatial_dims``), and so are the kernel and pooling sizes along each axis and level
(``kernel_sizes``, ``pool_sizes``), as nnU-Net's plans give them for anisotropic volumes: an axis
whose voxels are much longer than the others' is convolved with kernels of 1 and not pooled until
the others catch up. The size arithmetic works axis by axis with those sizes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

NORMS = ("layer", "batch", "group", "instance", "none")
UPSAMPLE_MODES = ("transpose", "bilinear")
CONVOLUTIONS = {2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
POOLS = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
BATCH_NORMS = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
INSTANCE_NORMS = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
INTERPOLATION = {2: "bilinear", 3: "trilinear"}  # upsample: bilinear, as each dimension names it


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels of each pixel of a (B, C, H, W) map, or voxel of (B, C, D, H, W).

    This is ConvNeXt's ``LayerNorm2d``.  We prefer it to ``GroupNorm(1, C)``, which normalises over a whole
    (C, H, W) sample: those statistics depend on the size and content of the tile, so a tile would not get the
    same features as the same region of the whole image.  Statistics taken per pixel work for every input size
    and make tiled inference match whole-image inference exactly. ``weight`` and ``bias`` (C,) are the learnable
    per-channel scale and shift (initialised to 1 and 0); ``eps`` is added to the variance.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape (B, C, ...); the result has the same shape."""
        # F.layer_norm normalises the trailing dimensions, so move C last.
        # the normalised shape comes from the weight, not the input, so that ONNX tracing sees a constant
        # explicit permutations: ONNX refuses the negative axes movedim(1, -1) exports
        last = x.dim() - 1
        x = F.layer_norm(x.permute(0, *range(2, last + 1), 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, last, *range(1, last))


def make_norm(norm: str, channels: int, dims: int = 2) -> nn.Module:
    """Return the normalisation layer named ``norm`` (one of ``NORMS``) for ``channels`` channels of ``dims``-D maps.

    ``"group"`` uses ``gcd(channels, 8)`` groups so that any channel count works.
    """
    if norm == "layer":
        return ChannelLayerNorm(channels)
    if norm == "batch":
        return BATCH_NORMS[dims](channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if norm == "instance":
        return INSTANCE_NORMS[dims](channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(map(repr, NORMS))}")


def same_kernel(kernel: int | Sequence[int]) -> int | tuple[int, ...]:
    """A kernel or pooling size as PyTorch's layers take it: one int where it is the same along every axis."""
    if isinstance(kernel, int):
        return kernel
    kernel = tuple(kernel)
    return kernel[0] if len(set(kernel)) == 1 else kernel


class DoubleConv(nn.Module):
    """(3x3 convolution => norm => ReLU) * 2, or with the ``kernel`` given per axis (3 or 1).

    With ``padding=0`` (the paper's valid convolutions) each convolution trims
    one pixel from every border, so the block shrinks H and W by 4; with
    ``padding=1`` it keeps the size. An axis of kernel 1 keeps its size either way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        dims: int = 2,
        kernel: int | Sequence[int] = 3,
    ) -> None:
        super().__init__()
        kernel = same_kernel(kernel)
        pad = padding if isinstance(kernel, int) else tuple(padding * (size // 2) for size in kernel)
        if isinstance(kernel, int) and kernel == 1:
            pad = 0
        convolution = CONVOLUTIONS[dims]
        # A norm's learnable shift makes a convolution bias redundant.
        bias = norm == "none"
        self.double_conv = nn.Sequential(
            convolution(in_channels, out_channels, kernel, padding=pad, bias=bias),
            make_norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
            convolution(out_channels, out_channels, kernel, padding=pad, bias=bias),
            make_norm(norm, out_channels, dims),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max pooling (``pool`` per axis), then DoubleConv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        dims: int = 2,
        pool: int | Sequence[int] = 2,
        kernel: int | Sequence[int] = 3,
    ) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            POOLS[dims](same_kernel(pool)),
            DoubleConv(in_channels, out_channels, padding, norm, dims, kernel),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


def center_crop(tensor: torch.Tensor, *shape: int) -> torch.Tensor:
    """Crop the central window of ``shape`` (height, width; or depth, height, width) from the last axes of a tensor.

    Returns a view with shape (..., *shape).  When H - height is odd
    the extra row is dropped from the bottom (likewise for columns and sections).
    """
    sizes = tensor.shape[-len(shape) :]
    if not all(0 < size <= found for size, found in zip(shape, sizes)):
        found = "x".join(map(str, sizes))
        raise ValueError(
            f"cannot crop a {found} tensor to {'x'.join(map(str, shape))}: "
            "the crop size must be positive and no larger than the tensor"
        )
    starts = [(found - size) // 2 for size, found in zip(shape, sizes)]
    window = tuple(slice(start, start + size) for start, size in zip(starts, shape))
    return tensor[(..., *window)]


class Up(nn.Module):
    """Upsample by 2 (``pool`` per axis) halving the channels, concatenate the cropped skip, then DoubleConv.

    ``upsample="transpose"`` is the paper's 2x2 up-convolution;
    ``"bilinear"`` is bilinear (trilinear) upsampling followed by a 1x1 convolution, which
    gives the same channel counts.  The skip connection must have
    ``skip_channels`` channels (default ``in_channels // 2``, as in the paper
    where every level doubles the width); the DoubleConv then sees
    ``skip_channels + in_channels // 2`` channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        padding: int,
        norm: str,
        upsample: str,
        skip_channels: int | None = None,
        dims: int = 2,
        pool: int | Sequence[int] = 2,
        kernel: int | Sequence[int] = 3,
    ) -> None:
        super().__init__()
        pool = same_kernel(pool)
        if upsample == "transpose":
            self.up = TRANSPOSED[dims](in_channels, in_channels // 2, kernel_size=pool, stride=pool)
        elif upsample == "bilinear":
            factor = float(pool) if isinstance(pool, int) else tuple(float(size) for size in pool)
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=factor, mode=INTERPOLATION[dims], align_corners=False),
                CONVOLUTIONS[dims](in_channels, in_channels // 2, kernel_size=1),
            )
        else:
            raise ValueError(
                f"unknown upsample mode {upsample!r}; choose one of {', '.join(map(repr, UPSAMPLE_MODES))}"
            )
        if skip_channels is None:
            skip_channels = in_channels // 2
        self.conv = DoubleConv(skip_channels + in_channels // 2, out_channels, padding, norm, dims, kernel)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` (B, C, h, w) and merge ``skip`` (B, C_skip, H, W), H >= 2h, W >= 2w (or in 3D)."""
        x = self.up(x)
        # Valid convolutions leave the skip larger than the upsampled map: the
        # paper crops it ("crop and copy").  With padding 1 this is a no-op.
        skip = center_crop(skip, *x.shape[2:])
        return self.conv(torch.cat([skip, x], dim=1))


def _check_depth_padding(depth: int, padding: int) -> None:
    if depth < 1:
        raise ValueError(f"depth must be at least 1 (got {depth})")
    if padding not in (0, 1):
        raise ValueError(f"padding must be 0 (valid convolutions) or 1 (same size), got {padding!r}")


def _axis(depth: int, kernels: Sequence[int] | None, pools: Sequence[int] | None) -> tuple[tuple, tuple]:
    """The kernel sizes of the ``depth + 1`` levels and the pooling factors of the ``depth`` poolings along one axis
    (default: 3 and 2, the paper's)."""
    kernels = (3,) * (depth + 1) if kernels is None else tuple(kernels)
    pools = (2,) * depth if pools is None else tuple(pools)
    if len(kernels) != depth + 1 or len(pools) != depth:
        raise ValueError(f"a depth-{depth} U-Net has {depth + 1} kernel sizes and {depth} pooling factors per axis")
    return kernels, pools


def _walk(
    size: int, depth: int, padding: int, kernels: Sequence[int] | None = None, pools: Sequence[int] | None = None
) -> tuple[int | None, str]:
    """Follow one spatial size through the network: (output size, "") or (None, reason)."""
    kernels, pools = _axis(depth, kernels, pools)

    def shrink(level: int) -> int:  # per DoubleConv: two convolutions trim (kernel - 1) / 2 px per border each
        return 2 * (kernels[level] - 1) if padding == 0 else 0

    too_small = "a feature map would shrink below one pixel"
    if size < 1:
        return None, too_small
    size -= shrink(0)
    if size < 1:
        return None, too_small
    for level in range(1, depth + 1):
        # MaxPool would silently floor an odd size, and the skip would then
        # no longer line up with the upsampled map.
        if size % pools[level - 1]:
            return None, "every pooling needs an even size" if pools[
                level - 1
            ] == 2 else "every pooling needs a size it divides"
        size = size // pools[level - 1] - shrink(level)
        if size < 1:
            return None, too_small
    for level in range(depth - 1, -1, -1):
        size = pools[level] * size - shrink(level)
        if size < 1:
            return None, too_small
    return size, ""


def valid_input_sizes(
    size: int, depth: int, padding: int, kernels: Sequence[int] | None = None, pools: Sequence[int] | None = None
) -> tuple[int | None, int]:
    """Return the nearest valid input sizes ``(below, above)`` with ``below <= size <= above`` along one axis, for
    a U-Net of ``depth`` poolings (``len(input_channels)``) and ``padding`` (0 valid, 1 same-size convolutions),
    with ``kernels`` and ``pools`` its kernel size per level and pooling factor per pooling along the axis (default
    3 and 2, the paper's). ``below`` is None when ``size`` is below the smallest valid size; both equal ``size``
    when it is valid."""
    _check_depth_padding(depth, padding)
    kernels, pools = _axis(depth, kernels, pools)
    # The encoder is invertible: bottleneck size b comes from exactly one input
    # size, period * b + offset, and every such input pools sizes the poolings divide.  So
    # the valid inputs are that progression for all b at which the decoder
    # stays positive, which holds for every b from some b_min on.
    shrinks = [2 * (kernel - 1) if padding == 0 else 0 for kernel in kernels]
    period = math.prod(pools)
    offset = 0
    for level in range(depth, 0, -1):
        offset = pools[level - 1] * (offset + shrinks[level])
    offset += shrinks[0]
    b_min = 1
    while _walk(period * b_min + offset, depth, padding, kernels, pools)[0] is None:
        b_min += 1
    b_below = (size - offset) // period
    b_above = -((offset - size) // period)
    below = period * b_below + offset if b_below >= b_min else None
    above = period * max(b_above, b_min) + offset
    return below, above


def nearest_valid_input_size(
    size: int, depth: int, padding: int, kernels: Sequence[int] | None = None, pools: Sequence[int] | None = None
) -> int:
    """Return the valid input size closest to ``size`` (the larger one on a tie)."""
    below, above = valid_input_sizes(size, depth, padding, kernels, pools)
    if below is None or above - size <= size - below:
        return above
    return below


def _output_size(
    size: int,
    depth: int,
    padding: int,
    what: str,
    kernels: Sequence[int] | None = None,
    pools: Sequence[int] | None = None,
) -> int:
    _check_depth_padding(depth, padding)
    out, reason = _walk(size, depth, padding, kernels, pools)
    if out is not None:
        return out
    below, above = valid_input_sizes(size, depth, padding, kernels, pools)
    nearest = (
        f"nearest valid sizes are {below} and {above}" if below is not None else f"the smallest valid size is {above}"
    )
    raise ValueError(
        f"{what} {size} does not fit a depth-{depth} U-Net with padding {padding}: "
        f"{reason}; {nearest} (crop or pad the input to one of them)"
    )


def output_size(
    input_size: int, depth: int, padding: int, kernels: Sequence[int] | None = None, pools: Sequence[int] | None = None
) -> int:
    """Return the output size along one axis (pixels) of a U-Net of ``depth`` poolings and ``padding`` (0: valid
    convolutions, each shrinking the size by 2; 1: same-size ones) for an input size along it, e.g. 388 for 572 at
    depth 4 with padding 0; ``kernels`` and ``pools``: along this axis, the kernel size of each level and the factor
    of each pooling (default 3 and 2). A ValueError names the nearest valid sizes where the size does not fit (a
    pooling would see a size it does not divide, or a feature map would vanish)."""
    return _output_size(input_size, depth, padding, "input size", kernels, pools)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _he_init(module: nn.Module) -> None:
    """Paper initialisation: weights ~ N(0, 2 / N), N = inputs to one output unit."""
    if isinstance(module, (*CONVOLUTIONS.values(), *TRANSPOSED.values())):
        fan_in = module.in_channels / module.groups * math.prod(module.kernel_size)
        if isinstance(module, tuple(TRANSPOSED.values())):
            # Each output pixel of a transposed convolution only sees the
            # kernel taps that land on it: one per stride cell.
            fan_in /= math.prod(module.stride)
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (ChannelLayerNorm, nn.GroupNorm, *BATCH_NORMS.values(), *INSTANCE_NORMS.values())):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def default_geometry(depth: int, dims: int) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """``(kernel_sizes, pool_sizes)`` of the paper's network in ``dims`` dimensions: 3 and 2 along every axis."""
    return ((3,) * dims,) * (depth + 1), ((2,) * dims,) * depth


class UNet(nn.Module):
    """U-Net for semantic segmentation of images (``dims=2``) or volumes (``dims=3``); returns per-class logits.

    Parameters
    ----------
    image_channels : int, optional
        Channels of the input image (1 for the paper's grey-scale images).
    num_classes : int, optional
        Output channels: one logit per class, no softmax.
    input_channels : sequence of int, optional
        Widths of the contracting-path levels; ``len(input_channels)`` is the
        depth (number of poolings).  The bottleneck has
        ``2 * input_channels[-1]`` channels.  The paper uses
        (64, 128, 256, 512), giving a 1024-channel bottleneck.
    padding : {0, 1}, optional
        0: the paper's valid convolutions (output smaller than input; see
        ``output_size``).  1: same-size convolutions; H and W must then be
        multiples of ``2**depth``.
    norm : {"layer", "batch", "group", "instance", "none"}, optional
        Normalisation after each 3x3 convolution.  The paper uses none.
    dropout : float, optional
        Drop probability at the end of the contracting path (the deepest
        encoder level and the bottleneck), as in the paper; 0 disables it.
    upsample : {"transpose", "bilinear"}, optional
        "transpose": the paper's 2x2 up-convolution; "bilinear": bilinear
        upsampling followed by a 1x1 convolution.
    boundary_class : bool, optional
        Two classes of objects: one more output, the border of the objects,
        as the paper's three-class baseline of the cell tracking data and most
        2018 Data Science Bowl entries learnt it (``out_channels`` =
        ``num_classes`` + 1; ``num_classes`` stays the user's classes).
    dims : {2, 3}, optional
        Spatial dimensions: (B, C, H, W) images or (B, C, D, H, W) volumes.
    kernel_sizes : sequence of sequences of int, optional
        For each of the ``depth + 1`` levels (the bottleneck last), the convolutions' kernel size along
        each axis, 3 or 1 (default 3 everywhere).
    pool_sizes : sequence of sequences of int, optional
        For each of the ``depth`` poolings, its factor along each axis, 2 or 1 (default 2 everywhere).

    Notes
    -----
    Weights are initialised as in the paper: every convolution weight is drawn
    from N(0, 2 / N), N the number of inputs of one output unit; biases are 0.

    Examples
    --------
    >>> UNet(1, 2, (8, 16), padding=1)(torch.zeros(1, 1, 64, 64)).shape
    torch.Size([1, 2, 64, 64])
    >>> net = UNet(1, 2, (8, 16), padding=1, dims=3, kernel_sizes=((1, 3, 3),) * 3, pool_sizes=((1, 2, 2),) * 2)
    >>> net(torch.zeros(1, 1, 5, 32, 32)).shape  # sections apart: convolved and pooled in-plane only
    torch.Size([1, 2, 5, 32, 32])
    """

    def __init__(
        self,
        image_channels: int = 1,
        num_classes: int = 2,
        input_channels: Sequence[int] = (64, 128, 256, 512),
        padding: int = 0,
        norm: str = "none",
        dropout: float = 0.0,
        upsample: str = "transpose",
        boundary_class: bool = False,
        dims: int = 2,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
        pool_sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        widths = tuple(input_channels)
        _check_arguments(image_channels, num_classes, widths, padding, norm, upsample, dropout, boundary_class)
        kernels, pools = _check_geometry(dims, len(widths), kernel_sizes, pool_sizes)

        self.image_channels = image_channels
        self.num_classes = num_classes
        self.input_channels = widths
        self.depth = len(widths)
        self.padding = padding
        self.norm = norm
        self.dropout = dropout
        self.upsample = upsample
        self.boundary_class = boundary_class
        self.out_channels = num_classes + int(boundary_class)
        self.dims, self.kernel_sizes, self.pool_sizes = dims, kernels, pools

        self.inc = DoubleConv(image_channels, widths[0], padding, norm, dims, kernels[0])
        self.downs = nn.ModuleList(
            Down(c_in, c_out, padding, norm, dims, pools[level], kernels[level + 1])
            for level, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:]))
        )
        self.bottleneck = Down(widths[-1], 2 * widths[-1], padding, norm, dims, pools[-1], kernels[-1])
        # Decoder level i gets the features of level i + 1 (the bottleneck for
        # the deepest) and the skip of encoder level i, and outputs widths[i].
        deeper = (*widths[1:], 2 * widths[-1])
        self.ups = nn.ModuleList(
            Up(c_deep, c_skip, padding, norm, upsample, c_skip, dims, pools[level], kernels[level])
            for level, c_deep, c_skip in reversed(list(zip(range(self.depth), deeper, widths)))
        )
        self.outc = CONVOLUTIONS[dims](widths[0], self.out_channels, kernel_size=1)
        # The paper (and its Caffe model) drops out the deepest encoder
        # features, which feed both the last skip and the bottleneck, and the
        # bottleneck output.
        self.encoder_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bottleneck_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Not part of the architecture (the weights are the same): set True to trade compute for memory
        self.activation_checkpointing = False

        self.apply(_he_init)

    def axis(self, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(kernel sizes of the levels, pooling factors)`` along spatial ``axis`` (0 .. dims - 1, or -1 for the
        last), for the size functions' ``kernels`` and ``pools``."""
        return tuple(k[axis] for k in self.kernel_sizes), tuple(p[axis] for p in self.pool_sizes)

    def output_size(self, input_size: int, axis: int = -1) -> int:
        """Return the output size along ``axis`` for an input size along it; see ``output_size``."""
        return output_size(input_size, self.depth, self.padding, *self.axis(axis))

    def valid_input_size(self, size: int, axis: int = -1) -> int:
        """Return the valid input size along ``axis`` nearest to ``size``; see ``nearest_valid_input_size``."""
        return nearest_valid_input_size(size, self.depth, self.padding, *self.axis(axis))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            Float images of shape (B, image_channels, H, W), or (B, image_channels, D, H, W) for
            ``dims=3``.  Every spatial size must be a valid input size along its axis (see
            ``valid_input_sizes``).

        Returns
        -------
        torch.Tensor
            Logits of shape (B, out_channels, output_size(H), output_size(W)) (or with D),
            same dtype as ``x`` (``out_channels``: ``num_classes``, and the
            boundary after them with ``boundary_class``).
        """
        if x.ndim != self.dims + 2 or x.shape[1] != self.image_channels:
            spatial = "H, W" if self.dims == 2 else "D, H, W"
            raise ValueError(f"expected a (B, {self.image_channels}, {spatial}) batch, got shape {tuple(x.shape)}")
        # Fail early with the nearest valid sizes rather than with a shape
        # mismatch deep inside the decoder.
        names = ("input height", "input width") if self.dims == 2 else ("input depth", "input height", "input width")
        for axis, (size, name) in enumerate(zip(x.shape[2:], names)):
            _output_size(size, self.depth, self.padding, name, *self.axis(axis))

        run = _checkpointed if self.activation_checkpointing and self.training and torch.is_grad_enabled() else _call
        skips = [run(self.inc, x)]
        for down in self.downs:
            skips.append(run(down, skips[-1]))
        skips[-1] = self.encoder_dropout(skips[-1])
        x = self.bottleneck_dropout(run(self.bottleneck, skips[-1]))
        for up, skip in zip(self.ups, reversed(skips)):
            x = run(up, x, skip)
        return self.outc(x)


def _check_arguments(image_channels, num_classes, widths, padding, norm, upsample, dropout, boundary_class) -> None:
    """A ValueError for the first constructor argument of ``UNet`` that no network has."""
    for name, value in (("image_channels", image_channels), ("num_classes", num_classes)):
        if not _is_positive_int(value):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not widths:
        raise ValueError("input_channels must list at least one level width, e.g. (64, 128, 256, 512)")
    if not all(_is_positive_int(w) for w in widths):
        raise ValueError(f"input_channels must be positive integers, got {widths!r}")
    if any(w < 2 for w in widths[1:]):
        raise ValueError(
            f"input_channels after the first must be at least 2, got {widths!r}: "
            "the decoder halves each of them when upsampling"
        )
    if padding not in (0, 1):
        raise ValueError(f"padding must be 0 (valid convolutions) or 1 (same size), got {padding!r}")
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(map(repr, NORMS))}")
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"unknown upsample mode {upsample!r}; choose one of {', '.join(map(repr, UPSAMPLE_MODES))}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not isinstance(boundary_class, bool) or (boundary_class and num_classes != 2):
        raise ValueError(f"boundary_class must be False, or True with num_classes=2, got {boundary_class!r}")


def _check_geometry(
    dims: int, depth: int, kernel_sizes: Sequence[Sequence[int]] | None, pool_sizes: Sequence[Sequence[int]] | None
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[int, ...], ...]]:
    """The kernel and pooling sizes per level and axis (the paper's by default); a ValueError for others than
    ``depth + 1`` kernels of 3 or 1 and ``depth`` poolings of 2 or 1 per axis, of ``dims`` axes each."""
    if dims not in CONVOLUTIONS:
        raise ValueError(f"dims must be 2 (images) or 3 (volumes), got {dims!r}")
    kernels, pools = default_geometry(depth, dims)
    kernels = kernels if kernel_sizes is None else tuple(tuple(int(k) for k in level) for level in kernel_sizes)
    pools = pools if pool_sizes is None else tuple(tuple(int(p) for p in level) for level in pool_sizes)
    shapes_fit = len(kernels) == depth + 1 and len(pools) == depth
    if not shapes_fit or any(len(level) != dims for level in (*kernels, *pools)):
        raise ValueError(
            f"a depth-{depth} U-Net in {dims}D takes {depth + 1} kernel sizes and {depth} pooling sizes of {dims} "
            f"axes each, got {kernels!r} and {pools!r}"
        )
    if any(k not in (1, 3) for level in kernels for k in level) or any(
        p not in (1, 2) for level in pools for p in level
    ):
        raise ValueError(f"kernel sizes are 3 or 1 and pooling sizes 2 or 1, got {kernels!r} and {pools!r}")
    return kernels, pools


def build_model(
    unet,
    boundary_class: bool = False,
    kernel_sizes: Sequence[Sequence[int]] | None = None,
    pool_sizes: Sequence[Sequence[int]] | None = None,
) -> UNet:
    """The U-Net of a config's ``unet`` section (``segmentation.settings.UNetSettings``, whose fields are this
    class's constructor arguments), with the object border as one more output where ``boundary_class``, and the
    kernel and pooling sizes per level and axis (as the run's plan decided them; default: the paper's)."""
    settings = {**dataclasses.asdict(unet), "boundary_class": boundary_class}
    return UNet(**settings, kernel_sizes=kernel_sizes, pool_sizes=pool_sizes)


def _checkpointed(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    # Keep only the block's inputs; its inner activations are recomputed in the backward pass.
    # A BatchNorm block updates its running statistics twice per step (in the forward pass and in
    # the recomputation), a negligible change of their momentum.
    return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)


def _call(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return block(*inputs)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
