"""segmentation.inference.predict: segmenting files: TIFF stacks a page at a time, probabilities, overlays, large
images in bands, BigTIFF, and a note for predictions of a single class."""

from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile
import torch

from model import build_model
from segmentation.config import load_config
from segmentation.inference import predict
from segmentation.inference.infer import Predictor
from tests.helpers import plan_of, segment


@pytest.mark.slow
def test_stack_probabilities_and_overlays(trained, tmp_path):
    root, summary = trained
    slices = [skimage.io.imread(path) for path in sorted((root / "val" / "images").glob("*.png"))]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(slices), photometric="minisblack")
    best = str(summary.folders.weights / "best.pt")
    assert segment(best, str(tmp_path / "stack.tif"), str(tmp_path / "out"), "--probabilities", "--overlay") == 0
    masks = tifffile.imread(tmp_path / "out" / "stack.tif")
    probability = tifffile.imread(tmp_path / "out" / "stack_probability.tif")
    assert masks.shape == probability.shape == (3, 80, 80) and probability.dtype == np.float32
    assert np.array_equal(masks, np.where(probability >= 0.5, 255, 0))
    assert probability.min() >= 0 and probability.max() <= 1
    # each page equals the mask written for the same slice as a PNG
    assert segment(best, str(root / "val" / "images"), str(tmp_path / "png")) == 0
    assert np.array_equal(masks[1], skimage.io.imread(tmp_path / "png" / "slice01.png"))
    overlay = skimage.io.imread(tmp_path / "out" / "stack_002_overlay.png")
    assert overlay.shape == (80, 80, 3)


@pytest.mark.slow
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
    best = str(summary.folders.weights / "best.pt")
    assert segment(best, str(tmp_path / "stack.tif"), str(tmp_path / "out"), "--probabilities") == 0
    assert "stack.tif" not in whole_reads  # never read whole: page by page
    monkeypatch.setattr(tifffile, "imread", original_imread)
    assert segment(best, str(tmp_path / "pages"), str(tmp_path / "single"), "--probabilities") == 0
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
    predictor = Predictor(model, plan_of(config), config.predict)
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


@pytest.mark.slow
def test_outputs_over_4_gib_are_written_as_bigtiff(trained, tmp_path, monkeypatch):
    root, summary = trained
    slices = [skimage.io.imread(path) for path in sorted((root / "val" / "images").glob("*.png"))]
    tifffile.imwrite(tmp_path / "stack.tif", np.stack(slices), photometric="minisblack")
    best = str(summary.folders.weights / "best.pt")
    assert segment(best, str(tmp_path / "stack.tif"), str(tmp_path / "classic"), "--probabilities") == 0
    assert not predict.needs_bigtiff(2 * 2**30) and predict.needs_bigtiff(4 * 2**30)  # classic TIFF offsets are 32 bits
    monkeypatch.setattr(
        predict, "needs_bigtiff", lambda data_bytes: True
    )  # as for a stack whose probabilities pass 4 GiB
    assert segment(best, str(tmp_path / "stack.tif"), str(tmp_path / "big"), "--probabilities") == 0
    for name in ("stack.tif", "stack_probability.tif"):
        with tifffile.TiffFile(tmp_path / "big" / name) as big:
            assert big.is_bigtiff
        assert np.array_equal(tifffile.imread(tmp_path / "big" / name), tifffile.imread(tmp_path / "classic" / name))


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
    predict.predict_files(Predictor(model, plan_of(config), config.predict), sorted(images.iterdir()), tmp_path / "out")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(lines) == 1 and "all 3 predicted images are predicted as a single class everywhere" in lines[0]
    assert "train.mask_type" in lines[0] and "train.class_weights" in lines[0] and "predict.threshold" in lines[0]
