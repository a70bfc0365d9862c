"""test.py as a user runs it: masks for new images checked with scikit-image against what training
logged, TIFF stacks, probabilities, overlays, diagnostics figures, ONNX export and one-line errors."""

import csv
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import test_script
import tifffile
import torch
from skimage import measure
from skimage.metrics import adapted_rand_error

from model import build_model
from segmentation.config import load_config
from segmentation.data.synthetic import synthetic_em_set
from segmentation.inference import predict
from segmentation.inference.infer import Predictor
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
            skimage.io.imsave(
                root / part / "images" / f"slice{index:02d}.png", (image * 255).astype(np.uint8), check_contrast=False
            )
            skimage.io.imsave(root / part / "masks" / f"slice{index:02d}.png", label * 255, check_contrast=False)
    config = load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
            "train.batch_size=2",
            "train.max_epochs=2",
            "train.device=cpu",
            "train.dataset_name=folder",
            f"train.data={root / 'train'}",
            f"train.val_data={root / 'val'}",
            "predict.tile_size=100",
            f"train.save_path={root / 'weights'}",
            f"train.log_path={root / 'logs'}",
        ],
    )
    summary = train(config)
    return root, summary


def logged_row(summary: dict, epoch: int) -> dict:
    with (summary["run_log"] / "metrics.csv").open() as file:
        return next(row for row in csv.DictReader(file) if int(row["epoch"]) == epoch)


def test_written_masks_reproduce_the_logged_scores(trained, tmp_path):
    root, summary = trained
    best = summary["run_weights"] / "best.pt"
    assert (
        test_script.main(
            ["--checkpoint", str(best), "--input", str(root / "val" / "images"), "--output", str(tmp_path)]
        )
        == 0
    )
    wrong = total = 0
    rand_errors = []
    for mask_path in sorted((root / "val" / "masks").glob("*.png")):
        truth = skimage.io.imread(mask_path)
        written = skimage.io.imread(tmp_path / mask_path.name)
        assert written.shape == truth.shape and written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
        wrong += np.count_nonzero(written != truth)
        total += truth.size
        rand_errors.append(
            adapted_rand_error(
                measure.label(truth == 255, connectivity=1), measure.label(written == 255, connectivity=1)
            )[0]
        )
    row = logged_row(summary, torch.load(best, weights_only=True)["progress"]["best_epoch"])
    assert wrong / total == pytest.approx(float(row["val_pixel_error"]), abs=1e-9)
    assert np.mean(rand_errors) == pytest.approx(float(row["val_rand_error"]), abs=1e-9)


def test_stack_probabilities_and_overlays(trained, tmp_path):
    root, summary = trained
    slices = [skimage.io.imread(path) for path in sorted((root / "val" / "images").glob("*.png"))]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(slices), photometric="minisblack")
    best = str(summary["run_weights"] / "best.pt")
    assert (
        test_script.main(
            [
                "--checkpoint",
                best,
                "--input",
                str(tmp_path / "stack.tif"),
                "--output",
                str(tmp_path / "out"),
                "--probabilities",
                "--overlay",
            ]
        )
        == 0
    )
    masks = tifffile.imread(tmp_path / "out" / "stack.tif")
    probability = tifffile.imread(tmp_path / "out" / "stack_probability.tif")
    assert masks.shape == probability.shape == (3, 80, 80) and probability.dtype == np.float32
    assert np.array_equal(masks, np.where(probability >= 0.5, 255, 0))
    assert probability.min() >= 0 and probability.max() <= 1
    # each page equals the mask written for the same slice as a PNG
    assert (
        test_script.main(
            ["--checkpoint", best, "--input", str(root / "val" / "images"), "--output", str(tmp_path / "png")]
        )
        == 0
    )
    assert np.array_equal(masks[1], skimage.io.imread(tmp_path / "png" / "slice01.png"))
    overlay = skimage.io.imread(tmp_path / "out" / "stack_002_overlay.png")
    assert overlay.shape == (80, 80, 3)


def test_a_multipage_tiff_is_predicted_a_page_at_a_time_as_its_pages_alone(trained, tmp_path, monkeypatch):
    root, summary = trained
    slices = [skimage.io.imread(path) for path in sorted((root / "val" / "images").glob("*.png"))]
    pages = slices + [slices[0][::-1], slices[1].T.copy()]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(pages), photometric="minisblack")
    (tmp_path / "pages").mkdir()
    for index, page in enumerate(pages):
        tifffile.imwrite(tmp_path / "pages" / f"page{index}.tif", page, photometric="minisblack")
    whole_reads = []
    original_imread = tifffile.imread
    monkeypatch.setattr(
        tifffile,
        "imread",
        lambda path, *args, **kwargs: whole_reads.append(Path(path).name) or original_imread(path, *args, **kwargs),
    )
    best = str(summary["run_weights"] / "best.pt")
    assert (
        test_script.main(
            [
                "--checkpoint",
                best,
                "--input",
                str(tmp_path / "stack.tif"),
                "--output",
                str(tmp_path / "out"),
                "--probabilities",
            ]
        )
        == 0
    )
    assert "stack.tif" not in whole_reads  # never read whole: page by page
    monkeypatch.setattr(tifffile, "imread", original_imread)
    assert (
        test_script.main(
            [
                "--checkpoint",
                best,
                "--input",
                str(tmp_path / "pages"),
                "--output",
                str(tmp_path / "single"),
                "--probabilities",
            ]
        )
        == 0
    )
    masks, probabilities = (
        tifffile.imread(tmp_path / "out" / "stack.tif"),
        tifffile.imread(tmp_path / "out" / "stack_probability.tif"),
    )
    assert masks.shape == probabilities.shape == (5, 80, 80)
    for index in range(5):
        assert np.array_equal(masks[index], tifffile.imread(tmp_path / "single" / f"page{index}.tif"))
        assert np.array_equal(
            probabilities[index], tifffile.imread(tmp_path / "single" / f"page{index}_probability.tif")
        )
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left


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
    assert (
        test_script.main(
            ["--checkpoint", str(summary["run_weights"] / "best.pt"), "--export", str(tmp_path / "unet.onnx")]
        )
        == 0
    )
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


@pytest.mark.parametrize("padding", [0, 1])
def test_a_large_image_is_predicted_in_bands_as_in_one_piece(tmp_path, monkeypatch, padding):
    torch.manual_seed(0)
    config = load_config(
        None, ["unet.input_channels=[4, 8]", f"unet.padding={padding}", "train.device=cpu", "predict.tile_size=64"]
    )
    model = build_model(config.unet).eval()
    image = (np.random.default_rng(3).random((203, 150)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "large.tif", image, photometric="minisblack")  # uncompressed: memory-mapped
    skimage.io.imsave(tmp_path / "large.png", image, check_contrast=False)
    whole = tmp_path / "whole"
    predictor = Predictor(model, config.predict)
    predict.predict_files(predictor, [tmp_path / "large.tif"], whole, probabilities=True)
    monkeypatch.setattr(predict, "BAND_PIXELS", 150 * 40)  # bands of 40 rows (a multiple of 2**depth = 4)
    for name in ("large.tif", "large.png"):
        banded = tmp_path / f"banded_{name[-3:]}"
        predict.predict_files(predictor, [tmp_path / name], banded, probabilities=True)
        probability, reference = (
            tifffile.imread(banded / "large_probability.tif"),
            tifffile.imread(whole / "large_probability.tif"),
        )
        masks, reference_masks = tifffile.imread(banded / "large.tif"), tifffile.imread(whole / "large.tif")
        assert probability.shape == masks.shape == (203, 150)
        if padding == 0:  # every output row sees the same input rows: the same probabilities
            np.testing.assert_allclose(probability, reference, atol=1e-5)
            assert np.mean(masks == reference_masks) > 0.999
        else:  # the tiles fall elsewhere in a band, and tiles of padding 1 blend zero-padded edges: close, not equal
            assert np.abs(probability - reference).mean() < 0.02 and np.mean(masks == reference_masks) > 0.99
        assert not list(banded.glob(".*"))


def test_outputs_over_4_gib_are_written_as_bigtiff(trained, tmp_path, monkeypatch):
    root, summary = trained
    slices = [skimage.io.imread(path) for path in sorted((root / "val" / "images").glob("*.png"))]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(slices), photometric="minisblack")
    best = str(summary["run_weights"] / "best.pt")
    assert (
        test_script.main(
            [
                "--checkpoint",
                best,
                "--input",
                str(tmp_path / "stack.tif"),
                "--output",
                str(tmp_path / "classic"),
                "--probabilities",
            ]
        )
        == 0
    )
    assert not predict.needs_bigtiff(2 * 2**30) and predict.needs_bigtiff(4 * 2**30)  # classic TIFF offsets are 32 bits
    monkeypatch.setattr(
        predict, "needs_bigtiff", lambda data_bytes: True
    )  # as for a stack whose probabilities pass 4 GiB
    assert (
        test_script.main(
            [
                "--checkpoint",
                best,
                "--input",
                str(tmp_path / "stack.tif"),
                "--output",
                str(tmp_path / "big"),
                "--probabilities",
            ]
        )
        == 0
    )
    for name in ("stack.tif", "stack_probability.tif"):
        with tifffile.TiffFile(tmp_path / "big" / name) as big:
            assert big.is_bigtiff
        assert np.array_equal(tifffile.imread(tmp_path / "big" / name), tifffile.imread(tmp_path / "classic" / name))


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


def test_instance_output_and_object_f1(trained, tmp_path, capsys):
    root, summary = trained
    best = str(summary["run_weights"] / "best.pt")
    assert (
        test_script.main(
            [
                "--checkpoint",
                best,
                "--input",
                str(root / "val" / "images"),
                "--output",
                str(tmp_path / "files"),
                "--instances",
            ]
        )
        == 0
    )
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
    assert f"{totals[0]} of {totals[1]} true and {totals[2]} predicted objects matched" in table


def test_predictions_of_a_single_class_everywhere_get_a_note(tmp_path, capsys):
    torch.manual_seed(0)
    config = load_config(None, ["unet.input_channels=[4, 8]", "train.device=cpu"])
    model = build_model(config.unet).eval()
    with torch.no_grad():
        model.outc.weight.zero_()
        model.outc.bias.copy_(torch.tensor([5.0, -5.0]))  # class 0 everywhere: "the prediction is all black"
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        skimage.io.imsave(
            images / f"{index}.png",
            (np.random.default_rng(index).random((40, 40)) * 255).astype(np.uint8),
            check_contrast=False,
        )
    predict.predict_files(Predictor(model, config.predict), sorted(images.iterdir()), tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(lines) == 1 and "all 3 predicted images are predicted as a single class everywhere" in lines[0]
    assert "train.mask_type" in lines[0] and "train.class_weights" in lines[0] and "predict.threshold" in lines[0]
