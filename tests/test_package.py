"""segmentation.inference.package: bioimage.io packages whose sizes, test tensors and weights are checked against
the network itself, and against bioimageio.core's own `bioimageio test` where it is installed."""

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from model import UNet
from segmentation.config import UserError, load_config
from segmentation.inference.package import export_package, readme


def packaged(tmp_path, padding: int, channels: int, classes: int, dataset: str = "folder"):
    """A random depth-2 U-Net exported with a 70 x 90 px random image; returns (model, rdf, folder)."""
    config = load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            f"unet.padding={padding}",
            f"unet.image_channels={channels}",
            f"unet.num_classes={classes}",
            f"train.dataset_name={dataset}",
        ],
    )
    torch.manual_seed(0)
    model = UNet(channels, classes, (4, 8), padding=padding, norm="batch").eval()
    image = np.random.default_rng(0).normal(3.0, 2.0, (channels, 70, 90)).astype(np.float32)
    summary = export_package(
        model, tmp_path / "model.zip", config.unet, config.data, image, {"pixel error": 0.1}, "A. User"
    )
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        archive.extractall(tmp_path / "package")
    assert sorted(summary["files"]) == sorted(path.name for path in (tmp_path / "package").iterdir())
    return model, yaml.safe_load((tmp_path / "package" / "rdf.yaml").read_text()), tmp_path / "package"


def sizes_that_run(model: UNet, largest: int = 100) -> list[int]:
    """The square input sizes up to ``largest`` that the network takes, found by running it."""
    sizes = []
    for side in range(1, largest + 1):
        try:
            with torch.no_grad():
                model(torch.zeros(1, model.image_channels, side, side))
        except (ValueError, RuntimeError):
            continue
        sizes.append(side)
    return sizes


@pytest.mark.parametrize("padding, channels, classes", [(0, 1, 2), (1, 3, 3)])
def test_the_package_describes_the_network_and_its_weights_reproduce_the_test_output(
    tmp_path, padding, channels, classes
):
    model, rdf, folder = packaged(tmp_path, padding, channels, classes)
    assert rdf["type"] == "model" and rdf["format_version"].startswith("0.5.") and rdf["license"] == "MIT"
    assert (
        rdf["cite"][0]["doi"] == "10.1007/978-3-319-24574-4_28" and "# Validation" in (folder / "README.md").read_text()
    )
    assert rdf["authors"] == [{"name": "A. User"}] and "github_user" not in str(rdf) and "http" not in str(rdf)
    (image,) = rdf["inputs"]
    (output,) = rdf["outputs"]
    sizes = sizes_that_run(model)
    smallest, step = sizes[0], sizes[1] - sizes[0]
    assert sizes == list(range(smallest, 101, step))  # a minimum and a step: what the description says
    assert [axis["size"] for axis in image["axes"][2:]] == [{"min": smallest, "step": step}] * 2
    with torch.no_grad():
        margins = {side - model(torch.zeros(1, channels, side, side)).shape[-1] for side in sizes}
    assert len(margins) == 1  # the output is the input less a fixed margin, its offset
    (margin,) = margins
    assert [axis["size"]["offset"] for axis in output["axes"][2:]] == [-margin, -margin]
    assert output["axes"][1]["channel_names"] == ["background", *(f"class_{c}" for c in range(1, classes))]
    assert image["axes"][1]["channel_names"] == (["gray"] if channels == 1 else ["red", "green", "blue"])
    # the test output: the softmax of the network on the test input normalised to zero mean and unit variance
    test_input = np.load(folder / "test_input.npy")
    assert test_input.dtype == np.float32 and test_input.shape[:2] == (1, channels)
    normalised = (test_input - test_input.mean()) / test_input.std()
    with torch.no_grad():
        expected = model(torch.from_numpy(normalised)).softmax(1).numpy()
    np.testing.assert_allclose(np.load(folder / "test_output.npy"), expected, atol=1e-5)
    # each weight format gives the network's output, also at another valid size
    other = torch.randn(2, channels, smallest + 8, smallest + 12)
    torchscript = torch.jit.load(str(folder / rdf["weights"]["torchscript"]["source"]))
    spec = importlib.util.spec_from_file_location("packaged_model", folder / "model.py")
    packaged_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packaged_model)
    rebuilt = packaged_model.UNet(**rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"]).eval()
    rebuilt.load_state_dict(torch.load(folder / rdf["weights"]["pytorch_state_dict"]["source"], weights_only=True))
    with torch.no_grad():
        for network in (torchscript, rebuilt):
            torch.testing.assert_close(network(other), model(other))


def test_the_known_data_sets_name_their_classes(tmp_path):
    _, rdf, _ = packaged(tmp_path, 0, 1, 2, dataset="isbi2012")
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["membrane", "cell"]


def test_a_package_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path):
    config = load_config(None, ["unet.input_channels=[4, 8]"])
    model = UNet(1, 2, (4, 8), norm="batch")
    image = np.zeros((1, 64, 64), np.float32)
    with pytest.raises(UserError, match=r"^--export .*model.zip: cannot write the package \(") as caught:
        export_package(model, tmp_path / "missing" / "model.zip", config.unet, config.data, image, {})
    assert "\n" not in str(caught.value) and not (tmp_path / "missing").exists()


@pytest.mark.slow
def test_bioimageio_core_passes_the_package_of_a_trained_model(trained, tmp_path, capsys):
    if shutil.which("bioimageio") is None:
        pytest.skip("bioimageio.core is not installed (pip install bioimageio.core 'pydantic<2.14')")
    import test_script

    _, summary = trained
    assert (
        test_script.main(
            ["--checkpoint", str(summary.folders.weights / "best.pt"), "--export", str(tmp_path / "m.zip")]
        )
        == 0
    )
    assert "largest differences from PyTorch: torchscript" in capsys.readouterr().out
    command = ["bioimageio", "test", str(tmp_path / "m.zip"), "--summary", str(tmp_path / "summary.json")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    report = json.loads((tmp_path / "summary.json").read_text())
    assert report["status"] == "passed" and all(detail["status"] == "passed" for detail in report["details"])
    checks = [detail["name"] for detail in report["details"]]
    for weight_format in ("onnx", "pytorch_state_dict", "torchscript"):
        assert f"Reproduce test outputs from test inputs ({weight_format})" in checks
        assert sum(name.startswith(f"Run {weight_format} inference for inputs") for name in checks) == 6


def test_without_the_onnx_package_the_package_goes_without_onnx_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import now raises ImportError
    _, rdf, folder = packaged(tmp_path, 0, 1, 2)
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript"} and not (folder / "weights.onnx").exists()


def test_the_package_says_when_the_model_learnt_from_masks_annotated_in_part():
    config = load_config(None, ["train.ignore_value=128"])
    text = readme(config.unet, config.data, ["background", "cell"], {})
    assert "It learnt from masks annotated in part: the value 128 marked the pixels nobody annotated" in text
    assert "annotated in part" not in readme(config.unet, load_config(None, []).data, ["background", "cell"], {})
