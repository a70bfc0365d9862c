"""segmentation.data.readers: the data sets' layouts (ISBI 2012, Penn-Fudan, a user's folder) and masks as
labelling tools write them (palettes, sparse values, colours, 0/1 and 0/255, floats, instance ids), with
one-line errors."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import skimage.io
import tifffile
from skimage import measure

from dataset import list_samples
from losses import IGNORE_LABEL
from segmentation.config import ConfigError, UserError, load_config
from segmentation.data.readers import MaskSettings, label_from_mask, read_isbi2012, read_pennfudan
from segmentation.data.weight_maps import border_weights
from tests.helpers import SHARED, blobs_mask, datasets_of, make_rgb_folder, plain_folder_config, two_discs, write_image

CLASSES = np.array([[0, 0, 1, 1], [2, 2, 1, 0], [0, 2, 2, 1]], dtype=np.uint8)  # a 3-class mask

TWO_CLASSES = MaskSettings()  # how masks are read by default


def read_samples(config: dict) -> tuple[list, list | None]:
    """The configured data set's samples, read (listing alone reads no pixels)."""
    samples, val = list_samples(config.data, config.unet.num_classes, config.train.seed)
    settings = MaskSettings.from_settings(config.unet.num_classes, config.data)
    return [sample.read(settings) for sample in samples], None if val is None else [
        sample.read(settings) for sample in val
    ]


def read_all(samples: list) -> list:
    return [sample.read(TWO_CLASSES) for sample in samples]


def test_folder_of_rgb_images_with_0_255_masks(tmp_path):
    make_rgb_folder(tmp_path)
    samples, val = read_samples(plain_folder_config(tmp_path))
    assert val is None and [s.name for s in samples] == [f"img{i}.png" for i in range(4)]
    mask = skimage.io.imread(tmp_path / "masks" / "img0.png")
    assert np.array_equal(samples[0].label, (mask == 255).astype(np.uint8))
    assert samples[0].image.shape == (40, 48, 3)
    assert samples[0].instances.max() == measure.label(mask == 255, connectivity=1).max()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda root: (root / "masks" / "img1.png").unlink(), "img1.png: no mask named img1"),
        (
            lambda root: write_image(root / "masks" / "img2.png", np.zeros((10, 10), np.uint8)),
            "img2.png: mask is 10x10 px but its image img2.png is 48x40",
        ),
        (
            lambda root: write_image(root / "masks" / "img3.png", np.full((40, 48), 3, np.uint8)),
            "img3.png: mask value 3 is not a class of unet.num_classes=2",
        ),
        (lambda root: (root / "images" / "img0.png").write_bytes(b"not a png"), "img0.png: cannot read this image"),
        (
            lambda root: write_image(
                root / "masks" / "img0.png",
                np.stack(
                    [np.zeros((40, 48), np.uint8), np.full((40, 48), 255, np.uint8), np.zeros((40, 48), np.uint8)], -1
                ),
            ),
            "img0.png: mask is a colour image",
        ),
    ],
)
def test_folder_errors_name_the_file(tmp_path, damage, message):
    make_rgb_folder(tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError) as caught:
        read_samples(plain_folder_config(tmp_path, "train.mask_type=classes"))  # auto would read the 3s as an object id
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_empty_or_missing_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(UserError, match="no images"):
        read_samples(plain_folder_config(tmp_path))
    with pytest.raises(UserError, match="train.data: .* not found"):
        read_samples(plain_folder_config(tmp_path / "nowhere"))


def test_index_masks_give_classes(tmp_path):
    make_rgb_folder(tmp_path)
    for index in range(4):
        write_image(tmp_path / "masks" / f"img{index}.png", np.tile(np.arange(3, dtype=np.uint8), (40, 16)))
    samples, _ = read_samples(plain_folder_config(tmp_path, "unet.num_classes=3"))
    assert np.array_equal(samples[0].label, np.tile(np.arange(3), (40, 16)))
    # the same 0/255-free index masks are out of range for two classes read as classes
    with pytest.raises(UserError, match="mask value 2 is not a class of unet.num_classes=2"):
        read_samples(plain_folder_config(tmp_path, "train.mask_type=classes"))
    # and for two classes auto reads them as object ids
    samples, _ = read_samples(plain_folder_config(tmp_path))
    # ids 1 and 2 touch: the pixels of the larger id along the contact become a separating line of class 0
    assert samples[0].mask_read_as == "instances" and np.array_equal(
        samples[0].label, np.tile(np.array([0, 1, 0]), (40, 16))
    )


def test_isbi_stacks_keep_the_polarity(tmp_path):
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 255, (3, 32, 32), dtype=np.uint8)
    labels = np.where(rng.random((3, 32, 32)) < 0.7, 255, 0).astype(np.uint8)
    write_image(tmp_path / "train-volume.tif", volume)
    write_image(tmp_path / "train-labels.tif", labels)
    samples = read_all(read_isbi2012(tmp_path))
    assert len(samples) == 3 and np.array_equal(samples[2].image, volume[2])
    assert np.array_equal(samples[1].label, (labels[1] == 255).astype(np.uint8))  # 255 = cell interior = class 1
    assert samples[0].instances.max() == measure.label(labels[0] == 255, connectivity=1).max()
    (tmp_path / "train-labels.tif").unlink()
    with pytest.raises(UserError, match="train-labels.tif: not found"):
        read_isbi2012(tmp_path)


def test_pennfudan_both_layouts(tmp_path):
    rng = np.random.default_rng(2)
    for index in range(3):
        image = rng.integers(0, 255, (30 + index, 40, 3), dtype=np.uint8)
        mask = blobs_mask(rng, 30 + index, 40)
        write_image(tmp_path / "official" / "PNGImages" / f"FudanPed{index:05d}.png", image)
        write_image(tmp_path / "official" / "PedMasks" / f"FudanPed{index:05d}_mask.png", mask)
        part = "train" if index < 2 else "valid"
        write_image(tmp_path / "mirror" / f"{part}_images" / f"FudanPed{index:05d}.png", image)
        write_image(tmp_path / "mirror" / f"{part}_masks" / f"FudanPed{index:05d}_mask.png", mask)
    samples, val = read_pennfudan(tmp_path / "official")
    samples = read_all(samples)
    mask = skimage.io.imread(tmp_path / "official" / "PedMasks" / "FudanPed00001_mask.png")
    assert val is None and len(samples) == 3 and samples[1].image.shape == (31, 40, 3)
    assert np.array_equal(samples[1].label, separated(mask) > 0) and np.array_equal(
        samples[1].instances, separated(mask)
    )
    samples, val = read_pennfudan(tmp_path / "mirror")
    assert [s.name for s in samples] == ["FudanPed00000.png", "FudanPed00001.png"] and [s.name for s in val] == [
        "FudanPed00002.png"
    ]


@pytest.mark.skipif(not (SHARED / "isbi2012").is_dir(), reason="the real ISBI 2012 data is not here")
def test_real_isbi2012():
    samples = read_all(read_isbi2012(SHARED / "isbi2012"))
    assert len(samples) == 30 and samples[0].image.shape == (512, 512)
    membrane = np.mean([1 - s.label.mean() for s in samples])
    assert 0.15 < membrane < 0.3  # about 22 % membrane
    folder_samples = read_isbi2012(SHARED / "isbi2012" / "train")
    assert np.array_equal(folder_samples[5].read(TWO_CLASSES).label, samples[5].label)


@pytest.mark.skipif(not (SHARED / "PennFudanPed").is_dir(), reason="the real Penn-Fudan data is not here")
def test_real_pennfudan():
    listed, val = read_pennfudan(SHARED / "PennFudanPed")
    assert len(listed) == 170 and val is None
    samples = read_all(listed[:10])
    assert all(s.image.ndim == 3 and s.image.shape[:2] == s.label.shape for s in samples[:10])
    assert samples[0].instances.max() >= 1


def config_for(root: Path, *overrides: str) -> dict:
    return load_config(
        None,
        [
            "train.dataset_name=folder",
            f"train.data={root}",
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
            *overrides,
        ],
    )


def read_only(root: Path, *overrides: str) -> list:
    """The folder's samples, read as the config says."""
    config = config_for(root, *overrides)
    return [
        sample.read(MaskSettings.from_settings(config.unet.num_classes, config.data))
        for sample in list_samples(config.data, config.unet.num_classes, config.train.seed)[0]
    ]


def write_pair(root: Path, stem: str, mask, image=None, mask_name: str | None = None) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    shape = np.asarray(mask if not isinstance(mask, PIL.Image.Image) else np.array(mask)).shape[:2]
    image = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8) if image is None else image
    skimage.io.imsave(root / "images" / f"{stem}.png", image, check_contrast=False)
    target = root / "masks" / (mask_name or f"{stem}.png")
    if isinstance(mask, PIL.Image.Image):
        mask.save(target)
    elif target.suffix == ".tif":
        tifffile.imwrite(target, mask, photometric="minisblack")
    else:
        skimage.io.imsave(target, mask, check_contrast=False)


def test_a_palette_png_is_read_as_its_indices_not_its_colours(tmp_path):
    palette = PIL.Image.fromarray(CLASSES, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * 759)  # class 1 red, class 2 blue
    write_pair(tmp_path, "a", palette)
    assert skimage.io.imread(tmp_path / "masks" / "a.png").ndim == 3  # what a plain reader sees: colours
    (sample,) = read_only(tmp_path, "unet.num_classes=3")
    assert np.array_equal(sample.label, CLASSES)


def test_sparse_values_are_mapped_by_mask_values_and_others_are_named(tmp_path):
    write_pair(tmp_path, "a", np.array([0, 128, 255], dtype=np.uint8)[CLASSES])
    (sample,) = read_only(tmp_path, "unet.num_classes=3", "train.mask_values=[0, 128, 255]")
    assert np.array_equal(sample.label, CLASSES)
    with pytest.raises(
        UserError,
        match=(
            r"a.png: mask value 128 is not a class of unet.num_classes=3 \(values found: 0, 128, 255; .*\): "
            r"train.mask_values: \[0, 128, 255\] maps them"
        ),
    ):
        read_only(tmp_path, "unet.num_classes=3")
    write_pair(tmp_path, "a", np.array([0, 128, 64], dtype=np.uint8)[CLASSES])
    with pytest.raises(
        UserError,
        match=r"a.png: mask value 64 is not in train.mask_values \(found: 0, 64, 128\): add it to train.mask_values",
    ):
        read_only(tmp_path, "unet.num_classes=3", "train.mask_values=[0, 128, 255]")
    with pytest.raises(ConfigError, match="train.mask_values: 2 given but unet.num_classes is 3"):
        config_for(tmp_path, "unet.num_classes=3", "train.mask_values=[0, 255]")


def test_rgb_colour_masks_are_mapped_by_mask_colors(tmp_path):
    colours = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], dtype=np.uint8)
    write_pair(tmp_path, "a", colours[CLASSES])
    (sample,) = read_only(tmp_path, "unet.num_classes=3", "train.mask_colors=[[0, 0, 0], [255, 0, 0], [0, 255, 0]]")
    assert np.array_equal(sample.label, CLASSES)
    with pytest.raises(
        UserError,
        match=(
            r"a.png: mask is a colour image with the colours \[0, 0, 0\], \[0, 255, 0\], \[255, 0, 0\]: set "
            r"train.mask_colors"
        ),
    ):
        read_only(tmp_path, "unet.num_classes=3")
    with pytest.raises(
        UserError, match=r"a.png: mask colour \[0, 255, 0\] is not in train.mask_colors .*add it to train.mask_colors"
    ):
        read_only(tmp_path, "unet.num_classes=3", "train.mask_colors=[[0, 0, 0], [255, 0, 0], [0, 0, 255]]")


@pytest.mark.parametrize("mask", [CLASSES.clip(0, 1), CLASSES.clip(0, 1) * 255, CLASSES.clip(0, 1).astype(np.float32)])
def test_binary_masks_as_0_1_0_255_and_float(tmp_path, mask):
    write_pair(tmp_path, "a", mask, mask_name="a.tif" if mask.dtype == np.float32 else "a.png")
    (sample,) = read_only(tmp_path)
    assert np.array_equal(sample.label, CLASSES.clip(0, 1)) and sample.mask_read_as == "classes"


def separated(ids: np.ndarray) -> np.ndarray:
    """The ids with a 1 px line between touching objects removed, computed by hand: a pixel whose
    4-neighbour belongs to another object with a smaller id (the image border is background)."""
    padded = np.pad(ids, 1)
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    line = np.any([(other > 0) & (other < ids) for other in neighbours], axis=0) & (ids > 0)
    return np.where(line, 0, ids)


def test_instance_id_masks_give_objects_and_the_paper_weights_in_the_gap(tmp_path):
    ids = two_discs(gap=1)
    assert ids[16, 23] == 0 and ids[16, 22] == 1000 and ids[16, 24] == 2000  # the gap: column 23
    write_pair(tmp_path, "a", ids, mask_name="a.tif")
    (sample,) = read_only(tmp_path)
    assert (
        sample.mask_read_as == "instances"
        and np.array_equal(sample.label, ids > 0)
        and np.array_equal(sample.instances, ids)
    )
    notes = []
    data = datasets_of(
        config_for(tmp_path, "train.val_data=" + str(tmp_path), "train.w_0=10", "train.sigma=5"), notes.append
    )
    assert any(
        note.startswith("train.mask_type auto: read 2 of 2 masks as one id per object") and "a.png" in note
        for note in notes
    )
    border = np.asarray(data.train.images[0].arrays()[2], dtype=np.float64)
    # by hand: in the gap both discs are 1 px away, so the border term is w_0 * exp(-(1 + 1)^2 / (2 * 5^2))
    assert border[16, 23] == pytest.approx(10 * np.exp(-4 / 50), rel=1e-3)
    assert border.max() == pytest.approx(border[16, 23], rel=1e-3)  # it peaks in the gap
    assert border[0, 0] < 0.1 and border[ids > 0].max() == 0  # far from both discs, and on the objects


def test_touching_objects_stay_apart_as_instance_ids_and_merge_as_a_0_255_mask(tmp_path):
    ids = two_discs(gap=-3)
    assert ids[16, 19] == 1000 and ids[16, 20] == 2000  # in contact
    write_pair(tmp_path / "ids", "a", ids, mask_name="a.tif")
    write_pair(tmp_path / "binary", "a", (ids > 0).astype(np.uint8) * 255)
    (as_ids,), (as_binary,) = read_only(tmp_path / "ids"), read_only(tmp_path / "binary")
    line = (ids > 0) & (separated(ids) == 0)
    assert (
        line.sum() >= 8
        and np.array_equal(as_ids.instances, separated(ids))
        and np.array_equal(as_ids.label, separated(ids) > 0)
    )
    assert np.array_equal(as_binary.label, ids > 0)
    assert (
        len(np.unique(as_ids.instances[as_ids.label > 0])) == 2 and as_binary.instances.max() == 1
    )  # one merged object
    separating = border_weights(as_ids.label, as_ids.instances, 10, 5)
    # on the line both objects are 1 px away: the paper's weight w_0 exp(-(1 + 1)^2 / (2 sigma^2)), its highest
    assert (
        separating[line].max() == pytest.approx(10 * np.exp(-4 / 50), rel=1e-9)
        and separating.max() == separating[line].max()
    )
    assert border_weights(as_binary.label, as_binary.instances, 10, 5) is None  # no second object, no border term


def test_a_data_set_whose_masks_read_two_ways_stops_in_one_line_naming_the_odd_file(tmp_path):
    binary = (blobs_mask(np.random.default_rng(3), 40, 48) > 0).astype(np.uint8) * 255
    corrupted = binary.copy()
    corrupted[5:15, 5:15] = 7  # a labelling slip: without the check this mask alone reads as object ids
    for index in range(6):
        write_pair(tmp_path, f"m{index}", corrupted if index == 4 else binary)
    with pytest.raises(UserError) as raised:
        datasets_of(config_for(tmp_path))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("train.mask_type auto: 1 of 6 masks hold object ids (m4.png: 0, 7, 255)")
    assert "train.mask_type: classes" in message and "m0.png: 0, 255" in message
    # with the key set, the same folder trains: 7 is then a class index, named as such
    with pytest.raises(UserError, match="m4.png: mask value 7 is not a class"):
        datasets_of(config_for(tmp_path, "train.mask_type=classes"))


def test_single_object_0_1_masks_beside_object_ids_read_as_instances(tmp_path):
    ids = two_discs(gap=4)
    single = (ids == 1000).astype(np.uint8)  # one object: 0/1, which alone would read as classes
    single[2:4, 2:4] = 1  # and a speck apart from it: components would make it two objects, ids keep it one
    write_pair(tmp_path, "a", ids, mask_name="a.tif")
    write_pair(tmp_path, "b", single)
    notes = []
    data = datasets_of(config_for(tmp_path), notes.append)
    every = data.train.images + data.val.images
    assert len(every) == 2 and all(image.mask_read_as == "instances" for image in every)
    assert any(note.startswith("train.mask_type auto: read 2 of 2 masks as one id per object") for note in notes)
    (b,) = [image for image in every if image.name == "b.png"]
    assert np.array_equal(np.unique(b.instances()), [0, 1])  # one object, as the mask says; not 2 components
    assert b.arrays()[2] is None  # a single object has no second one: no border term


def test_mask_type_classes_and_instances_override_auto(tmp_path):
    write_pair(tmp_path, "a", two_discs(gap=-3), mask_name="a.tif")
    with pytest.raises(UserError, match="mask value 1000 is not a class of unet.num_classes=2"):
        read_only(tmp_path, "train.mask_type=classes")
    write_pair(tmp_path / "binary", "a", CLASSES.clip(0, 1))
    (sample,) = read_only(tmp_path / "binary", "train.mask_type=instances")
    assert sample.mask_read_as == "instances" and np.array_equal(sample.instances, separated(CLASSES.clip(0, 1)))
    with pytest.raises(ConfigError, match="train.mask_type: instances .* unet.num_classes is 3"):
        config_for(tmp_path, "train.mask_type=instances", "unet.num_classes=3")


def test_pairing_edge_cases_and_image_kinds(tmp_path):
    rng = np.random.default_rng(1)
    mask = (rng.random((20, 24)) > 0.5).astype(np.uint8) * 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for stem in ("1", "10", "2", "a.b.c"):
        skimage.io.imsave(tmp_path / "masks" / f"{stem}_mask.png", mask, check_contrast=False)
    skimage.io.imsave(
        tmp_path / "images" / "1.jpg", rng.integers(0, 255, (20, 24, 3), dtype=np.uint8), check_contrast=False
    )  # RGB JPEG
    tifffile.imwrite(tmp_path / "images" / "10.tif", rng.integers(0, 65535, (20, 24), dtype=np.uint16))  # 16-bit TIFF
    skimage.io.imsave(
        tmp_path / "images" / "2.png", rng.integers(0, 255, (20, 24, 4), dtype=np.uint8), check_contrast=False
    )  # RGBA
    skimage.io.imsave(
        tmp_path / "images" / "a.b.c.png", rng.integers(0, 255, (20, 24), dtype=np.uint8), check_contrast=False
    )  # gray
    (tmp_path / "images" / ".hidden.png").write_bytes(b"editor backup, not an image")
    samples = read_only(tmp_path, "unet.image_channels=3")
    assert [sample.name for sample in samples] == ["1.jpg", "10.tif", "2.png", "a.b.c.png"]
    assert all(np.array_equal(sample.label, mask // 255) for sample in samples)
    data = datasets_of(config_for(tmp_path, "unet.image_channels=3", "train.val_fraction=0.25"), lambda message: None)
    assert data.val[0][0].shape == (3, 20, 24) and len(data.train.images) == 3


# Issue 33: hostile and unlucky files, each refused in one line naming the file (and page), or read as it is.


def sparse_tiff(path: Path, side: int = 60000) -> Path:
    """A TIFF whose header claims ``side`` x ``side`` px of uint8 but whose pixels were never written: a
    sparse file of a few KB on disk (3.6 GB if it were read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, shape=(side, side), dtype="uint8")
    assert path.stat().st_blocks * 512 < 2**20  # it stays small on disk
    return path


def test_a_tiff_over_max_image_pixels_is_refused_from_its_header_before_any_pixel_is_read(tmp_path, monkeypatch):
    make_rgb_folder(tmp_path)
    sparse_tiff(tmp_path / "images" / "huge.tif")
    write_image(tmp_path / "masks" / "huge.png", np.zeros((40, 48), np.uint8))

    def no_pixels(*args, **kwargs):
        raise AssertionError("pixels read")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_pixels)
    with pytest.raises(UserError) as caught:
        read_samples(plain_folder_config(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path / 'images' / 'huge.tif'}: 60000 x 60000 px (3600 Mpx) is more than train.max_image_pixels "
        "(1073741824): raise it if memory allows, or split the image"
    )


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_max_image_pixels_decides_for_every_format_and_not_pils_own_guard(tmp_path, monkeypatch, suffix):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (100, 200), dtype=np.uint8)  # 200 x 100 px
    write_image(tmp_path / "images" / f"wide{suffix}", image)
    write_image(tmp_path / "masks" / "wide.png", (image > 127).astype(np.uint8) * 255)
    with pytest.raises(UserError) as caught:
        read_samples(plain_folder_config(tmp_path, "train.max_image_pixels=19999"))
    assert str(caught.value) == (
        f"{tmp_path / 'images' / f'wide{suffix}'}: 200 x 100 px (0.02 Mpx) is more than train.max_image_pixels "
        "(19999): raise it if memory allows, or split the image"
    )
    # PIL's decompression-bomb guard would refuse more than twice its limit: ours decides, and PIL's stays as it was
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 5000)
    (sample,), _ = read_samples(plain_folder_config(tmp_path, "train.max_image_pixels=20000"))
    assert sample.image.shape == (100, 200) and PIL.Image.MAX_IMAGE_PIXELS == 5000
    if suffix != ".jpg":  # lossless
        assert np.array_equal(sample.image, image)


def test_a_tiff_stack_in_a_folder_is_a_sample_per_page_paired_with_the_mask_pages(tmp_path):
    rng = np.random.default_rng(2)
    volume = rng.integers(0, 255, (3, 24, 32), dtype=np.uint8)
    labels = (rng.random((3, 24, 32)) > 0.5).astype(np.uint8) * 255
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "stack.tif", volume, photometric="minisblack")
    tifffile.imwrite(tmp_path / "masks" / "stack.tif", labels, photometric="minisblack")
    write_pair(tmp_path, "single", labels[0], volume[0])
    samples, _ = read_samples(plain_folder_config(tmp_path, "train.mask_type=classes"))
    assert [sample.name for sample in samples] == [
        "single.png",
        "stack.tif page 0",
        "stack.tif page 1",
        "stack.tif page 2",
    ]
    for index, sample in enumerate(samples[1:]):
        assert np.array_equal(sample.image, volume[index]) and np.array_equal(sample.label, labels[index] // 255)
    # a mask stack of other pages is refused, naming both files and the key that reads pages as channels
    tifffile.imwrite(tmp_path / "masks" / "stack.tif", labels[:2], photometric="minisblack")
    with pytest.raises(UserError) as caught:
        read_samples(plain_folder_config(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path / 'masks' / 'stack.tif'}: 2 page(s) but its image stack.tif holds 3 image(s): a stack of images "
        "needs a stack of masks, one page per image"
    )


def test_pages_are_channels_only_where_image_channels_or_imagej_metadata_say_so(tmp_path):
    rng = np.random.default_rng(3)
    volume = rng.integers(0, 255, (3, 24, 32), dtype=np.uint8)
    mask = (rng.random((24, 32)) > 0.5).astype(np.uint8) * 255
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images" / "rgb.tif", volume, photometric="minisblack")  # no ImageJ or OME metadata
    write_image(tmp_path / "masks" / "rgb.png", mask)
    # as many pages as unet.image_channels: one image of 3 channels, and a note that says how and which key
    notes = []
    config = plain_folder_config(tmp_path, "unet.image_channels=3")
    samples, _ = list_samples(config.data, 2, 0, 3, notes.append)
    assert len(samples) == 1 and np.array_equal(samples[0].read(TWO_CLASSES).image, volume)
    assert notes == [
        f"{tmp_path / 'images' / 'rgb.tif'}: read its 3 pages as the 3 channels of one image, as many as "
        "unet.image_channels and no ImageJ or OME metadata says otherwise (with unet.image_channels: 1, a stack of "
        "3 images)"
    ]
    # with one channel the same file is a stack of 3 images, which one mask cannot label
    with pytest.raises(UserError, match=r"rgb.png: 1 page\(s\) but its image rgb.tif holds 3 image\(s\)"):
        list_samples(config.data, 2, 0, 1, notes.append)
    # ImageJ metadata decides, whatever unet.image_channels: 2 slices of 3 channels, paired with 2 mask pages
    hyperstack = rng.integers(0, 255, (2, 3, 24, 32), dtype=np.uint8)
    (tmp_path / "images" / "rgb.tif").unlink()
    (tmp_path / "masks" / "rgb.png").unlink()
    tifffile.imwrite(tmp_path / "images" / "zc.tif", hyperstack, imagej=True, metadata={"axes": "ZCYX"})
    tifffile.imwrite(tmp_path / "masks" / "zc.tif", np.stack([mask, 255 - mask]), photometric="minisblack")
    for channels in (1, 3):
        notes.clear()
        samples, _ = list_samples(config.data, 2, 0, channels, notes.append)
        read = [sample.read(TWO_CLASSES) for sample in samples]
        assert [sample.name for sample in read] == ["zc.tif image 0", "zc.tif image 1"] and not notes
        assert np.array_equal(read[1].image, hyperstack[1]) and np.array_equal(read[1].label, 1 - mask // 255)


def test_nan_or_infinite_pixels_are_refused_naming_the_file_and_page(tmp_path):
    image = np.random.default_rng(4).random((3, 24, 32)).astype(np.float32)
    image[1, :2, :5] = np.nan  # 10
    image[1, 5, :2] = np.inf  # and 2
    image[2, 0, 0] = -np.inf  # 1 on another page
    (tmp_path / "images").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    tifffile.imwrite(tmp_path / "images" / "float.tif", image[1], photometric="minisblack")
    write_image(tmp_path / "masks" / "float.png", np.zeros((24, 32), np.uint8))
    with pytest.raises(UserError) as caught:
        read_samples(plain_folder_config(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path / 'images' / 'float.tif'}: 12 pixels are NaN or infinite: replace them (e.g. with 0) before "
        "training or predicting"
    )
    tifffile.imwrite(tmp_path / "images" / "float.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "masks" / "float.tif", np.zeros((3, 24, 32), np.uint8), photometric="minisblack")
    (tmp_path / "masks" / "float.png").unlink()
    samples, _ = list_samples(plain_folder_config(tmp_path).data, 2, 0)
    assert np.array_equal(samples[0].read(TWO_CLASSES).image, image[0])  # the finite page reads
    with pytest.raises(UserError, match=r"float.tif page 2: 1 pixels are NaN or infinite"):
        samples[2].read(TWO_CLASSES)


def test_two_images_of_one_stem_beside_one_mask_are_refused_naming_both(tmp_path):
    make_rgb_folder(tmp_path, count=2)
    write_image(tmp_path / "images" / "img0.tif", np.zeros((40, 48), np.uint8))
    with pytest.raises(UserError) as caught:
        read_samples(plain_folder_config(tmp_path))
    assert str(caught.value) == (
        f"{tmp_path / 'images' / 'img0.png'} and img0.tif: 2 images match the one mask "
        f"{tmp_path / 'masks' / 'img0.png'}; keep one image, or rename the others and give each its own mask"
    )


def test_unannotated_pixels_are_set_apart_in_every_kind_of_mask():
    name, ignore = "m.png", IGNORE_LABEL
    # 0/255 scribbles with 128 where nobody annotated
    mask = np.array([[0, 128, 255], [255, 128, 0]], dtype=np.uint8)
    label, instances, read_as = label_from_mask(mask, MaskSettings(ignore_value=128), name)
    assert read_as == "classes" and label.tolist() == [[0, ignore, 1], [1, ignore, 0]]
    assert instances[label == ignore].tolist() == [0, 0]
    # class indices with 255 where nobody annotated (VOC's convention), three classes
    mask = np.array([[0, 1, 2, 255]], dtype=np.uint8)
    label, _, _ = label_from_mask(mask, MaskSettings(num_classes=3, ignore_value=255), name)
    assert label.tolist() == [[0, 1, 2, ignore]]
    # sparse gray values mapped by mask_values, the ignore value beside them
    mask = np.array([[10, 20, 99]], dtype=np.uint8)
    label, _, _ = label_from_mask(mask, MaskSettings(mask_values=(10, 20), ignore_value=99), name)
    assert label.tolist() == [[0, 1, ignore]]
    # a gray mask stored as RGB: the ignore value in every channel
    rgb = np.repeat(np.array([[0, 128, 255]], dtype=np.uint8)[..., None], 3, axis=-1)
    label, _, _ = label_from_mask(rgb, MaskSettings(ignore_value=128), name)
    assert label.tolist() == [[0, ignore, 1]]
    # colour masks: a colour of their own for what nobody annotated
    colours = np.array([[[0, 0, 0], [200, 0, 0], [90, 90, 90]]], dtype=np.uint8)
    settings = MaskSettings(mask_colors=((0, 0, 0), (200, 0, 0)), ignore_color=(90, 90, 90))
    assert label_from_mask(colours, settings, name)[0].tolist() == [[0, 1, ignore]]


def test_a_region_of_the_ignore_value_in_object_ids_is_no_object_and_leaves_the_objects_around_it(tmp_path):
    ids = two_discs(gap=4).astype(np.int32)
    ids[:, 40:] = 9  # unannotated: a strip on the right, beside the second disc
    label, instances, read_as = label_from_mask(ids, MaskSettings(ignore_value=9), "m.tif", "instances")
    assert read_as == "instances" and set(np.unique(instances).tolist()) == {0, 1000, 2000}
    assert np.all(label[:, 40:] == IGNORE_LABEL) and np.all(instances[:, 40:] == 0)
    inside = ids[:, :40]
    assert np.array_equal(label[:, :40], (inside > 0).astype(np.uint8))  # the objects around it, as annotated
    # auto reads ids without the ignore value among their values
    write_pair(tmp_path, "a", ids.astype(np.uint16), mask_name="a.tif")
    config = config_for(tmp_path, "train.ignore_value=9")
    (sample,) = list_samples(config.data, 2, 0)[0]
    assert sample.read(MaskSettings.from_settings(2, config.data)).mask_read_as == "instances"
