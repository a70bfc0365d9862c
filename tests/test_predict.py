"""test.py as a user runs it: masks for new images checked with scikit-image against what training
logged, TIFF stacks, probabilities, overlays, diagnostics figures, ONNX export and one-line errors."""

import csv

import numpy as np
import pytest
import skimage.io
import tifffile
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error

import test_script
from config import load_config
from dataset import synthetic_em_set
from training import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained for 2 epochs on synthetic EM images saved as files (0/255 masks),
    validated on a separate folder of 3 images."""
    root = tmp_path_factory.mktemp("predict")
    for part, seed, count in (("train", 0, 4), ("val", 1, 3)):
        for index, (image, label, _) in enumerate(synthetic_em_set(count, 80, seed)):
            (root / part / "images").mkdir(parents=True, exist_ok=True)
            (root / part / "masks").mkdir(parents=True, exist_ok=True)
            skimage.io.imsave(root / part / "images" / f"slice{index:02d}.png", (image * 255).astype(np.uint8), check_contrast=False)
            skimage.io.imsave(root / part / "masks" / f"slice{index:02d}.png", label * 255, check_contrast=False)
    config = load_config(None, [
        "unet.input_channels=[4, 8]", "train.tile_size=60", "train.batch_size=2", "train.max_epochs=2", "train.device=cpu",
        "train.dataset_name=folder", f"train.data={root / 'train'}", f"train.val_data={root / 'val'}", "predict.tile_size=100",
        f"train.save_path={root / 'weights'}", f"train.log_path={root / 'logs'}",
    ])
    summary = train(config)
    return root, summary


def logged_row(summary: dict, epoch: int) -> dict:
    with (summary["run_log"] / "metrics.csv").open() as file:
        return next(row for row in csv.DictReader(file) if int(row["epoch"]) == epoch)


def test_written_masks_reproduce_the_logged_scores(trained, tmp_path):
    root, summary = trained
    best = summary["run_weights"] / "best.pt"
    assert test_script.main(["--checkpoint", str(best), "--input", str(root / "val" / "images"), "--output", str(tmp_path)]) == 0
    wrong = total = 0
    rand_errors = []
    for mask_path in sorted((root / "val" / "masks").glob("*.png")):
        truth = skimage.io.imread(mask_path)
        written = skimage.io.imread(tmp_path / mask_path.name)
        assert written.shape == truth.shape and written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
        wrong += np.count_nonzero(written != truth)
        total += truth.size
        rand_errors.append(adapted_rand_error(measure.label(truth == 255, connectivity=1), measure.label(written == 255, connectivity=1))[0])
    row = logged_row(summary, torch.load(best, weights_only=True)["progress"]["best_epoch"])
    assert wrong / total == pytest.approx(float(row["val_pixel_error"]), abs=1e-9)
    assert np.mean(rand_errors) == pytest.approx(float(row["val_rand_error"]), abs=1e-9)


def test_stack_probabilities_and_overlays(trained, tmp_path):
    root, summary = trained
    slices = [skimage.io.imread(path) for path in sorted((root / "val" / "images").glob("*.png"))]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(slices), photometric="minisblack")
    best = str(summary["run_weights"] / "best.pt")
    assert test_script.main(["--checkpoint", best, "--input", str(tmp_path / "stack.tif"), "--output", str(tmp_path / "out"), "--probabilities", "--overlay"]) == 0
    masks = tifffile.imread(tmp_path / "out" / "stack.tif")
    probability = tifffile.imread(tmp_path / "out" / "stack_probability.tif")
    assert masks.shape == probability.shape == (3, 80, 80) and probability.dtype == np.float32
    assert np.array_equal(masks, np.where(probability >= 0.5, 255, 0))
    assert 0 <= probability.min() and probability.max() <= 1
    # each page equals the mask written for the same slice as a PNG
    assert test_script.main(["--checkpoint", best, "--input", str(root / "val" / "images"), "--output", str(tmp_path / "png")]) == 0
    assert np.array_equal(masks[1], skimage.io.imread(tmp_path / "png" / "slice01.png"))
    overlay = skimage.io.imread(tmp_path / "out" / "stack_002_overlay.png")
    assert overlay.shape == (80, 80, 3)


def test_diagnostics_figures(trained, tmp_path, capsys):
    _, summary = trained
    assert test_script.main(["--checkpoint", str(summary["run_weights"] / "best.pt"), "--output", str(tmp_path)]) == 0
    names = {path.name for path in tmp_path.glob("*.png")}
    assert {"val_000.png", "val_002.png", "saliency_000.png", "gradient_norms.png", "activations.png"} <= names
    table = capsys.readouterr().out
    assert "Rand error" in table and table.count("slice0") == 3


def test_onnx_export(trained, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    _, summary = trained
    assert test_script.main(["--checkpoint", str(summary["run_weights"] / "best.pt"), "--export", str(tmp_path / "unet.onnx")]) == 0
    assert (tmp_path / "unet.onnx").stat().st_size > 1000
    difference = float(capsys.readouterr().out.split("differ by at most ")[1].split()[0])
    assert difference < 1e-4


def test_errors_are_one_line(trained, tmp_path, capsys):
    root, summary = trained
    best = str(summary["run_weights"] / "best.pt")
    (tmp_path / "broken.png").write_bytes(b"no image")
    cases = [
        (["--input", str(tmp_path / "missing.png")], "no such file or folder"),
        (["--input", str(tmp_path / "broken.png")], "broken.png: cannot read this image"),
        (["--input", str(root / "val" / "images"), "--output", str(root / "val" / "images")], "would overwrite its input"),
    ]
    tifffile.imwrite(tmp_path / "two.tif", np.zeros((20, 20, 2), np.uint8), photometric="minisblack", planarconfig="contig")
    cases.append((["--input", str(tmp_path / "two.tif"), "--output", str(tmp_path / "o")], "an image of 2 channels; the model takes 1"))
    for arguments, message in cases:
        capsys.readouterr()
        assert test_script.main(["--checkpoint", best, *arguments]) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (arguments, lines)
    assert (root / "val" / "images" / "slice00.png").stat().st_size > 0  # the input is still there
