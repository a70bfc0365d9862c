"""python dataset.py check: the fingerprint of a data folder, its problems, and config lines that read it."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile

from dataset import list_samples
from segmentation.config import UserError, load_config
from segmentation.data.datacheck import check_data, check_main
from segmentation.data.readers import MaskSettings
from tests.helpers import ROOT, SHARED


def folder(root: Path, masks: list[np.ndarray], rgb: bool = False, suffix: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for index, mask in enumerate(masks):
        skimage.io.imsave(
            root / "images" / f"{index}.png",
            rng.integers(0, 255, mask.shape[:2] + ((3,) if rgb else ()), dtype=np.uint8),
            check_contrast=False,
        )
        if suffix == ".tif":
            tifffile.imwrite(root / "masks" / f"{index}.tif", mask, photometric="minisblack")
        else:
            skimage.io.imsave(root / "masks" / f"{index}{suffix}", mask, check_contrast=False)
    return root


def suggested_config(report: dict, root: Path):
    values = report["suggestion"]["values"]
    return load_config(
        None, [f"{key}={value}" for key, value in values.items() if key != "train.data"] + [f"train.data={root}"]
    )


def reads_every_mask(config: dict) -> bool:
    settings = MaskSettings.from_settings(config.unet.num_classes, config.data)
    samples = list_samples(config.data, config.unet.num_classes, config.train.seed)[0]
    return all(sample.read(settings) is not None for sample in samples)


def test_binary_masks_and_every_pairing_problem_are_reported(tmp_path, capsys):
    rng = np.random.default_rng(1)
    root = folder(tmp_path / "data", [(rng.random((30, 40)) > 0.8).astype(np.uint8) * 255 for _ in range(4)], rgb=True)
    (root / "images" / "0.png").rename(
        root / "images" / "lonely.png"
    )  # an image without a mask, and mask 0 without an image
    (root / "images" / "broken.png").write_bytes(b"not a png")
    skimage.io.imsave(root / "masks" / "broken.png", np.zeros((30, 40), np.uint8), check_contrast=False)
    assert check_main(["check", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{root}: folder layout, 4 images with masks" in out and "channels: 3 with 3" in out
    assert (
        "no mask named lonely.*" in out
        and "0.png: a mask without an image" in out
        and "broken.png: cannot read this image" in out
    )
    assert "class fractions (as the suggested config reads the masks): 0: " in out
    fraction = (
        float(
            out.split("class fractions (as the suggested config reads the masks): ")[1].split("1: ")[1].split(" %")[0]
        )
        / 100
    )
    truth = np.concatenate(
        [skimage.io.imread(root / "masks" / f"{i}.png").ravel() for i in (1, 2, 3)] + [np.zeros(1200, np.uint8)]
    )
    assert fraction == pytest.approx(np.mean(truth == 255), abs=1e-3)  # the three masks read, and broken.png's zeros
    assert "  image_channels: 3" in out and "  num_classes: 2" in out


def test_instance_id_masks_are_recognised_and_the_suggestion_reads_them(tmp_path):
    masks = []
    for index in range(5):
        ids = np.zeros((60, 50), np.uint16)
        for object_id in range(1, 8 + 2 * index):  # 7 to 15 objects per image, numbered as labelling tools do
            ids[3 * object_id : 3 * object_id + 2, 3:40] = object_id
        masks.append(ids)
    root = folder(tmp_path / "data", masks, suffix=".tif")
    report = check_data(root)
    assert (
        report["suggestion"]["values"]["train.mask_type"] == "instances"
        and report["suggestion"]["values"]["unet.num_classes"] == 2
    )
    assert reads_every_mask(suggested_config(report, root)) and not report["problems"]


def test_colour_and_sparse_value_masks_get_their_mapping(tmp_path):
    classes = np.array([[0, 1, 2, 2], [1, 1, 0, 2]] * 8, dtype=np.uint8)
    colours = np.array([[0, 0, 0], [200, 30, 30], [30, 200, 30]], dtype=np.uint8)
    root = folder(tmp_path / "colour", [colours[classes], colours[classes[::-1]]])
    report = check_data(root)
    assert report["suggestion"]["values"]["train.mask_colors"] == [[0, 0, 0], [30, 200, 30], [200, 30, 30]]
    config = suggested_config(report, root)
    assert config.unet.num_classes == 3 and reads_every_mask(config)
    root = folder(tmp_path / "sparse", [np.array([0, 128, 255], np.uint8)[classes]] * 2)
    report = check_data(root)
    assert report["suggestion"]["values"]["train.mask_values"] == [0, 128, 255] and reads_every_mask(
        suggested_config(report, root)
    )


def test_large_photos_get_an_image_scale_and_a_rare_class_balanced_weights(tmp_path):
    mask = np.zeros((1200, 1600), np.uint8)
    mask[100:200, 100:300] = 255  # about 1 % foreground
    report = check_data(folder(tmp_path / "data", [mask, mask]))
    values = report["suggestion"]["values"]
    assert (
        values["train.image_scale"] == pytest.approx(512 / 1600, abs=0.01)
        and values["train.class_weights"] == "balanced"
    )
    # width x height, as training prints sizes
    assert "sizes: 1 different, 1600-1600 x 1200-1200 px (width x height); most common 1600x1200" in "\n".join(
        report["lines"]
    )


@pytest.mark.slow
def test_the_command_line_and_a_missing_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "dataset.py", "check", str(tmp_path / "nowhere")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: folder not found"
    ]


@pytest.mark.skipif(not (SHARED / "isbi2012").is_dir(), reason="the real ISBI 2012 data is not here")
def test_real_isbi2012_fingerprint():
    report = check_data(SHARED / "isbi2012")
    text = "\n".join(report["lines"])
    assert "isbi2012 layout, 30 images with masks" in text and "30 0/255" in text and not report["problems"]
    fractions = report["suggestion"]["fractions"]
    assert 0.15 < fractions[0] < 0.3  # about 22 % membrane


def test_small_integer_masks_read_as_class_indices_with_the_alternative_named(tmp_path):
    classes = np.array([[0, 1, 2, 2], [1, 1, 0, 2]] * 8, dtype=np.uint8)
    root = folder(tmp_path / "data", [classes, classes[::-1]])
    report = check_data(root)
    assert (
        report["suggestion"]["values"]["train.mask_type"] == "classes"
        and report["suggestion"]["values"]["unet.num_classes"] == 3
    )
    assert any("if each value is an object instead, use train.mask_type: instances" in line for line in report["lines"])
    assert reads_every_mask(suggested_config(report, root))


def test_check_reports_what_training_would_refuse_from_the_headers(tmp_path, monkeypatch):
    """Issue 33: a file over train.max_image_pixels, a mask of another size than its image (width x height, as
    training says it), two images for one mask: listed, read from the headers, whichever masks are sampled."""
    rng = np.random.default_rng(5)
    root = folder(tmp_path / "data", [(rng.random((40, 48)) > 0.5).astype(np.uint8) * 255 for _ in range(4)])
    tifffile.imwrite(root / "images" / "huge.tif", shape=(60000, 60000), dtype="uint8")  # sparse: a few KB on disk
    assert (root / "images" / "huge.tif").stat().st_blocks * 512 < 2**20
    skimage.io.imsave(root / "masks" / "huge.png", np.zeros((40, 48), np.uint8), check_contrast=False)
    skimage.io.imsave(root / "masks" / "2.png", np.zeros((10, 12), np.uint8), check_contrast=False)
    skimage.io.imsave(root / "images" / "3.jpg", np.zeros((40, 48), np.uint8), check_contrast=False)

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixels read")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    report = check_data(root, sample_size=1)  # the one mask sampled is 0.png's: the others are checked from headers
    assert report["problems"] == [
        f"{root / 'images' / '3.jpg'} and 3.png: 2 images match the one mask {root / 'masks' / '3.png'}; keep one "
        "image, or rename the others and give each its own mask",
        f"{root / 'images' / 'huge.tif'}: 60000 x 60000 px (3600 Mpx) is more than train.max_image_pixels "
        "(1073741824): raise it if memory allows, or split the image",
        f"{root / 'masks' / '2.png'}: mask is 12x10 px but its image 2.png is 48x40",
    ]
    assert report["lines"][1] == "sizes: 1 different, 48-48 x 40-40 px (width x height); most common 48x40"


def test_check_lists_a_tiff_stack_as_training_does_a_sample_per_page(tmp_path):
    rng = np.random.default_rng(6)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(
        tmp_path / "images" / "s.tif", rng.integers(0, 255, (3, 20, 30), np.uint8), photometric="minisblack"
    )
    masks = (rng.random((3, 20, 30)) > 0.5).astype(np.uint8) * 255
    tifffile.imwrite(tmp_path / "masks" / "s.tif", masks, photometric="minisblack")
    report = check_data(tmp_path)
    assert report["problems"] == [] and report["lines"][0] == f"{tmp_path}: folder layout, 3 images with masks"
    assert report["lines"][1] == "sizes: 1 different, 30-30 x 20-20 px (width x height); most common 30x20"
    tifffile.imwrite(tmp_path / "masks" / "s.tif", masks[:1], photometric="minisblack")
    with pytest.raises(UserError, match=r"s.tif: 1 page\(s\) but its image s.tif holds 3 image\(s\)"):
        check_data(tmp_path)  # no sample left: the line says why


def test_check_reports_nan_pixels_of_float_images(tmp_path):
    rng = np.random.default_rng(7)
    root = folder(tmp_path / "data", [(rng.random((20, 30)) > 0.5).astype(np.uint8) * 255 for _ in range(2)])
    image = rng.random((20, 30)).astype(np.float32)
    image[4, 5] = np.nan
    (root / "images" / "1.png").unlink()
    tifffile.imwrite(root / "images" / "1.tif", image, photometric="minisblack")
    assert check_data(root)["problems"] == [
        f"{root / 'images' / '1.tif'}: 1 pixels are NaN or infinite: replace them (e.g. with 0) before training or "
        "predicting"
    ]


def test_scribbles_get_an_ignore_value_suggested_and_their_annotated_fraction_reported(tmp_path):
    scribbles = np.full((40, 50), 128, np.uint8)
    scribbles[5:8, 5:45] = 255  # 120 px of cell
    scribbles[20:22, 10:40] = 0  # 60 px of membrane
    sparser = scribbles.copy()
    sparser[20:22] = 128
    root = folder(tmp_path / "scribbles", [scribbles, sparser])
    report = check_data(root)
    values = report["suggestion"]["values"]
    assert values["train.ignore_value"] == 128 and values["unet.num_classes"] == 2 and "train.mask_values" not in values
    config = suggested_config(report, root)
    assert config.data.ignore_value == 128 and reads_every_mask(config)
    text = "\n".join(report["lines"])
    # by hand: 180 and 120 of 2000 px annotated, 9 % and 6 %; 7.5 % on average
    assert "annotated pixels (value 128 marks the others: train.ignore_value): 7.5 % of the pixels, 6.0-9.0 %" in text
    assert "per image: 0.png 9.0 %, 1.png 6.0 %" in text
    # class indices with 255 beside them (VOC's masks): 255 is what nobody labelled
    voc = np.array([[0, 1, 2, 255]] * 10, np.uint8)
    report = check_data(folder(tmp_path / "voc", [voc, voc]))
    assert report["suggestion"]["values"]["train.ignore_value"] == 255
    assert report["suggestion"]["values"]["unet.num_classes"] == 3
    # a given ignore value is read as given
    report = check_data(folder(tmp_path / "given", [scribbles]), ignore_value=128)
    assert report["suggestion"]["values"]["train.ignore_value"] == 128
