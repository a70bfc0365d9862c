"""segmentation.runs.diagnostics against independent references: finite differences, gradients and
submodule outputs computed by hand."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from losses import IGNORE_LABEL, segmentation_loss
from model import center_crop
from segmentation.runs.diagnostics import (
    activation_maps,
    in_annotation,
    input_saliency,
    layer_gradient_norms,
)
from tests.helpers import TILE, modes, sample, tiny_unet


def assert_no_grads(model):
    assert all(parameter.grad is None for parameter in model.parameters())


def reference_loss(model, image, label, weight):
    """The paper's weighted cross-entropy written out in float64 (the library's loss works in float32)."""
    logits = model(image)
    height, width = logits.shape[-2:]
    pixel_loss = F.cross_entropy(logits, center_crop(label, height, width), reduction="none")
    weight = center_crop(weight, height, width)
    return float((weight * pixel_loss).sum() / weight.sum())


def test_saliency_equals_finite_differences_max_over_channels():
    model = tiny_unet(image_channels=2).double()
    image, label, weight = sample(image_channels=2, dtype=torch.float64)
    model.train()
    model.inc.double_conv[1].eval()  # a mixed state must come back as it was
    before = modes(model)

    saliency = input_saliency(model, image, label, weight)

    assert saliency.shape == (TILE, TILE)
    assert modes(model) == before
    assert_no_grads(model)
    top = torch.topk(saliency.flatten(), 3).indices
    pixels = [divmod(int(index), TILE) for index in top] + [(0, 0), (30, 30), (12, 47), (59, 3)]
    step = 1e-6
    with torch.no_grad():
        model.eval()
        for row, column in pixels:
            derivatives = []
            for channel in range(2):
                plus, minus = image.clone(), image.clone()
                plus[0, channel, row, column] += step
                minus[0, channel, row, column] -= step
                difference = reference_loss(model, plus, label, weight) - reference_loss(model, minus, label, weight)
                derivatives.append(abs(difference) / (2 * step))
            expected = max(derivatives)
            assert float(saliency[row, column]) == pytest.approx(expected, rel=1e-4, abs=1e-6 * float(saliency.max()))


def test_saliency_accepts_labels_of_the_output_size():
    model = tiny_unet()
    image, label, weight = sample()
    margin = (TILE - model.output_size(TILE)) // 2
    inner = (slice(None), slice(margin, TILE - margin), slice(margin, TILE - margin))
    whole = input_saliency(model, image, label, weight)
    cropped = input_saliency(model, image, label[inner], weight[inner])
    assert torch.allclose(whole, cropped)
    assert whole.max() > 0


def test_layer_gradient_norms_match_autograd_and_leave_the_model_alone():
    model = tiny_unet()
    image, label, weight = sample()
    model.train()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}

    norms = layer_gradient_norms(model, image, label, weight, loss_kind="ce+dice")

    assert modes(model) == [True] * len(modes(model))
    assert_no_grads(model)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers[name]), f"{name} changed"
    names, parameters = zip(*model.named_parameters())
    assert [name for name, _, _ in norms] == list(names)
    model.eval()
    loss = segmentation_loss("ce+dice", model(image), label, weight)
    gradients = torch.autograd.grad(loss, parameters)
    for (name, gradient_norm, weight_norm), gradient, parameter in zip(norms, gradients, parameters):
        assert gradient_norm == pytest.approx(float(torch.linalg.norm(gradient)), rel=1e-5, abs=1e-12), name
        assert weight_norm == pytest.approx(float(torch.linalg.norm(parameter.detach())), rel=1e-6), name
    assert any(gradient_norm > 0 for _, gradient_norm, _ in norms)


def test_activation_maps_equal_the_submodule_outputs():
    model = tiny_unet()
    image, _, _ = sample()
    model.train()

    maps = activation_maps(model, image, channels=3)

    assert modes(model) == [True] * len(modes(model))
    assert all(len(module._forward_hooks) == 0 for module in model.modules())
    model.eval()
    with torch.no_grad():
        inc = model.inc(image)
        down = model.downs[0](inc)
        bottleneck = model.bottleneck(down)
        up0 = model.ups[0](bottleneck, down)
        up1 = model.ups[1](up0, inc)
    expected = {"inc": inc, "downs.0": down, "bottleneck": bottleneck, "ups.0": up0, "ups.1": up1}
    assert list(maps) == list(expected)
    for name, output in expected.items():
        assert maps[name].shape == (3, *output.shape[-2:]), name
        assert maps[name].device.type == "cpu"
        assert torch.allclose(maps[name], output[0, :3], atol=1e-6), name


def test_activation_maps_named_layers_and_fewer_channels_than_asked():
    model = tiny_unet()
    image, _, _ = sample()
    maps = activation_maps(model, image, layers=["ups.1.up", "outc"], channels=8)
    assert list(maps) == ["ups.1.up", "outc"]
    assert maps["ups.1.up"].shape == (4, 24, 24)  # the up-convolution halves 8 channels
    assert maps["outc"].shape == (2, 20, 20)


def test_activation_maps_are_not_overwritten_by_in_place_layers():
    # The first BatchNorm's output is rectified in place by the ReLU that follows it.
    model = tiny_unet()
    image, _, _ = sample()
    maps = activation_maps(model, image, layers=["inc.double_conv.1"])
    model.eval()
    with torch.no_grad():
        expected = model.inc.double_conv[1](model.inc.double_conv[0](image))[0, :8]
    assert (expected < 0).any()
    assert torch.allclose(maps["inc.double_conv.1"], expected, atol=1e-6)


def test_activation_maps_reject_unknown_layers_and_remove_hooks_on_error():
    model = tiny_unet()
    image, _, _ = sample()
    with pytest.raises(ValueError, match="'nope'") as error:
        activation_maps(model, image, layers=["inc", "nope"])
    for name in ("inc", "downs.0", "bottleneck", "ups.1", "outc"):
        assert name in str(error.value).split("available:")[1]
    with pytest.raises(ValueError, match="did not run"):
        activation_maps(model, image, layers=["downs"])
    model.train()
    with pytest.raises(ValueError, match="input height 61"):
        activation_maps(model, torch.rand(1, 1, 61, TILE))
    assert all(len(module._forward_hooks) == 0 for module in model.modules())
    assert modes(model) == [True] * len(modes(model))


def test_predicted_objects_mostly_where_nobody_annotated_are_left_out_of_the_matching():
    objects = np.zeros((10, 10), np.int32)
    objects[0:3, 0:3] = 1  # all annotated
    objects[5:9, 5:9] = 2  # 4 of its 16 px annotated: mostly unannotated
    objects[0:4, 6:8] = 3  # 4 of its 8 px annotated: half, kept
    label = np.full((10, 10), IGNORE_LABEL, np.int64)
    label[:, :5] = 0
    label[5, 5:9] = 1
    label[0:2, 6:8] = 1
    kept = in_annotation(objects, label)
    assert sorted(np.unique(kept).tolist()) == [0, 1, 3] and np.array_equal(kept == 3, objects == 3)
    assert in_annotation(objects, np.zeros((10, 10), np.int64)) is objects  # all annotated: as they are
