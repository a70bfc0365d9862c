"""bench.py's measurements: the FLOP count of a forward pass against a count by hand from the paper's sizes."""

import torch

from model import UNet
from segmentation.benchmarks.speed import forward_flops


def unet_flops_by_hand(widths: list[int], size: int, image_channels: int = 1, classes: int = 2) -> int:
    """2 x the multiply-adds of the paper's U-Net (valid 3x3 convolutions, 2x2 up-convolutions, a 1x1
    output layer) on a ``size`` x ``size`` input, walked level by level."""
    flops, channels, skips = 0, image_channels, []

    def double_conv(channels_in: int, channels_out: int, side: int) -> tuple[int, int]:
        first, second = side - 2, side - 4  # each valid 3x3 convolution trims one pixel per border
        return 2 * 9 * (channels_in * channels_out * first**2 + channels_out * channels_out * second**2), second

    for level, width in enumerate([*widths, 2 * widths[-1]]):
        if level:
            size //= 2  # 2x2 max pooling
        count, size = double_conv(channels, width, size)
        flops, channels = flops + count, width
        skips.append(width)
    for width in reversed(widths):
        flops += 2 * 4 * channels * (channels // 2) * size**2  # 2x2 up-convolution: 4 taps per input pixel
        size *= 2
        count, size = double_conv(width + channels // 2, width, size)
        flops, channels = flops + count, width
    return flops + 2 * channels * classes * size**2  # the 1x1 output layer


def test_forward_flops_of_the_paper_network_match_the_count_by_hand():
    widths = [64, 128, 256, 512]
    assert unet_flops_by_hand(widths, 572) == forward_flops(UNet(1, 2, widths), 1, 572)
    assert unet_flops_by_hand([4, 8], 92, 3, 5) == forward_flops(UNet(3, 5, [4, 8]), 3, 92)


def test_forward_flops_leave_the_model_where_it_was():
    model = UNet(1, 2, [4, 8])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    forward_flops(model, 1, 92)
    assert all(tensor.device == torch.device("cpu") for tensor in model.state_dict().values())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
