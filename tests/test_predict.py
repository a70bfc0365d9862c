"""segmentation.inference.predict: segmenting files: TIFF stacks a page at a time, probabilities, overlays, large
images in bands, BigTIFF, and a note for predictions of a single class."""

from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile
import torch

from model import build_model
from segmentation.config import UserError, load_config
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


# Issue 33: no output silently lost or wrong, every refusal one line.


def small_predictor(*overrides: str) -> Predictor:
    """An untrained depth-2 U-Net (widths 4, 8) on the CPU, as test.py --input would use a trained one."""
    torch.manual_seed(0)
    config = load_config(None, ["unet.input_channels=[4, 8]", "train.device=cpu", "predict.tile_size=100", *overrides])
    return Predictor(build_model(config.unet).eval(), plan_of(config), config.predict)


def files_in(folder: Path) -> set[str]:
    """The names of every file in ``folder``, hidden (temporary) ones included; empty where there is no folder."""
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


def test_inputs_that_share_a_stem_keep_their_extension_in_every_output_name(tmp_path):
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.bmp", "a.jpg", "a.png", "b.png"):
        skimage.io.imsave(images / name, rng.integers(0, 255, (40, 40), dtype=np.uint8), check_contrast=False)
    predictor = small_predictor()
    options = {"probabilities": True, "overlay": True, "instances": True}
    masks = predict.predict_files(predictor, sorted(images.iterdir()), tmp_path / "out", **options)
    outputs = ("{}.png", "{}_probability.tif", "{}_instances.tif", "{}_overlay.png")
    assert files_in(tmp_path / "out") == {
        pattern.format(name) for name in ("a.bmp", "a.jpg", "a.png", "b") for pattern in outputs
    }
    assert [path.name for path in masks] == ["a.bmp.png", "a.jpg.png", "a.png.png", "b.png"]
    for name in ("a.bmp", "a.jpg", "a.png"):  # each is the mask of its own input, predicted alone
        predict.predict_files(predictor, [images / name], tmp_path / name, **options)
        for pattern in outputs:
            assert np.array_equal(
                skimage.io.imread(tmp_path / "out" / pattern.format(name)),
                skimage.io.imread(tmp_path / name / pattern.format("a")),
            )
    # an output of one input that would be another's: refused before anything is written
    tifffile.imwrite(images / "a_probability.tif", rng.integers(0, 255, (40, 40), dtype=np.uint8))
    inputs = [images / "a_probability.tif", images / "b.png", images / "a.png"]
    with pytest.raises(UserError) as caught:
        predict.predict_files(predictor, inputs, tmp_path / "clash", probabilities=True)
    assert str(caught.value) == (
        f"--output {tmp_path / 'clash'}: a_probability.tif would be written for both {images / 'a_probability.tif'} "
        f"and {images / 'a.png'}; rename one of them"
    )
    other = tmp_path / "other"  # an output folder holding an input that b.png's overlay would overwrite
    other.mkdir()
    skimage.io.imsave(other / "b_overlay.png", np.zeros((40, 40), np.uint8), check_contrast=False)
    with pytest.raises(UserError) as caught:
        predict.predict_files(predictor, [images / "b.png", other / "b_overlay.png"], other, overlay=True)
    assert str(caught.value) == (
        f"--output {other}: b_overlay.png would overwrite the input {other / 'b_overlay.png'}; choose another folder"
    )
    assert files_in(tmp_path / "clash") == set() and files_in(other) == {"b_overlay.png"}


def test_max_image_pixels_refuses_an_input_from_its_header_before_anything_is_written(tmp_path, monkeypatch):
    skimage.io.imsave(tmp_path / "small.png", np.zeros((40, 30), np.uint8), check_contrast=False)
    tifffile.imwrite(tmp_path / "huge.tif", shape=(60000, 60000), dtype="uint8")  # sparse: a few KB on disk
    assert (tmp_path / "huge.tif").stat().st_blocks * 512 < 2**20
    predictor = small_predictor()
    with pytest.raises(UserError) as caught:
        predict.predict_files(predictor, [tmp_path / "small.png"], tmp_path / "out", max_pixels=1000)
    assert str(caught.value) == (
        f"{tmp_path / 'small.png'}: 30 x 40 px (0.0012 Mpx) is more than train.max_image_pixels (1000): raise it if "
        "memory allows, or split the image"
    )
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *args, **kwargs: pytest.fail("pixels read"))
    with pytest.raises(UserError, match=r"huge.tif: 60000 x 60000 px \(3600 Mpx\) is more than train.max_image_pixels"):
        predict.predict_files(predictor, [tmp_path / "small.png", tmp_path / "huge.tif"], tmp_path / "out")
    assert files_in(tmp_path / "out") == set()  # small.png, first in line, was not predicted either


def test_nan_or_infinite_pixels_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
    pages = np.random.default_rng(1).random((3, 40, 40)).astype(np.float32)
    pages[1, 3, :4] = np.nan
    pages[1, 7, 7] = -np.inf
    tifffile.imwrite(tmp_path / "stack.tif", pages, photometric="minisblack")
    predictor = small_predictor()
    with pytest.raises(UserError) as caught:  # page 0 is predicted first: its outputs are not kept
        predict.predict_files(predictor, [tmp_path / "stack.tif"], tmp_path / "out", probabilities=True, overlay=True)
    assert str(caught.value) == (
        f"{tmp_path / 'stack.tif'} page 1: 5 pixels are NaN or infinite: replace them (e.g. with 0) before training "
        "or predicting"
    )
    assert files_in(tmp_path / "out") == set()
    # a large image, memory-mapped and predicted in bands, is refused before its first band
    tifffile.imwrite(tmp_path / "large.tif", pages[1], photometric="minisblack")  # uncompressed: memory-mapped
    monkeypatch.setattr(predict, "BAND_PIXELS", 40 * 20)
    with pytest.raises(UserError, match=r"large.tif: 5 pixels are NaN or infinite: replace them \(e.g. with 0\)"):
        predict.predict_files(predictor, [tmp_path / "large.tif"], tmp_path / "out", probabilities=True)
    assert files_in(tmp_path / "out") == set()
    tifffile.imwrite(tmp_path / "large.tif", pages[0], photometric="minisblack")  # the band path itself works
    predict.predict_files(predictor, [tmp_path / "large.tif"], tmp_path / "out", probabilities=True)
    assert np.isfinite(tifffile.imread(tmp_path / "out" / "large_probability.tif")).all()


def test_a_model_that_predicts_nan_writes_nothing(tmp_path):
    predictor = small_predictor()
    with torch.no_grad():
        predictor.model.outc.bias.fill_(float("nan"))  # as a checkpoint trained to NaN
    skimage.io.imsave(tmp_path / "image.png", np.zeros((40, 40), np.uint8), check_contrast=False)
    with pytest.raises(UserError, match=r"^image.png: the model's probabilities are NaN"):
        predict.predict_files(predictor, [tmp_path / "image.png"], tmp_path / "out", probabilities=True)
    assert files_in(tmp_path / "out") == set()


@pytest.mark.parametrize("image_channels", [1, 3])
@pytest.mark.parametrize("layout", ["ZCYX planar RGB pages", "ZYXC RGB pages", "ImageJ ZCYX"])
def test_a_4d_tiff_gets_an_overlay_per_page(tmp_path, image_channels, layout):
    rgb = np.random.default_rng(2).integers(0, 255, (2, 3, 40, 48), dtype=np.uint8)  # (Z, C, H, W)
    if layout == "ZCYX planar RGB pages":
        tifffile.imwrite(tmp_path / "stack.tif", rgb, photometric="rgb", planarconfig="separate")
    elif layout == "ZYXC RGB pages":
        tifffile.imwrite(tmp_path / "stack.tif", np.moveaxis(rgb, 1, -1), photometric="rgb")
    else:
        tifffile.imwrite(tmp_path / "stack.tif", rgb, imagej=True, metadata={"axes": "ZCYX"})
    predictor = small_predictor(f"unet.image_channels={image_channels}")
    predict.predict_files(predictor, [tmp_path / "stack.tif"], tmp_path / "out", overlay=True)
    masks = tifffile.imread(tmp_path / "out" / "stack.tif")
    assert masks.shape == (2, 40, 48)
    for index in range(2):
        overlay = skimage.io.imread(tmp_path / "out" / f"stack_{index:03d}_overlay.png")
        page = np.moveaxis(rgb[index], 0, -1).astype(np.float32)
        reference = (255 * (page - page.min()) / (page.max() - page.min())).astype(np.uint8)  # the page, stretched
        assert overlay.shape == (40, 48, 3)
        assert np.array_equal(overlay[masks[index] == 0], reference[masks[index] == 0])


def test_as_many_pages_as_the_model_has_channels_are_one_image_with_a_note(tmp_path, capsys):
    rgb = np.random.default_rng(3).integers(0, 255, (3, 40, 48), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "pages.tif", rgb, photometric="minisblack")  # no ImageJ or OME metadata
    predict.predict_files(small_predictor("unet.image_channels=3"), [tmp_path / "pages.tif"], tmp_path / "rgb")
    assert tifffile.imread(tmp_path / "rgb" / "pages.tif").shape == (40, 48)  # one image
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes[0] == (
        f"note: {tmp_path / 'pages.tif'}: read its 3 pages as the 3 channels of one image, as many as "
        "unet.image_channels and no ImageJ or OME metadata says otherwise (with unet.image_channels: 1, a stack of "
        "3 images)"
    )
    predict.predict_files(small_predictor(), [tmp_path / "pages.tif"], tmp_path / "gray")
    assert tifffile.imread(tmp_path / "gray" / "pages.tif").shape == (3, 40, 48)  # a stack of three


@pytest.mark.slow
def test_test_py_input_passes_the_configs_pixel_limit(trained, tmp_path, capsys):
    root, summary = trained
    best = str(summary.folders.weights / "best.pt")
    image = root / "val" / "images" / "slice00.png"
    assert segment(best, str(image), str(tmp_path / "out"), "train.max_image_pixels=6399") == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {image}: 80 x 80 px (0.0064 Mpx) is more than train.max_image_pixels (6399): raise it if memory "
        "allows, or split the image"
    ]
    assert segment(best, str(image), str(tmp_path / "out"), "train.max_image_pixels=6400") == 0
