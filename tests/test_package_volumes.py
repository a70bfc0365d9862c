"""segmentation.inference.package for 3D networks: bioimage.io packages of volumes, with the axes z, y and x sized
as the network's own size arithmetic says along each axis, the voxel spacing as their scale, a test input cut from
a volume, TorchScript and ONNX weights that run at every valid size, and bioimageio.core's `bioimageio test`."""

import importlib.util
import json
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import skimage.io
import skimage.transform
import test_script
import torch
import yaml

from model import UNet, output_size, valid_input_sizes
from segmentation.config import load_config
from segmentation.data.synthetic_volumes import synthetic_em_volume
from segmentation.inference.package import exact_scale, export_package
from segmentation.inference.trained import load_trained
from tests.helpers import TINY_3D
from training import train

KERNELS = ((1, 3, 3), (1, 3, 3), (3, 3, 3))  # the plan of volumes of spacing (5, 1, 1): z not pooled
POOLS = ((1, 2, 2), (1, 2, 2))
SPACING = (5.0, 1.0, 1.0)


def unpacked(path, folder):
    """The package at ``path`` extracted into ``folder``; returns its rdf.yaml as data."""
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder)
    return yaml.safe_load((folder / "rdf.yaml").read_text())


def packaged_volume(tmp_path, padding: int):
    """A random 3D U-Net of the synthetic volumes' plan exported with a 12 x 40 x 40 synthetic volume; returns
    (model, volume (1, 12, 40, 40), rdf, folder)."""
    config = load_config(None, [*TINY_3D, f"unet.padding={padding}", "unet.num_classes=3"])
    torch.manual_seed(0)
    model = UNet(1, 3, (4, 8), padding=padding, norm="batch", dims=3, kernel_sizes=KERNELS, pool_sizes=POOLS).eval()
    volume = synthetic_em_volume(12, 40, np.random.default_rng(0))[0][None]
    summary = export_package(
        model, tmp_path / "model.zip", config.unet, config.data, volume, {"pixel error": 0.1}, "A. User", SPACING
    )
    rdf = unpacked(tmp_path / "model.zip", tmp_path / "package")
    assert sorted(summary["files"]) == sorted(path.name for path in (tmp_path / "package").iterdir())
    return model, volume, rdf, tmp_path / "package"


def valid_sizes(model: UNet, axis: int, largest: int = 120) -> list[int]:
    """The valid input sizes up to about ``largest`` along spatial ``axis``, from ``valid_input_sizes``."""
    kernels, pools = model.axis(axis)
    return sorted(
        {valid_input_sizes(size, model.depth, model.padding, kernels, pools)[1] for size in range(1, largest)}
    )


def expected_axes(model: UNet) -> list[tuple[str, int, int, int]]:
    """``(id, min, step, offset)`` of the z, y and x axes: the smallest valid size, the step between valid sizes
    (checked to be one progression), and the output's size less the input's (checked to be one number)."""
    axes = []
    for axis, name in enumerate("zyx"):
        sizes = valid_sizes(model, axis)
        smallest, step = sizes[0], sizes[1] - sizes[0]
        assert sizes == list(range(smallest, sizes[-1] + 1, step))
        offsets = {output_size(size, model.depth, model.padding, *model.axis(axis)) - size for size in sizes}
        assert len(offsets) == 1
        axes.append((name, smallest, step, offsets.pop()))
    return axes


def described_axes(tensor: dict) -> list[tuple]:
    """``(id, size, scale)`` of a tensor description's space axes."""
    return [(axis["id"], axis["size"], axis.get("scale")) for axis in tensor["axes"][2:]]


def mirrored_window(volume: np.ndarray, shape) -> np.ndarray:
    """The window of ``shape`` (D, H, W) at the corner of ``volume`` (C, D, H, W), mirrored beyond its far sides."""
    beyond = [(0, max(0, side - length)) for side, length in zip(shape, volume.shape[1:])]
    padded = np.pad(volume, [(0, 0), *beyond], mode="reflect")
    return padded[(slice(None), *(slice(0, side) for side in shape))]


def check_package(model: UNet, volume: np.ndarray, rdf: dict, folder) -> None:
    """The package of ``model`` describes its z, y and x axes, and its test tensors and weights reproduce it."""
    (image,) = rdf["inputs"]
    (output,) = rdf["outputs"]
    assert [axis["type"] for axis in image["axes"]] == ["batch", "channel", "space", "space", "space"]
    assert [axis["type"] for axis in output["axes"]] == ["batch", "channel", "space", "space", "space"]
    axes = expected_axes(model)
    assert axes[0][2] == 1  # z is never pooled: every size from the smallest on
    assert described_axes(image) == [
        (name, {"min": least, "step": step}, scale) for (name, least, step, _), scale in zip(axes, SPACING)
    ]
    assert described_axes(output) == [
        (name, {"tensor_id": "image", "axis_id": name, "offset": offset}, scale)
        for (name, _, _, offset), scale in zip(axes, SPACING)
    ]
    assert image["preprocessing"][0]["kwargs"]["axes"] == ["channel", "z", "y", "x"]
    assert "3d" in rdf["tags"] and "2d" not in rdf["tags"]
    # the test input: a window of the volume, valid along every axis, and the network's softmax on it normalised
    test_input = np.load(folder / "test_input.npy")
    assert test_input.dtype == np.float32 and test_input.shape[:2] == (1, 1)
    assert all(side in valid_sizes(model, axis) for axis, side in enumerate(test_input.shape[2:]))
    np.testing.assert_array_equal(test_input[0], mirrored_window(volume.astype(np.float32), test_input.shape[2:]))
    normalised = (test_input - test_input.mean()) / test_input.std()
    with torch.no_grad():
        expected = model(torch.from_numpy(normalised)).softmax(1).numpy()
    np.testing.assert_allclose(np.load(folder / "test_output.npy"), expected, atol=1e-5)
    cover = skimage.io.imread(folder / rdf["covers"][0])  # the middle section of the output, resized to 256 px
    probabilities = np.load(folder / "test_output.npy")
    middle = probabilities[0, :, probabilities.shape[2] // 2].argmax(0) / (probabilities.shape[1] - 1)
    assert cover.shape == (256, 512)
    np.testing.assert_array_equal(
        cover[:, 256:], (255 * skimage.transform.resize(middle, (256, 256), order=0)).astype(np.uint8)
    )
    text = (folder / "README.md").read_text()
    assert (
        "3D network" in text and "(5.0, 1.0, 1.0)" in text and "1x3x3, 1x3x3, 3x3x3" in text and "1x2x2, 1x2x2" in text
    )
    # each weight format gives the network's logits at the test input's size and at another valid size
    other = tuple(least + k * step for (_, least, step, _), k in zip(axes, (3, 2, 3)))
    for shape in (test_input.shape[2:], other):
        check_weights(model, rdf, folder, torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(1)))


def check_weights(model: UNet, rdf: dict, folder, sample: torch.Tensor) -> None:
    """TorchScript, ONNX (onnxruntime) and the state dict with the packaged model.py give ``model``'s logits on
    ``sample`` within 1e-4."""
    import onnxruntime

    with torch.no_grad():
        expected = model(sample)
    assert expected.shape[2:] == tuple(
        output_size(side, model.depth, model.padding, *model.axis(axis)) for axis, side in enumerate(sample.shape[2:])
    )
    torchscript = torch.jit.load(str(folder / rdf["weights"]["torchscript"]["source"]))
    spec = importlib.util.spec_from_file_location("packaged_model", folder / "model.py")
    packaged_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packaged_model)
    rebuilt = packaged_model.UNet(**rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]).eval()
    rebuilt.load_state_dict(torch.load(folder / rdf["weights"]["pytorch_state_dict"]["source"], weights_only=True))
    with torch.no_grad():
        for network in (torchscript, rebuilt):
            torch.testing.assert_close(network(sample), expected, atol=1e-4, rtol=0)
    session = onnxruntime.InferenceSession(
        str(folder / rdf["weights"]["onnx"]["source"]), providers=["CPUExecutionProvider"]
    )
    (logits,) = session.run(None, {session.get_inputs()[0].name: sample.numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("padding", [1, 0])
def test_a_3d_package_has_the_network_s_axes_spacing_test_tensors_and_weights(tmp_path, padding):
    pytest.importorskip("onnxruntime")
    model, volume, rdf, folder = packaged_volume(tmp_path, padding)
    check_package(model, volume, rdf, folder)
    kwargs = rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]
    assert kwargs["dims"] == 3 and kwargs["kernel_sizes"] == [list(level) for level in KERNELS]
    assert rdf["inputs"][0]["test_tensor"]["source"] == "test_input.npy" and rdf["name"].startswith("3D U-Net")


def test_a_spacing_that_does_not_divide_out_again_becomes_its_nearest_float32():
    sizes = np.arange(1, 2**16)
    for spacing in (5.0, 1.0, 0.5, 0.1, 0.3, 0.04, 0.0065):
        scale = exact_scale(spacing)
        assert abs(scale - spacing) <= 1e-7 * spacing
        # bioimageio.spec sizes an output axis as int(size * scale / scale + offset)
        assert all(int(size * scale / scale - 40) == size - 40 for size in sizes.tolist())
    assert exact_scale(5.0) == 5.0 and exact_scale(0.5) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("padding", [1, 0])
def test_bioimageio_core_passes_the_package_of_a_trained_3d_model(tmp_path, padding, capsys):
    if shutil.which("bioimageio") is None:
        pytest.skip("bioimageio.core is not installed (pip install bioimageio.core 'pydantic<2.14')")
    paths = [f"train.{key}={tmp_path / key}" for key in ("save_path", "log_path", "cache_dir")]
    result = train(load_config(None, [*TINY_3D, f"unet.padding={padding}", *paths, "train.run_name=volumes"]))
    checkpoint = result.folders.weights / "best.pt"
    assert test_script.main(["--checkpoint", str(checkpoint), "--export", str(tmp_path / "m.zip")]) == 0
    assert "largest differences from PyTorch: torchscript" in capsys.readouterr().out
    for name in ("m.pt", "m.onnx"):  # TorchScript and ONNX alone, traced at the plan's tile (depth, height, width)
        assert test_script.main(["--checkpoint", str(checkpoint), "--export", str(tmp_path / name)]) == 0
    assert "onnxruntime and PyTorch differ by at most" in capsys.readouterr().out
    trained = load_trained(checkpoint)
    assert trained.plan.spacing == SPACING and trained.model.kernel_sizes == KERNELS
    volume = trained.datasets(lambda _: None).val[0][0].numpy()  # the first validation volume, (1, 16, 32, 32)
    rdf = unpacked(tmp_path / "m.zip", tmp_path / "package")
    check_package(trained.model, volume, rdf, tmp_path / "package")

    command = ["bioimageio", "test", str(tmp_path / "m.zip"), "--summary", str(tmp_path / "summary.json")]
    outcome = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert outcome.returncode == 0, outcome.stdout[-3000:]
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["status"] == "passed" and all(detail["status"] == "passed" for detail in report["details"])
    checks = [detail["name"] for detail in report["details"]]
    for weight_format in ("onnx", "pytorch_state_dict", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({weight_format})" in checks
        assert sum(name.startswith(f"Run {weight_format} inference for inputs") for name in checks) == 6
