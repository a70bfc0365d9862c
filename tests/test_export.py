"""segmentation.inference.export: ONNX with dynamic sizes checked by onnxruntime against PyTorch, and one-line
errors."""

import sys

import pytest
import torch

from segmentation.config import UserError
from segmentation.inference.export import check_onnx, export_onnx
from tests.helpers import TILE, modes, tiny_unet


@pytest.mark.parametrize(
    ("padding", "norm", "upsample", "export_size", "check_shape"),
    [
        (0, "batch", "transpose", 60, (2, 1, 84, 68)),
        (1, "batch", "transpose", 32, (2, 1, 48, 80)),
        (0, "layer", "bilinear", 60, (2, 1, 68, 84)),
    ],
)
def test_onnx_export_has_dynamic_sizes(tmp_path, padding, norm, upsample, export_size, check_shape):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = tiny_unet(padding=padding, norm=norm, upsample=upsample)
    model.train()
    layer_types = [type(module) for module in model.modules()]
    path = tmp_path / "unet.onnx"
    export_onnx(model, path, image_channels=1, sample_size=export_size)
    assert modes(model) == [True] * len(modes(model))
    assert [type(module) for module in model.modules()] == layer_types  # the export traced a copy
    generator = torch.Generator().manual_seed(2)
    for shape in ((1, 1, export_size, export_size), check_shape):
        difference = check_onnx(model, path, torch.rand(shape, generator=generator))
        assert difference < 1e-4, shape
    assert modes(model) == [True] * len(modes(model))


def test_onnx_export_rejects_an_invalid_sample_size(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="input size 61 .* nearest valid sizes are 60 and 64"):
        export_onnx(tiny_unet(), tmp_path / "unet.onnx", image_channels=1, sample_size=61)


def test_onnx_missing_packages_give_one_line_errors(tmp_path, monkeypatch):
    model = tiny_unet()
    # A None entry in sys.modules makes `import onnx` raise ImportError.
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(UserError) as error:
        export_onnx(model, tmp_path / "unet.onnx", image_channels=1, sample_size=TILE)
    assert str(error.value) == "ONNX export needs the onnx package: pip install onnx onnxruntime"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UserError, match=r"^ONNX check needs the onnxruntime package: pip install onnx onnxruntime$"):
        check_onnx(model, tmp_path / "unet.onnx", torch.rand(1, 1, TILE, TILE))
