"""U-Net (Ronneberger, Fischer & Brox, 2015) with the paper's size arithmetic.

The network is built from small named blocks (``DoubleConv``, ``Down``,
``Up``) in the style of milesial/Pytorch-UNet.  With ``padding=0`` it is the
paper's network: unpadded ("valid") 3x3 convolutions, so the output is smaller
than the input (572x572 -> 388x388) and only some input sizes fit.  The module
functions ``output_size`` and ``valid_input_sizes`` do that arithmetic so that
callers can pick tile sizes and crop targets without running the network.
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


class ChannelLayerNorm(nn.Module):
    """Layer normalisation over the channels of each pixel of a (B, C, H, W) map.

    This is ConvNeXt's ``LayerNorm2d``.  We prefer it to ``GroupNorm(1, C)``,
    which normalises over a whole (C, H, W) sample: those statistics depend on
    the size and content of the tile, so a tile would not get the same
    features as the same region of the whole image.  Statistics taken per pixel
    work for every input size and make tiled inference match whole-image
    inference exactly.

    Parameters
    ----------
    channels : int
        Number of channels C.
    eps : float, optional
        Added to the variance for numerical stability.

    Attributes
    ----------
    weight, bias : torch.nn.Parameter
        Learnable per-channel scale and shift, shape (C,), initialised to 1
        and 0.
    """

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` of shape (B, C, H, W); the result has the same shape."""
        # F.layer_norm normalises the trailing dimensions, so move C last.
        # the normalised shape comes from the weight, not the input, so that ONNX tracing sees a constant
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def make_norm(norm: str, channels: int) -> nn.Module:
    """Return the normalisation layer named ``norm`` (one of ``NORMS``) for ``channels`` channels.

    ``"group"`` uses ``gcd(channels, 8)`` groups so that any channel count works.
    """
    if norm == "layer":
        return ChannelLayerNorm(channels)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(map(repr, NORMS))}")


class DoubleConv(nn.Module):
    """(3x3 convolution => norm => ReLU) * 2.

    With ``padding=0`` (the paper's valid convolutions) each convolution trims
    one pixel from every border, so the block shrinks H and W by 4; with
    ``padding=1`` it keeps the size.
    """

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str) -> None:
        super().__init__()
        # A norm's learnable shift makes a convolution bias redundant.
        bias = norm == "none"
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=padding, bias=bias),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class Down(nn.Module):
    """2x2 max pooling, then DoubleConv."""

    def __init__(self, in_channels: int, out_channels: int, padding: int, norm: str) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(in_channels, out_channels, padding, norm),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


def center_crop(tensor: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the central ``height`` x ``width`` window of a (..., H, W) tensor.

    Returns a view with shape (..., height, width).  When H - height is odd
    the extra row is dropped from the bottom (likewise for columns).
    """
    in_height, in_width = tensor.shape[-2:]
    if not (0 < height <= in_height and 0 < width <= in_width):
        raise ValueError(
            f"cannot crop a {in_height}x{in_width} tensor to {height}x{width}: "
            "the crop size must be positive and no larger than the tensor"
        )
    top = (in_height - height) // 2
    left = (in_width - width) // 2
    return tensor[..., top : top + height, left : left + width]


class Up(nn.Module):
    """Upsample by 2 halving the channels, concatenate the cropped skip, then DoubleConv.

    ``upsample="transpose"`` is the paper's 2x2 up-convolution;
    ``"bilinear"`` is bilinear upsampling followed by a 1x1 convolution, which
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
    ) -> None:
        super().__init__()
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        elif upsample == "bilinear":
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, in_channels // 2, kernel_size=1),
            )
        else:
            raise ValueError(
                f"unknown upsample mode {upsample!r}; choose one of {', '.join(map(repr, UPSAMPLE_MODES))}"
            )
        if skip_channels is None:
            skip_channels = in_channels // 2
        self.conv = DoubleConv(skip_channels + in_channels // 2, out_channels, padding, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` (B, C, h, w) and merge ``skip`` (B, C_skip, H, W), H >= 2h, W >= 2w."""
        x = self.up(x)
        # Valid convolutions leave the skip larger than the upsampled map: the
        # paper crops it ("crop and copy").  With padding 1 this is a no-op.
        skip = center_crop(skip, x.shape[-2], x.shape[-1])
        return self.conv(torch.cat([skip, x], dim=1))


def _check_depth_padding(depth: int, padding: int) -> None:
    if depth < 1:
        raise ValueError(f"depth must be at least 1 (got {depth})")
    if padding not in (0, 1):
        raise ValueError(f"padding must be 0 (valid convolutions) or 1 (same size), got {padding!r}")


def _walk(size: int, depth: int, padding: int) -> tuple[int | None, str]:
    """Follow one spatial size through the network: (output size, "") or (None, reason)."""
    shrink = 4 if padding == 0 else 0  # per DoubleConv: two 3x3 convs trim 1 px per border each
    too_small = "a feature map would shrink below one pixel"
    if size < 1:
        return None, too_small
    size -= shrink
    if size < 1:
        return None, too_small
    for _ in range(depth):
        # MaxPool2d would silently floor an odd size, and the skip would then
        # no longer line up with the upsampled map.
        if size % 2:
            return None, "every pooling needs an even size"
        size = size // 2 - shrink
        if size < 1:
            return None, too_small
    for _ in range(depth):
        size = 2 * size - shrink
        if size < 1:
            return None, too_small
    return size, ""


def valid_input_sizes(size: int, depth: int, padding: int) -> tuple[int | None, int]:
    """Return the nearest valid input sizes ``(below, above)`` with ``below <= size <= above``.

    Parameters
    ----------
    size : int
        Input height or width in pixels.
    depth : int
        Number of poolings (``len(input_channels)`` of ``UNet``).
    padding : int
        0 for valid convolutions, 1 for same-size convolutions.

    Returns
    -------
    below : int or None
        Largest valid size <= ``size``; None when ``size`` is below the
        smallest valid size.
    above : int
        Smallest valid size >= ``size``.  Both equal ``size`` when it is valid.
    """
    _check_depth_padding(depth, padding)
    shrink = 4 if padding == 0 else 0
    # The encoder is invertible: bottleneck size b comes from exactly one input
    # size, 2**depth * b + offset, and every such input pools even sizes.  So
    # the valid inputs are that progression for all b at which the decoder
    # stays positive, which holds for every b from some b_min on.
    period = 2**depth
    offset = 0
    for _ in range(depth):
        offset = 2 * (offset + shrink)
    offset += shrink
    b_min = 1
    while _walk(period * b_min + offset, depth, padding)[0] is None:
        b_min += 1
    b_below = (size - offset) // period
    b_above = -((offset - size) // period)
    below = period * b_below + offset if b_below >= b_min else None
    above = period * max(b_above, b_min) + offset
    return below, above


def nearest_valid_input_size(size: int, depth: int, padding: int) -> int:
    """Return the valid input size closest to ``size`` (the larger one on a tie)."""
    below, above = valid_input_sizes(size, depth, padding)
    if below is None or above - size <= size - below:
        return above
    return below


def _output_size(size: int, depth: int, padding: int, what: str) -> int:
    _check_depth_padding(depth, padding)
    out, reason = _walk(size, depth, padding)
    if out is not None:
        return out
    below, above = valid_input_sizes(size, depth, padding)
    nearest = (
        f"nearest valid sizes are {below} and {above}" if below is not None else f"the smallest valid size is {above}"
    )
    raise ValueError(
        f"{what} {size} does not fit a depth-{depth} U-Net with padding {padding}: "
        f"{reason}; {nearest} (crop or pad the input to one of them)"
    )


def output_size(input_size: int, depth: int, padding: int) -> int:
    """Return the output height or width of a U-Net for an input height or width.

    Parameters
    ----------
    input_size : int
        Input height or width in pixels.
    depth : int
        Number of poolings.
    padding : int
        0 for valid convolutions (each shrinks the size by 2), 1 for
        same-size convolutions.

    Returns
    -------
    int
        Output size in pixels, e.g. 388 for 572 at depth 4 with padding 0.

    Raises
    ------
    ValueError
        If the size does not fit: a pooling would see an odd size or a
        feature map would vanish.  The message names the nearest valid sizes.
    """
    return _output_size(input_size, depth, padding, "input size")


# the backward pass holds about this many copies of the largest feature map at once: gradients of a block's output
# and input, the skip's gradient waiting for the encoder, the concatenation's, the kernels' reordered copies
# (measured on a CPU, steps of 1 to 8 tiles: 3 to 8)
GRADIENT_MAPS = 10
PREDICTION_MAPS = 3  # a block predicting without gradients holds its input, a convolution's output and the norm's


def unet_parameter_count(unet, out_channels: int) -> int:
    """The trainable parameters of the U-Net of a config's ``unet`` section (``build_model``; any object with
    its fields) with ``out_channels`` outputs, counted from the widths alone, without building it."""
    widths, per_channel = tuple(unet.input_channels), 1 if unet.norm == "none" else 2  # a bias; a norm's 2

    def double(c_in: int, c_out: int) -> int:
        return 9 * c_in * c_out + 9 * c_out * c_out + 2 * per_channel * c_out

    deeper = (*widths[1:], 2 * widths[-1])  # the output widths of the Downs and the bottleneck
    total = sum(double(c_in, c_out) for c_in, c_out in zip((unet.image_channels, *widths), (widths[0], *deeper)))
    for c_deep, c_skip in zip(deeper, widths):
        half = c_deep // 2
        total += (4 if unet.upsample == "transpose" else 1) * c_deep * half + half + double(c_skip + half, c_skip)
    return total + (widths[0] + 1) * out_channels


def forward_maps(unet, out_channels: int, tile: int, element_size: int = 4) -> list[tuple[list[int], int]]:
    """The tensors that one ``tile`` x ``tile`` image makes in a training forward pass of the U-Net of a config's
    ``unet`` section with ``out_channels`` outputs, block by block (``inc``, each ``Down``, the bottleneck,
    each ``Up``, then the output layer and the loss): ``(bytes of each tensor that the block makes and autograd
    keeps for the backward pass, bytes of the block's output)``. Feature maps take ``element_size`` bytes a value
    (4: fp32, 2: bf16 or fp16 autocast), pooling indices 8, dropout masks 1; ``tile`` must be a valid input."""
    widths = tuple(unet.input_channels)
    deeper = (*widths[1:], 2 * widths[-1])
    shrink = 2 if unet.padding == 0 else 0  # a 3x3 convolution's loss of side
    copies = 1 if unet.norm == "none" else 2  # a convolution's output, and the norm's (ReLU works in place)

    def maps(channels: int, side: int, size: int = element_size) -> int:
        return channels * side * side * size

    def double(channels: int, side: int) -> tuple[list[int], int]:
        first, second = side - shrink, side - 2 * shrink
        return [maps(channels, first)] * copies + [maps(channels, second)] * copies, second

    tensors, side = double(widths[0], tile)
    blocks = [(tensors, maps(widths[0], side))]
    for c_in, c_out in zip(widths, deeper):
        pooled = side // 2
        tensors, side = double(c_out, pooled)
        blocks.append(([maps(c_in, pooled), maps(c_in, pooled, 8), *tensors], maps(c_out, side)))  # pooled, indices
    if unet.dropout > 0:  # the deepest encoder level and the bottleneck: each an output and a mask
        for level in (len(widths) - 1, len(widths)):
            tensors, output = blocks[level]
            blocks[level] = ([*tensors, output, output // element_size], output)
    for c_deep, c_skip in zip(reversed(deeper), reversed(widths)):
        side, half = 2 * side, c_deep // 2
        upsampled = [maps(half, side)] if unet.upsample == "transpose" else [maps(c_deep, side), maps(half, side)]
        tensors, out = double(c_skip, side)
        blocks.append(([*upsampled, maps(c_skip + half, side), *tensors], maps(c_skip, out)))
        side = out
    # the logits, then the loss's log-probabilities, per-pixel loss and weighted loss (fp32)
    blocks.append(([maps(out_channels, side), maps(out_channels + 3, side, 4)], maps(out_channels, side)))
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


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _he_init(module: nn.Module) -> None:
    """Paper initialisation: weights ~ N(0, 2 / N), N = inputs to one output unit."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        fan_in = module.in_channels / module.groups * math.prod(module.kernel_size)
        if isinstance(module, nn.ConvTranspose2d):
            # Each output pixel of a transposed convolution only sees the
            # kernel taps that land on it: one per stride cell.
            fan_in /= math.prod(module.stride)
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (ChannelLayerNorm, nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class UNet(nn.Module):
    """U-Net for semantic segmentation; returns per-class logits.

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

    Notes
    -----
    Weights are initialised as in the paper: every convolution weight is drawn
    from N(0, 2 / N), N the number of inputs of one output unit; biases are 0.
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
    ) -> None:
        super().__init__()
        widths = tuple(input_channels)
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
            raise ValueError(
                f"unknown upsample mode {upsample!r}; choose one of {', '.join(map(repr, UPSAMPLE_MODES))}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(boundary_class, bool) or (boundary_class and num_classes != 2):
            raise ValueError(f"boundary_class must be False, or True with num_classes=2, got {boundary_class!r}")

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

        self.inc = DoubleConv(image_channels, widths[0], padding, norm)
        self.downs = nn.ModuleList(Down(c_in, c_out, padding, norm) for c_in, c_out in zip(widths[:-1], widths[1:]))
        self.bottleneck = Down(widths[-1], 2 * widths[-1], padding, norm)
        # Decoder level i gets the features of level i + 1 (the bottleneck for
        # the deepest) and the skip of encoder level i, and outputs widths[i].
        deeper = (*widths[1:], 2 * widths[-1])
        self.ups = nn.ModuleList(
            Up(c_deep, c_skip, padding, norm, upsample, skip_channels=c_skip)
            for c_deep, c_skip in zip(reversed(deeper), reversed(widths))
        )
        self.outc = nn.Conv2d(widths[0], self.out_channels, kernel_size=1)
        # The paper (and its Caffe model) drops out the deepest encoder
        # features, which feed both the last skip and the bottleneck, and the
        # bottleneck output.
        self.encoder_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bottleneck_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Not part of the architecture (the weights are the same): set True to trade compute for memory
        self.activation_checkpointing = False

        self.apply(_he_init)

    def output_size(self, input_size: int) -> int:
        """Return the output height or width for an input height or width; see ``output_size``."""
        return output_size(input_size, self.depth, self.padding)

    def valid_input_size(self, size: int) -> int:
        """Return the valid input size nearest to ``size``; see ``nearest_valid_input_size``."""
        return nearest_valid_input_size(size, self.depth, self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch of images.

        Parameters
        ----------
        x : torch.Tensor
            Float images of shape (B, image_channels, H, W).  H and W must be
            valid input sizes (see ``valid_input_sizes``).

        Returns
        -------
        torch.Tensor
            Logits of shape (B, out_channels, output_size(H), output_size(W)),
            same dtype as ``x`` (``out_channels``: ``num_classes``, and the
            boundary after them with ``boundary_class``).
        """
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"expected a (B, {self.image_channels}, H, W) batch, got shape {tuple(x.shape)}")
        # Fail early with the nearest valid sizes rather than with a shape
        # mismatch deep inside the decoder.
        _output_size(x.shape[-2], self.depth, self.padding, "input height")
        _output_size(x.shape[-1], self.depth, self.padding, "input width")

        run = _checkpointed if self.activation_checkpointing and self.training and torch.is_grad_enabled() else _call
        skips = [run(self.inc, x)]
        for down in self.downs:
            skips.append(run(down, skips[-1]))
        skips[-1] = self.encoder_dropout(skips[-1])
        x = self.bottleneck_dropout(run(self.bottleneck, skips[-1]))
        for up, skip in zip(self.ups, reversed(skips)):
            x = run(up, x, skip)
        return self.outc(x)


def build_model(unet, boundary_class: bool = False) -> UNet:
    """The U-Net of a config's ``unet`` section (``segmentation.settings.UNetSettings``, whose fields are this
    class's constructor arguments), with the object border as one more output where ``boundary_class``
    (as the run's plan decided ``unet.boundary_class``)."""
    return UNet(**{**dataclasses.asdict(unet), "boundary_class": boundary_class})


def _checkpointed(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    # Keep only the block's inputs; its inner activations are recomputed in the backward pass.
    # A BatchNorm block updates its running statistics twice per step (in the forward pass and in
    # the recomputation), a negligible change of their momentum.
    return torch.utils.checkpoint.checkpoint(block, *inputs, use_reentrant=False)


def _call(block: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    return block(*inputs)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
