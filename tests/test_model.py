"""Tests for model.py: paper facts, size arithmetic, blocks, initialisation, dropout."""

import math
import re

import pytest
import torch
from torch import nn

from model import (
    NORMS,
    UPSAMPLE_MODES,
    ChannelLayerNorm,
    DoubleConv,
    Down,
    UNet,
    Up,
    build_model,
    center_crop,
    count_parameters,
    make_norm,
    nearest_valid_input_size,
    output_size,
    valid_input_sizes,
)
from segmentation.config import resolve
from segmentation.memory import (
    forward_maps,
    prediction_activation_bytes,
    training_activation_bytes,
    unet_parameter_count,
)

TINY = (4, 8)


def is_valid(size, depth, padding):
    try:
        output_size(size, depth, padding)
    except ValueError:
        return False
    return True


# --- paper facts -------------------------------------------------------------


def test_paper_parameter_count():
    model = UNet(1, 2, (64, 128, 256, 512), padding=0, norm="none")
    assert count_parameters(model) == 31_030_658


def test_count_parameters_skips_frozen():
    model = UNet(1, 2, TINY)
    total = count_parameters(model)
    model.outc.weight.requires_grad_(False)
    assert count_parameters(model) == total - model.outc.weight.numel()


def test_paper_output_sizes():
    assert output_size(572, 4, 0) == 388
    assert output_size(188, 4, 0) == 4
    assert output_size(512, 4, 1) == 512
    assert UNet().output_size(572) == 388


def test_paper_network_shapes_on_meta_device():
    # The meta device runs the full-width network's shape logic without the
    # arithmetic, so the real layer stack is checked at paper size for free.
    with torch.device("meta"):
        valid = UNet(1, 2, (64, 128, 256, 512), padding=0)
        same = UNet(1, 2, (64, 128, 256, 512), padding=1)
        assert valid(torch.empty(1, 1, 572, 572)).shape == (1, 2, 388, 388)
        assert same(torch.empty(1, 1, 512, 512)).shape == (1, 2, 512, 512)


@torch.no_grad()
def test_small_width_forward_572_to_388():
    model = UNet(1, 2, (4, 8, 16, 32), padding=0).eval()
    assert model(torch.randn(1, 1, 572, 572)).shape == (1, 2, 388, 388)


@pytest.mark.parametrize("size", [64, 512])
@torch.no_grad()
def test_padding_one_keeps_size(size):
    model = UNet(1, 2, (4, 8, 16, 32), padding=1).eval()
    assert output_size(size, 4, 1) == size
    assert model(torch.randn(1, 1, size, size)).shape == (1, 2, size, size)


# --- size arithmetic ---------------------------------------------------------


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize(
    "height, width",
    [(92, 92), (92, 100), (116, 92), (93, 92), (92, 101), (96, 92), (64, 64), (64, 72), (72, 40), (63, 64)],
)
@torch.no_grad()
def test_forward_shape_matches_output_size(height, width, padding):
    model = UNet(2, 3, (4, 8, 16), padding=padding).eval()
    x = torch.randn(1, 2, height, width)
    if is_valid(height, 3, padding) and is_valid(width, 3, padding):
        expected = (1, 3, output_size(height, 3, padding), output_size(width, 3, padding))
        assert model(x).shape == expected
    else:
        side = "height" if not is_valid(height, 3, padding) else "width"
        with pytest.raises(ValueError, match=f"input {side}"):
            model(x)


def test_parametrised_sizes_cover_both_outcomes():
    # Guards the table above against silently testing only one branch.
    sizes = [92, 100, 116, 93, 101, 96, 64, 72, 40, 63]
    assert {is_valid(s, 3, 0) for s in sizes} == {True, False}
    assert {is_valid(s, 3, 1) for s in sizes} == {True, False}


@pytest.mark.parametrize(
    "size, depth, padding",
    [(570, 4, 0), (573, 4, 0), (200, 4, 0), (1001, 3, 0), (102, 2, 1), (50, 3, 1), (131, 1, 0)],
)
def test_invalid_size_message_names_nearest_valid_sizes(size, depth, padding):
    with pytest.raises(ValueError) as info:
        output_size(size, depth, padding)
    message = str(info.value)
    assert str(size) in message
    below, above = map(int, re.search(r"nearest valid sizes are (\d+) and (\d+)", message).groups())
    assert below < size < above
    assert is_valid(below, depth, padding) and is_valid(above, depth, padding)
    assert not any(is_valid(s, depth, padding) for s in range(below + 1, above))


def test_message_for_paper_example():
    with pytest.raises(ValueError, match="even size; nearest valid sizes are 556 and 572"):
        output_size(570, 4, 0)


def test_too_small_size_names_smallest_valid_size():
    with pytest.raises(ValueError, match="smallest valid size is 188"):
        output_size(100, 4, 0)
    assert valid_input_sizes(100, 4, 0) == (None, 188)


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("padding", [0, 1])
def test_valid_input_sizes_match_brute_force(depth, padding):
    valid = [s for s in range(1, 1500) if is_valid(s, depth, padding)]
    for size in range(-2, 1000):
        below = max((v for v in valid if v <= size), default=None)
        above = min(v for v in valid if v >= size)
        assert valid_input_sizes(size, depth, padding) == (below, above), size


def test_padding_one_valid_sizes_are_multiples_of_two_to_the_depth():
    assert [s for s in range(1, 100) if is_valid(s, 4, 1)] == [16, 32, 48, 64, 80, 96]


def test_nearest_valid_input_size():
    assert nearest_valid_input_size(572, 4, 0) == 572
    assert nearest_valid_input_size(558, 4, 0) == 556
    assert nearest_valid_input_size(564, 4, 0) == 572  # tie: larger
    assert nearest_valid_input_size(10, 4, 0) == 188
    assert UNet().valid_input_size(570) == 572
    assert UNet(padding=1).valid_input_size(500) == 496


@pytest.mark.parametrize("depth, padding", [(0, 0), (4, 2)])
def test_size_functions_reject_bad_network(depth, padding):
    with pytest.raises(ValueError):
        output_size(572, depth, padding)
    with pytest.raises(ValueError):
        valid_input_sizes(572, depth, padding)


# --- blocks ------------------------------------------------------------------


def test_center_crop():
    x = torch.arange(7 * 6).reshape(1, 7, 6)
    assert torch.equal(center_crop(x, 3, 2), x[..., 2:5, 2:4])
    assert torch.equal(center_crop(x, 6, 5), x[..., 0:6, 0:5])
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(x, 8, 2)


def test_channel_layer_norm_matches_hand_computation():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(5))
        norm.bias.copy_(torch.randn(5))
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64) * 3 + 1
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps)
    expected = expected * norm.weight.double().view(1, -1, 1, 1) + norm.bias.double().view(1, -1, 1, 1)
    assert torch.allclose(norm.double()(x), expected, atol=1e-10)
    assert norm.weight.shape == norm.bias.shape == (5,)


def test_make_norm():
    assert isinstance(make_norm("layer", 6), ChannelLayerNorm)
    assert isinstance(make_norm("batch", 6), nn.BatchNorm2d)
    group = make_norm("group", 12)
    assert isinstance(group, nn.GroupNorm) and group.num_groups == 4
    assert make_norm("group", 5).num_groups == 1
    instance = make_norm("instance", 6)
    assert isinstance(instance, nn.InstanceNorm2d) and instance.affine
    assert isinstance(make_norm("none", 6), nn.Identity)
    with pytest.raises(ValueError, match="'layer'"):
        make_norm("layernorm", 6)


@pytest.mark.parametrize("norm", NORMS)
def test_double_conv_sizes_and_bias(norm):
    valid = DoubleConv(3, 5, padding=0, norm=norm)
    same = DoubleConv(3, 5, padding=1, norm=norm)
    x = torch.randn(2, 3, 12, 10)
    assert valid(x).shape == (2, 5, 8, 6)
    assert same(x).shape == (2, 5, 12, 10)
    convs = [m for m in valid.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2
    assert all((c.bias is not None) == (norm == "none") for c in convs)


def test_down_halves_then_convolves():
    assert Down(3, 6, padding=0, norm="none")(torch.randn(1, 3, 20, 16)).shape == (1, 6, 6, 4)


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
def test_up_crops_skip_and_halves_channels(upsample):
    up = Up(8, 4, padding=0, norm="none", upsample=upsample)
    out = up(torch.randn(1, 8, 5, 6), torch.randn(1, 4, 16, 18))
    assert out.shape == (1, 4, 6, 8)
    assert up.conv.double_conv[0].in_channels == 8
    with pytest.raises(ValueError, match="'bilinear'"):
        Up(8, 4, padding=0, norm="none", upsample="nearest")


def test_up_concatenates_cropped_skip_first():
    # With identity-like weights the first output channels must be the centre
    # of the skip, proving crop position and concatenation order.
    up = Up(2, 1, padding=1, norm="none", upsample="transpose", skip_channels=1)
    with torch.no_grad():
        for module in up.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.weight.zero_()
                module.bias.zero_()
        first = up.conv.double_conv[0]
        first.weight[0, 0, 1, 1] = 1.0  # pass the skip channel through
        up.conv.double_conv[3].weight[0, 0, 1, 1] = 1.0
    skip = torch.rand(1, 1, 8, 8)
    out = up(torch.rand(1, 2, 4, 4), skip)
    assert torch.equal(out, skip)


# --- the whole network -------------------------------------------------------


@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_and_upsample_trains(norm, upsample):
    torch.manual_seed(0)
    model = UNet(1, 3, TINY, padding=1, norm=norm, upsample=upsample)
    expected_norm = type(make_norm(norm, 4))
    blocks = [m for m in model.modules() if isinstance(m, DoubleConv)]
    assert len(blocks) == 2 * len(TINY) + 1
    assert all(isinstance(b.double_conv[i], expected_norm) for b in blocks for i in (1, 4))
    out = model(torch.randn(2, 1, 16, 12))
    assert out.shape == (2, 3, 16, 12)
    out.square().mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert model.outc.weight.grad.abs().sum() > 0


def test_upsample_modes_have_same_channel_counts():
    a = UNet(1, 2, (4, 8, 16), upsample="transpose")
    b = UNet(1, 2, (4, 8, 16), upsample="bilinear")
    shapes_a = [p.shape for n, p in a.named_parameters() if ".up." not in n]
    shapes_b = [p.shape for n, p in b.named_parameters() if ".up." not in n]
    assert shapes_a == shapes_b


@torch.no_grad()
def test_depth_one_and_non_doubling_widths():
    assert UNet(1, 2, (4,), padding=1)(torch.randn(1, 1, 6, 4)).shape == (1, 2, 6, 4)
    model = UNet(3, 2, (4, 6, 10), padding=0)
    assert model.bottleneck.maxpool_conv[1].double_conv[0].out_channels == 20
    assert model(torch.randn(1, 3, 92, 100)).shape == (1, 2, 4, 12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"padding": 2}, "padding"),
        ({"norm": "layernorm"}, "norm"),
        ({"upsample": "nearest"}, "upsample"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"input_channels": ()}, "at least one"),
        ({"input_channels": (4, 0)}, "positive"),
        ({"input_channels": (4.0, 8)}, "positive"),
        ({"input_channels": (4, 1)}, "at least 2"),
        ({"image_channels": 0}, "image_channels"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**{"input_channels": TINY, **kwargs})


def test_forward_rejects_bad_input_shape():
    model = UNet(1, 2, TINY, padding=1)
    with pytest.raises(ValueError, match="input height 15"):
        model(torch.randn(1, 1, 15, 16))
    with pytest.raises(ValueError, match="input width 18"):
        model(torch.randn(1, 1, 16, 18))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 16, 16))


@torch.no_grad()
def tile_and_whole(norm):
    torch.manual_seed(0)
    model = UNet(1, 2, TINY, padding=0, norm=norm).double().eval()
    image = torch.randn(1, 1, 76, 76, dtype=torch.float64)
    whole = model(image)
    # Tile corners on multiples of 2**depth keep the pooling grid aligned.
    top, left = 8, 12
    tile = model(image[..., top : top + 48, left : left + 52])
    return tile, whole[..., top : top + tile.shape[-2], left : left + tile.shape[-1]]


def test_layer_norm_tile_equals_crop_of_whole_image():
    tile, crop = tile_and_whole("layer")
    assert tile.shape == (1, 2, 8, 12)
    assert torch.allclose(tile, crop, atol=1e-10)


def test_group_norm_tile_differs_from_whole_image():
    # Shows the check above is sensitive: per-sample statistics break it.
    tile, crop = tile_and_whole("group")
    assert not torch.allclose(tile, crop, atol=1e-4)


# --- initialisation ----------------------------------------------------------


def test_he_initialisation():
    torch.manual_seed(0)
    model = UNet(1, 2, (32, 64), padding=0, norm="batch")
    conv = model.downs[0].maxpool_conv[1].double_conv[3]  # Conv2d(64, 64, 3)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    assert abs(conv.weight.mean().item()) < 0.05 * math.sqrt(2 / (9 * 64))
    transposed = model.ups[0].up  # ConvTranspose2d(128, 64, 2, stride=2)
    assert isinstance(transposed, nn.ConvTranspose2d) and transposed.in_channels == 128
    assert transposed.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    assert torch.count_nonzero(transposed.bias) == 0
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def test_he_initialisation_of_1x1_convs_and_biases():
    torch.manual_seed(0)
    model = UNet(1, 2, (32, 64), padding=0, norm="none", upsample="bilinear")
    one_by_one = model.ups[0].up[1]  # Conv2d(128, 64, 1)
    assert one_by_one.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.05)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            assert torch.count_nonzero(module.bias) == 0


# --- dropout -----------------------------------------------------------------


def test_dropout_absent_when_zero():
    assert not any(isinstance(m, nn.Dropout) for m in UNet(1, 2, TINY).modules())


def test_dropout_present_when_configured():
    dropouts = [m for m in UNet(1, 2, TINY, dropout=0.3).modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 2 and all(d.p == 0.3 for d in dropouts)


def test_dropout_at_end_of_contracting_path():
    torch.manual_seed(0)
    p = 0.5
    model = UNet(1, 2, TINY, padding=1, dropout=p).train()
    seen = {}
    model.downs[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("encoder", o.clone()))
    model.bottleneck.register_forward_pre_hook(lambda m, i: seen.__setitem__("pooled", i[0].clone()))
    model.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("bottleneck", o.clone()))
    model.ups[0].register_forward_pre_hook(lambda m, i: seen.update(up_x=i[0].clone(), skip=i[1].clone()))
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16))

    def is_dropped(before, after):
        kept = after != 0
        return (
            bool(torch.any(before[~kept] != 0))  # something was zeroed
            and torch.allclose(after[kept], before[kept] / (1 - p))
        )

    assert is_dropped(seen["encoder"], seen["skip"])
    assert torch.equal(seen["pooled"], seen["skip"])  # the same dropped map feeds the bottleneck
    assert is_dropped(seen["bottleneck"], seen["up_x"])


@torch.no_grad()
def test_eval_mode_is_deterministic():
    torch.manual_seed(0)
    model = UNet(1, 2, TINY, padding=1, dropout=0.5)
    x = torch.randn(1, 1, 16, 16)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_build_model_builds_the_network_that_the_unet_section_describes():
    unet = resolve(
        {
            "unet": {
                "input_channels": [4, 8, 16],
                "image_channels": 3,
                "num_classes": 5,
                "padding": 1,
                "norm": "group",
                "upsample": "bilinear",
                "dropout": 0.25,
            },
            "train": {"dataset_name": "folder"},  # the synthetic images have 2 or 3 classes
        }
    ).unet
    torch.manual_seed(0)
    built = build_model(unet)
    torch.manual_seed(0)
    expected = UNet(3, 5, (4, 8, 16), padding=1, norm="group", dropout=0.25, upsample="bilinear")
    assert {name: tensor.shape for name, tensor in built.state_dict().items()} == {
        name: tensor.shape for name, tensor in expected.state_dict().items()
    }
    assert all(torch.equal(tensor, expected.state_dict()[name]) for name, tensor in built.state_dict().items())
    assert isinstance(built.encoder_dropout, torch.nn.Dropout) and built.encoder_dropout.p == 0.25


def test_the_boundary_class_is_one_more_output_after_the_classes():
    model = UNet(image_channels=1, num_classes=2, input_channels=TINY, padding=1, boundary_class=True)
    assert (model.num_classes, model.out_channels) == (2, 3)
    assert model(torch.zeros(1, 1, 16, 16)).shape == (1, 3, 16, 16)
    with pytest.raises(ValueError, match="boundary_class must be False, or True with num_classes=2"):
        UNet(num_classes=3, input_channels=TINY, boundary_class=True)
    plain = resolve({"unet": {"input_channels": list(TINY)}}).unet
    assert plain.boundary_class == "auto"
    assert build_model(plain).out_channels == 2  # without data, auto has no border class
    assert build_model(plain, boundary_class=True).out_channels == 3


def unet_section(widths, image_channels=1, padding=0, norm="batch", upsample="transpose", dropout=0.0):
    """A config's unet section (as ``build_model`` and the memory arithmetic take it)."""
    unet = {"input_channels": list(widths), "image_channels": image_channels, "padding": padding, "norm": norm}
    return resolve({"unet": {**unet, "upsample": upsample, "dropout": dropout}}).unet


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("upsample", UPSAMPLE_MODES)
@pytest.mark.parametrize("widths, image_channels, out_channels", [((4, 8), 1, 2), ((3, 5, 7), 3, 3), ((16,), 2, 4)])
def test_the_parameter_count_from_the_widths_is_the_built_networks(
    norm, upsample, widths, image_channels, out_channels
):
    unet = unet_section(widths, image_channels, norm=norm, upsample=upsample)
    model = UNet(image_channels, out_channels, widths, norm=norm, upsample=upsample)
    assert unet_parameter_count(unet, out_channels) == count_parameters(model)


def test_the_paper_network_has_31030658_parameters_by_the_arithmetic():
    assert unet_parameter_count(unet_section((64, 128, 256, 512), norm="none"), 2) == 31_030_658


def test_forward_maps_of_a_depth_one_network_by_hand():
    """Depth 1, widths (2,), no norm, 20 px: inc 20 -> 18 -> 16 px (2 channels), pooled to 8 (2 channels, int64
    indices), bottleneck 8 -> 6 -> 4 (4 channels), up to 8 (2 channels), concatenated with the cropped skip (4
    channels), 8 -> 6 -> 4 (2 channels), logits 2 x 4 x 4, the loss's 5 x 4 x 4 fp32 values."""
    blocks = forward_maps(unet_section((2,), norm="none"), 2, 20)
    assert blocks == [
        ([4 * 2 * 18 * 18, 4 * 2 * 16 * 16], 4 * 2 * 16 * 16),
        ([4 * 2 * 8 * 8, 8 * 2 * 8 * 8, 4 * 4 * 6 * 6, 4 * 4 * 4 * 4], 4 * 4 * 4 * 4),
        ([4 * 2 * 8 * 8, 4 * 4 * 8 * 8, 4 * 2 * 6 * 6, 4 * 2 * 4 * 4], 4 * 2 * 4 * 4),
        ([4 * 2 * 4 * 4, 4 * 5 * 4 * 4], 4 * 2 * 4 * 4),
    ]
    assert sum(map(sum, (tensors for tensors, _ in blocks))) == 9408
    largest = 4 * 2 * 18 * 18
    assert training_activation_bytes(blocks) == 9408 + 10 * largest
    assert prediction_activation_bytes(blocks) == 4 * 2 * 16 * 16 + 3 * largest  # the skip, and one block's maps
    # with a norm every convolution keeps two maps; bf16 halves the maps but not the indices or the loss
    with_norm = forward_maps(unet_section((2,), norm="batch"), 2, 20, element_size=2)
    assert with_norm[0][0] == [2 * 2 * 18 * 18] * 2 + [2 * 2 * 16 * 16] * 2
    assert with_norm[1][0][1] == 8 * 2 * 8 * 8 and with_norm[-1][0][1] == 4 * 5 * 4 * 4


def saved_bytes(model: UNet, tile: int) -> int:
    """The bytes of the tensors that autograd keeps for the backward pass of one image (weights and the input
    not counted), measured by a saved-tensors hook, with the loss the training step computes."""
    from losses import segmentation_loss

    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    image = torch.randn(1, model.image_channels, tile, tile)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(image)
        side = logits.shape[-1]
        segmentation_loss("ce", logits, torch.zeros(1, side, side, dtype=torch.long), torch.ones(1, side, side))
    own = {tensor.untyped_storage().data_ptr() for tensor in [*model.parameters(), *model.buffers(), image]}
    return sum(size for pointer, size in storages.items() if pointer not in own)


@pytest.mark.parametrize(
    "widths, padding, norm, upsample, dropout, tile",
    [
        ((16, 32, 64, 128), 0, "batch", "transpose", 0.0, 252),  # the shipped config
        ((16, 32, 64, 128), 0, "none", "bilinear", 0.5, 252),
        ((8, 16), 1, "group", "transpose", 0.0, 128),
        ((4, 8), 0, "layer", "transpose", 0.0, 60),
    ],
)
def test_forward_maps_count_what_autograd_keeps_within_ten_percent(widths, padding, norm, upsample, dropout, tile):
    torch.manual_seed(0)
    model = UNet(1, 2, widths, padding=padding, norm=norm, upsample=upsample, dropout=dropout)
    counted = sum(
        sum(tensors) for tensors, _ in forward_maps(unet_section(widths, 1, padding, norm, upsample, dropout), 2, tile)
    )
    assert 0.9 <= counted / saved_bytes(model, tile) <= 1.1
