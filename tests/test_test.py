"""test.py as a user runs it: the logged scores reproduced from the masks it writes, diagnostics, object ids and
F1, ONNX export, and one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
import skimage.io
import test_script
import tifffile
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error

from model import build_model
from segmentation.config import UserError, resolve
from tests.helpers import (
    ROOT,
    datasets_of,
    folder_config,
    logged_row,
    make_id_folder,
    segment,
    tiny_config,
)
from training import train


@pytest.mark.slow
def test_test_py_reproduces_the_logged_scores_from_the_masks_it_writes(trained, tmp_path, capsys):
    """Train, then test.py as a user runs it: its diagnostics of the validation images print the scores that
    training logged for best.pt's epoch; the masks it writes, read back and scored here with NumPy and
    scikit-image against the mask files, give the same scores; and the same images segmented as files
    (--input) give the same masks (an image from its file and from the cache is the same image)."""
    root, summary = trained
    best = summary.folders.weights / "best.pt"
    row = logged_row(summary, torch.load(best, weights_only=True)["progress"]["best_epoch"])
    capsys.readouterr()
    assert test_script.main(["--checkpoint", str(best), "--output", str(tmp_path / "diagnostics")]) == 0
    table = capsys.readouterr().out
    overall = next(line for line in table.splitlines() if line.split()[:1] == ["all"]).split()
    for column, key in ((1, "val_pixel_error"), (2, "val_dice"), (4, "val_rand_error")):  # printed to 4 decimals
        assert float(overall[column]) == pytest.approx(float(row[key]), abs=1e-4), key
    names = {path.name for path in (tmp_path / "diagnostics").glob("*.png")}
    assert {"val_000.png", "val_002.png", "saliency_000.png", "gradient_norms.png", "activations.png"} <= names
    assert "Rand error" in table and table.count("slice0") == 3
    images = str(root / "val" / "images")
    assert segment(str(best), images, str(tmp_path / "files")) == 0
    wrong = total = 0
    rand_errors = []
    for mask_path in sorted((root / "val" / "masks").glob("*.png")):
        truth = skimage.io.imread(mask_path)
        written = skimage.io.imread(tmp_path / "diagnostics" / "masks" / mask_path.name)
        assert written.shape == truth.shape and written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
        np.testing.assert_array_equal(skimage.io.imread(tmp_path / "files" / mask_path.name), written)
        wrong += np.count_nonzero(written != truth)
        total += truth.size
        truth_cells, written_cells = (measure.label(mask == 255, connectivity=1) for mask in (truth, written))
        rand_errors.append(adapted_rand_error(truth_cells, written_cells)[0])
    assert wrong / total == pytest.approx(float(row["val_pixel_error"]), abs=1e-9)
    assert np.mean(rand_errors) == pytest.approx(float(row["val_rand_error"]), abs=1e-9)


@pytest.mark.slow
def test_export_writes_onnx_and_torchscript_and_refuses_other_files(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _, summary = trained
    best = str(summary.folders.weights / "best.pt")
    for name in ("unet.onnx", "unet.pt"):
        assert test_script.main(["--checkpoint", best, "--export", str(tmp_path / name)]) == 0
        assert (tmp_path / name).stat().st_size > 1000
        difference = float(capsys.readouterr().out.split("differ by at most ")[1].split()[0])
        assert difference < 1e-4
    model = torch.jit.load(str(tmp_path / "unet.pt"))  # TorchScript as QuPath loads it, at a size not traced
    state = torch.load(best, weights_only=True)
    reference = build_model(resolve(state["config"]).unet)
    reference.load_state_dict(state["model"])
    image = torch.randn(1, 1, 124, 140)
    with torch.no_grad():
        torch.testing.assert_close(model(image), reference.eval()(image))
    for name in ("unet.pt", "unet.onnx", "unet.zip"):
        assert test_script.main(["--checkpoint", best, "--export", str(tmp_path / "missing" / name)]) == 1
        error = capsys.readouterr().err.strip().splitlines()
        destination, folder = tmp_path / "missing" / name, tmp_path / "missing"
        assert error == [f"error: --export {destination}: cannot write to {folder} (not a writable folder)"]
    assert test_script.main(["--checkpoint", best, "--export", str(tmp_path / "unet.h5")]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: --export {tmp_path / 'unet.h5'}: write MODEL.zip (bioimage.io package), MODEL.pt (TorchScript) "
        "or MODEL.onnx"
    )


@pytest.mark.slow
def test_errors_are_one_line(trained, tmp_path, capsys):
    root, summary = trained
    best = str(summary.folders.weights / "best.pt")
    (tmp_path / "broken.png").write_bytes(b"no image")
    cases = [
        (["--input", str(tmp_path / "missing.png")], "no such file or folder"),
        (["--input", str(tmp_path / "broken.png")], "broken.png: cannot read this image"),
        (
            ["--input", str(root / "val" / "images"), "--output", str(root / "val" / "images")],
            "would overwrite its input",
        ),
    ]
    tifffile.imwrite(
        tmp_path / "two.tif", np.zeros((20, 20, 2), np.uint8), photometric="minisblack", planarconfig="contig"
    )
    cases.append(
        (
            ["--input", str(tmp_path / "two.tif"), "--output", str(tmp_path / "o")],
            "an image of 2 channels; the model takes 1",
        )
    )
    (tmp_path / "a_file").write_text("in the way")
    cases.append(
        (["--input", str(root / "val" / "images"), "--output", str(tmp_path / "a_file")], "File exists")
    )  # an OSError, one line too
    for arguments, message in cases:
        capsys.readouterr()
        assert test_script.main(["--checkpoint", best, *arguments]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (arguments, lines)
    assert (root / "val" / "images" / "slice00.png").stat().st_size > 0  # the input is still there


def brute_force_f1(truth: np.ndarray, predicted: np.ndarray) -> tuple[int, int, int]:
    """Matched objects at IoU > 0.5, by the full IoU matrix: ``(matched, true, predicted)``."""
    true_ids, predicted_ids = [i for i in np.unique(truth) if i], [j for j in np.unique(predicted) if j]
    matched = sum(
        1
        for i in true_ids
        for j in predicted_ids
        if np.count_nonzero((truth == i) & (predicted == j)) / np.count_nonzero((truth == i) | (predicted == j)) > 0.5
    )
    return matched, len(true_ids), len(predicted_ids)


@pytest.mark.slow
def test_instance_output_and_object_f1(trained, tmp_path, capsys):
    root, summary = trained
    best = str(summary.folders.weights / "best.pt")
    assert segment(best, str(root / "val" / "images"), str(tmp_path / "files"), "--instances") == 0
    for mask_path in sorted((tmp_path / "files").glob("slice??.png")):
        ids = tifffile.imread(tmp_path / "files" / f"{mask_path.stem}_instances.tif")
        expected = measure.label(skimage.io.imread(mask_path) == 255, connectivity=1)
        assert ids.dtype == np.uint16 and ids.max() == expected.max() and np.array_equal(ids > 0, expected > 0)
        assert (
            len(np.unique(np.stack([ids.ravel(), expected.ravel()]), axis=1)[0]) == expected.max() + 1
        )  # the same partition
    capsys.readouterr()
    assert test_script.main(["--checkpoint", best, "--output", str(tmp_path / "diagnostics"), "--instances"]) == 0
    table = capsys.readouterr().out
    totals = np.zeros(3, int)
    for mask_path in sorted((root / "val" / "masks").glob("*.png")):
        truth = measure.label(skimage.io.imread(mask_path) == 255, connectivity=1)
        written = skimage.io.imread(tmp_path / "diagnostics" / "masks" / mask_path.name)
        predicted = measure.label(written == 255, connectivity=1)
        assert np.array_equal(
            tifffile.imread(tmp_path / "diagnostics" / "masks" / f"{mask_path.stem}_instances.tif") > 0, predicted > 0
        )
        totals += brute_force_f1(truth, predicted)
    f1 = 2 * totals[0] / (totals[1] + totals[2])
    line = next(line for line in table.splitlines() if line.strip().startswith("all"))
    assert float(line.split()[-1]) == pytest.approx(f1, abs=1e-4)
    assert f"objects at IoU 0.5: {totals[0]} of {totals[1]} true and {totals[2]} predicted matched" in table


@pytest.mark.slow
def test_id_masks_train_a_border_class_that_test_py_turns_into_objects_and_scores(tmp_path, capsys):
    make_id_folder(tmp_path, count=6, size=96)
    split = ["train.val_images=[4]", "train.test_images=[5]", "train.run_name=ids"]
    summary = train(folder_config(tmp_path, "train.max_epochs=3", *split))
    best = torch.load(summary.folders.weights / "best.pt", weights_only=True)
    assert best["plan"]["boundary_class"] is True and best["model"]["outc.weight"].shape[0] == 3
    data = datasets_of(folder_config(tmp_path, *split))
    areas = [area for entry in data.train.images for area in entry.object_areas]
    learnt = int(0.5 * np.percentile(areas, 5))  # half a small whole training object
    assert best["plan"]["mask_reading"] == "instances" and best["plan"]["min_object_size"] == learnt > 0
    capsys.readouterr()
    output = tmp_path / "diagnostics"
    assert (
        test_script.main(
            ["--checkpoint", str(summary.folders.weights / "best.pt"), "--output", str(output), "--instances"]
        )
        == 0
    )
    table = capsys.readouterr().out
    found = tifffile.imread(output / "masks" / "n5_instances.tif")
    mask = skimage.io.imread(output / "masks" / "n5.png")
    assert np.array_equal(found > 0, mask == 255)  # the mask is that of the objects
    sizes = np.bincount(found.ravel())[1:]
    assert sizes.min() >= learnt  # nothing smaller than the learnt size is left
    matched, true_objects, predicted_objects = brute_force_f1(data.test.images[0].instances(), found)
    assert f"objects at IoU 0.5: {matched} of {true_objects} true and {predicted_objects} predicted matched" in table
    line = next(line for line in table.splitlines() if line.strip().startswith("all"))
    assert float(line.split()[-1]) == pytest.approx(2 * matched / (true_objects + predicted_objects), abs=1e-4)
    # the network decided by these masks is the one a resumed run must keep
    with pytest.raises(UserError, match="unet.boundary_class: checkpoint True, config False"):
        train(folder_config(tmp_path, "train.max_epochs=4", *split, "train.resume=auto", "unet.boundary_class=false"))


@pytest.mark.slow
def test_test_script_errors_are_one_line(tmp_path):
    missing = subprocess.run(
        [sys.executable, "test.py", f"train.save_path={tmp_path / 'nothing'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: no checkpoint found: looked for {tmp_path / 'nothing'}/*/best.pt; train first (python "
        "training.py) or pass --checkpoint PATH"
    ]
    summary = train(tiny_config(tmp_path, "train.max_epochs=1"))
    config_path = tmp_path / "other.yaml"
    config_path.write_text("unet:\n  input_channels: [4, 8, 16]\n  norm: layer\n")
    other = subprocess.run(
        [
            sys.executable,
            "test.py",
            "--checkpoint",
            str(summary.folders.weights / "best.pt"),
            "--config",
            str(config_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 1
    lines = [
        line for line in other.stderr.strip().splitlines() if not line.startswith("note: train.tile_size auto")
    ]  # other.yaml's tile is auto
    assert (
        len(lines) == 1
        and "unet.input_channels" in lines[0]
        and "unet.norm: checkpoint 'batch', config 'layer'" in lines[0]
    )


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--split", "x"], "argument --split: invalid choice: 'x'"),  # then argparse's choices, its quoting varies
        (["--output", ""], "argument --output: expected a file or folder path, got ''"),
        (["--input", ""], "argument --input: expected a file or folder path, got ''"),
        (["--config", ""], "argument --config: expected a file or folder path, got ''"),
        (["--export", ""], "argument --export: expected a file or folder path, got ''"),
        (["--checkpoint", "a.pt", ""], "argument --checkpoint: expected a file or folder path, got ''"),
        (["--checkpoint"], "argument --checkpoint: expected at least one argument"),
        (["--tta=yes"], "argument --tta: ignored explicit argument 'yes'"),
    ],
)
def test_test_py_options_are_refused_in_one_line_naming_them(capsys, argv, error):
    prog = test_script.command_line().prog
    with pytest.raises(SystemExit) as caught:
        test_script.main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: error: {error}")
    assert err.endswith(f"; {prog} --help lists the options\n")


def test_every_test_py_option_with_a_value_has_a_checked_type():
    for action in test_script.command_line()._actions:
        if action.option_strings and action.nargs != 0 and action.dest != "layers":  # --layers: free names
            assert action.type is not None or action.choices, action.option_strings
