"""dataset.py: overlap-tiles at the right place, whole images, the samplers' shards, validation, test and fold
splits (on the real ISBI 2012 stacks where they are here), and an import that stays light."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile
import torch
from skimage import measure, segmentation

from dataset import EpochSampler, TileDataset, fold_indices
from losses import IGNORE_LABEL
from segmentation.config import UserError, load_config
from segmentation.data.cache import write_entry
from segmentation.data.preprocess import network_margin, pad_for_model
from tests.helpers import (
    ROOT,
    SHARED,
    SLICES,
    datasets_of,
    folder_config,
    make_id_folder,
    make_rgb_folder,
    plain_folder_config,
    planned_data,
)


def test_tiles_cover_the_image_at_the_right_place(tmp_path):
    height, width, tile, out = 50, 37, 60, 20
    coordinates = np.arange(height * width, dtype=np.float32).reshape(height, width)
    label = (np.arange(height * width).reshape(height, width) % 2).astype(np.int64)
    # coordinates up to 1850 are exact in the cache's float16; with class weights 0 the weight map is the border term
    entry = write_entry(tmp_path / "coordinates", "coordinates", coordinates[None], label, coordinates, 1, 2)
    dataset = TileDataset([entry], np.zeros(2), tile, out, samples_per_image=16, seed=0)
    margin = (tile - out) // 2
    seen = set()
    for key in range(16):
        image_tile, label_tile, weight_tile = dataset[key]
        assert image_tile.shape == (1, tile, tile) and label_tile.shape == weight_tile.shape == (tile, tile)
        centre = image_tile[0, margin : margin + out, margin : margin + out].numpy()
        top, left = divmod(int(centre[0, 0]), width)  # the output tile lies inside the image
        assert np.array_equal(centre, coordinates[top : top + out, left : left + out])
        assert np.array_equal(
            label_tile[margin : margin + out, margin : margin + out].numpy(), label[top : top + out, left : left + out]
        )
        assert torch.equal(weight_tile, image_tile[0])
        seen.add((top, left))
    assert len(seen) > 8
    # the key carries the epoch: another epoch gives other tiles, the same key the same tile
    assert torch.equal(dataset[3][0], dataset[3][0]) and not torch.equal(dataset[3][0], dataset[3 + len(dataset)][0])


def test_images_smaller_than_the_tile_are_mirrored(tmp_path):
    image = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    entry = write_entry(tmp_path / "small", "small", image, np.ones((3, 4), np.uint8), None, 1, 2)
    dataset = TileDataset([entry], None, 8, 8, 1, 0)
    tile = dataset[0][0][0].numpy()
    assert np.array_equal(tile, np.pad(image[0], ((0, 5), (0, 4)), mode="reflect"))


def test_whole_images_are_padded_so_that_the_output_covers_them():
    image = np.random.default_rng(0).random((1, 45, 70)).astype(np.float32)
    padded = pad_for_model(image, depth=4, padding=0)
    margin = network_margin(4, 0)
    assert margin == 92
    assert np.array_equal(padded[:, margin : margin + 45, margin : margin + 70], image)
    assert (padded.shape[1] - 184) >= 45 and (padded.shape[1] - 184 - 4) % 16 == 0
    assert pad_for_model(image, 4, 1).shape == (1, 48, 80)


def test_explicit_validation_images(tmp_path):
    config = load_config(
        None,
        [
            "train.synthetic_images=5",
            "train.synthetic_size=64",
            "train.val_images=[1, 3]",
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
        ],
    )
    data = datasets_of(config, print)
    assert len(data.val) == 2 and data.val.names == ["synthetic 1", "synthetic 3"] and len(data.train) == 3 * 4
    with pytest.raises(UserError, match=r"train.val_images: \[7\] not among the 5 images"):
        datasets_of(load_config(None, ["train.synthetic_images=5", "train.val_images=[7]"]))


@pytest.mark.skipif(not (SHARED / "isbi2012").is_dir(), reason="the real ISBI 2012 data is not here")
def test_isbi_contiguous_folds_hold_out_six_neighbouring_slices():
    overrides = [
        f"train.data={SHARED / 'isbi2012'}",
        "train.val_images=null",
        "train.test_images=null",
        "train.folds=5",
        "train.fold=1",
    ]
    data = datasets_of(load_config(ROOT / "configs" / "isbi2012_cpu.yaml", overrides, []), lambda message: None)
    truth = tifffile.imread(SHARED / "isbi2012" / "train-labels.tif")
    assert len(data.test) == 6 and len(data.val) == 2 and len(data.train) == 22 * 4
    for index, slice_index in enumerate(range(6, 12)):
        assert np.array_equal(data.test[index][1].numpy(), truth[slice_index] == 255)


@pytest.mark.skipif(not (SHARED / "isbi2012").is_dir(), reason="the real ISBI 2012 data is not here")
def test_isbi_cpu_config_trains_on_slices_0_to_20_and_tests_on_24_to_29():
    config = load_config(ROOT / "configs" / "isbi2012_cpu.yaml", [f"train.data={SHARED / 'isbi2012'}"], [])
    data = datasets_of(config, lambda message: None)
    assert len(data.train) == 21 * config.data.samples_per_image
    truth = tifffile.imread(SHARED / "isbi2012" / "train-labels.tif")
    for images, slices in ((data.val, [21, 22, 23]), (data.test, [24, 25, 26, 27, 28, 29])):
        assert len(images) == len(slices)
        for index, slice_index in enumerate(slices):
            assert np.array_equal(images[index][1].numpy(), truth[slice_index] == 255)


@pytest.mark.parametrize("count, folds", [(5, 5), (6, 4), (30, 5), (171, 5), (7, 2)])
def test_folds_partition_every_image_into_near_equal_parts(count, folds):
    for order in ("random", "contiguous"):
        parts = [fold_indices(count, folds, fold, order, seed=0) for fold in range(folds)]
        assert sorted(i for part in parts for i in part) == list(range(count))  # each image in exactly one fold
        sizes = [len(part) for part in parts]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == count
        if order == "contiguous":
            assert all(part == list(range(part[0], part[-1] + 1)) for part in parts)
    assert fold_indices(30, 5, 0, "contiguous", 0) == [0, 1, 2, 3, 4, 5]  # ISBI: the first 6 slices
    assert fold_indices(30, 5, 4, "contiguous", 0) == [24, 25, 26, 27, 28, 29]


def test_random_folds_follow_the_seed():
    assert fold_indices(30, 5, 2, "random", seed=0) == fold_indices(30, 5, 2, "random", seed=0)
    assert fold_indices(30, 5, 2, "random", seed=0) != fold_indices(30, 5, 2, "random", seed=1)
    assert fold_indices(30, 5, 2, "random", seed=0) != list(range(12, 18))


def test_split_seed_holds_out_the_same_images_under_every_train_seed(image_folder):
    def split(*overrides):
        data = datasets_of(
            folder_config(image_folder, "train.folds=3", "train.fold=1", "train.val_fraction=0.25", *overrides),
            lambda message: None,
        )
        return data.test.names, data.val.names

    assert fold_indices(6, 3, 1, "random", seed=0) != fold_indices(
        6, 3, 1, "random", seed=1
    )  # so that the seeds below draw other folds
    assert split("train.seed=1") != split("train.seed=0")
    assert split("train.seed=1", "train.split_seed=0") == split("train.seed=0")  # the same test and validation images
    assert split("train.seed=0", "train.split_seed=1") == split("train.seed=1")
    assert split("train.seed=0")[0] == [SLICES[i] for i in fold_indices(6, 3, 1, "random", seed=0)]


def test_each_fold_holds_out_its_images_from_training_and_validation(image_folder):
    test_names = []
    for fold in range(3):
        data = datasets_of(
            folder_config(
                image_folder,
                "train.folds=3",
                f"train.fold={fold}",
                "train.fold_order=contiguous",
                "train.val_fraction=0.25",
            ),
            lambda message: None,
        )
        assert data.test.names == SLICES[2 * fold : 2 * fold + 2]
        assert len(data.val) == 1 and data.val.names[0] not in data.test.names
        assert len(data.train) == 3 * 2  # the 3 images left, 2 tiles each
        test_names += data.test.names
    assert sorted(test_names) == SLICES


def test_test_images_are_held_out_of_training_and_validation(image_folder):
    data = datasets_of(
        folder_config(image_folder, "train.val_images=[3]", "train.test_images=[5, 4]"), lambda message: None
    )
    assert data.test.names == ["slice04.png", "slice05.png"]
    assert data.val.names == ["slice03.png"]
    assert len(data.train) == 3 * 2  # slices 0-2, 2 tiles each (train.samples_per_image of folder_config)
    assert datasets_of(folder_config(image_folder), lambda message: None).test is None
    with pytest.raises(UserError, match=r"share \[4\]"):
        datasets_of(folder_config(image_folder, "train.val_images=[4]", "train.test_images=[4]"), lambda message: None)
    with pytest.raises(UserError, match=r"train.test_images: \[9\] not among the 6 images"):
        datasets_of(folder_config(image_folder, "train.test_images=[9]"), lambda message: None)
    # with a fraction, validation is drawn from the images left after the test images
    data = datasets_of(
        folder_config(image_folder, "train.val_fraction=0.25", "train.test_images=[0, 1]"), lambda message: None
    )
    assert len(data.val) == 1 and data.val.names[0] not in ("slice00.png", "slice01.png")


def test_sampler_shards_are_disjoint_equal_and_resumable():
    shards = [list(EpochSampler(10, seed=3, rank=rank, world_size=3)) for rank in range(3)]
    assert all(len(shard) == 3 for shard in shards)
    flat = [index for shard in shards for index in shard]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    single = list(EpochSampler(10, seed=3))
    assert [single[3 * i + 1] for i in range(3)] == shards[1]  # every third of the one order
    sampler = EpochSampler(10, seed=3, rank=1, world_size=3)
    sampler.set_epoch(2, start=1)
    assert len(sampler) == 2
    full = EpochSampler(10, seed=3, rank=1, world_size=3)
    full.set_epoch(2)
    assert list(sampler) == list(full)[1:]
    assert all(20 <= index < 30 for index in full)


@pytest.mark.slow
def test_importing_dataset_does_not_import_matplotlib():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, dataset; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0


def test_id_masks_learn_the_object_borders_as_a_third_class(tmp_path):
    make_id_folder(tmp_path)
    config = folder_config(tmp_path, "train.val_images=[4]", "train.test_images=[5]")
    plan, data = planned_data(config)
    assert plan.instance_data and data.train.label_classes == 3 and len(plan.class_weights) == 3
    # a test image's entry (at its own size): the border pixels of each object, as scikit-image finds
    # them on the stored ids (touching objects already parted by a 1 px line), are class 2
    entry = data.test.images[0]
    ids = entry.instances()
    expected = np.where(segmentation.find_boundaries(ids, mode="inner") & (ids > 0), 2, (ids > 0).astype(np.uint8))
    assert np.array_equal(np.asarray(entry.arrays()[1]), expected) and (expected == 2).sum() > 100
    assert sorted({int(v) for _, label, _ in (data.train[i] for i in range(8)) for v in label.unique()}) == [0, 1, 2]
    # the whole objects' areas, as regionprops measures those away from the image border
    areas = sorted(
        r.area
        for r in measure.regionprops(ids)
        if r.bbox[0] > 0 and r.bbox[1] > 0 and r.bbox[2] < ids.shape[0] and r.bbox[3] < ids.shape[1]
    )
    assert sorted(entry.object_areas) == areas and len(areas) > 5

    two_plan, two = planned_data(
        folder_config(tmp_path, "train.val_images=[4]", "train.test_images=[5]", "unet.boundary_class=false")
    )
    assert two.train.label_classes == 2 and len(two_plan.class_weights) == 2
    _, folded, _ = two.test[0]
    assert np.array_equal(folded.numpy(), (expected > 0).astype(np.int64))  # the border is its object's again


def test_class_masks_keep_two_classes_and_cannot_learn_borders(tmp_path):
    make_rgb_folder(tmp_path, rgb=False)
    plan, data = planned_data(plain_folder_config(tmp_path))
    assert not plan.instance_data and data.train.label_classes == 2 and len(plan.class_weights) == 2
    assert plan.mask_reading == "classes" and plan.min_object_size == 0 and not plan.fill_holes
    with pytest.raises(UserError, match="unet.boundary_class: true learns the borders of objects from masks of ob"):
        datasets_of(plain_folder_config(tmp_path, "unet.boundary_class=true"))


def test_the_data_line_gives_sizes_as_width_x_height_as_every_message_does(tmp_path):
    make_rgb_folder(tmp_path, size=(40, 48))  # 40 rows of 48 px
    notes = []
    datasets_of(plain_folder_config(tmp_path, "unet.image_channels=3", "train.device=cpu"), notes.append)
    line = next(note for note in notes if note.startswith("data: "))
    assert "training images 48-48 x 40-40 px (width x height)" in line


def test_tiles_of_an_image_annotated_in_part_are_drawn_where_the_annotations_are(tmp_path):
    height, width, tile, out = 120, 100, 60, 20
    label = np.full((height, width), IGNORE_LABEL, dtype=np.uint8)
    label[100:104, 5:9] = 1  # two small strokes, far apart: a random tile would rarely hold either
    label[10:12, 80:95] = 0
    image = np.arange(height * width, dtype=np.float32).reshape(1, height, width) % 1000
    entry = write_entry(tmp_path / "sparse", "sparse", image, label, None, 1, 2)
    assert entry.unannotated == height * width - 16 - 30 and entry.annotated == 46
    points = entry.annotated_points()
    assert len(points) == 46 and np.all(label[points[:, 0], points[:, 1]] != IGNORE_LABEL)
    dataset = TileDataset([entry], None, tile, out, samples_per_image=64, seed=0)
    margin = (tile - out) // 2
    for key in range(64):
        _, label_tile, weight_tile = dataset[key]
        centre = label_tile[margin : margin + out, margin : margin + out]
        assert (centre != IGNORE_LABEL).any()  # every tile's labelled output holds an annotated pixel
        assert torch.all(weight_tile[label_tile == IGNORE_LABEL] == 0)
    # an image annotated everywhere draws its tiles as before: the same random draws, the same positions
    dense = write_entry(tmp_path / "dense", "dense", image, np.ones((height, width), np.uint8), None, 1, 2)
    tiles = TileDataset([dense], None, tile, out, samples_per_image=4, seed=3)
    for key in range(4):
        rng = np.random.default_rng([3, 0, key])
        expected = int(rng.integers(0, height - out + 1)), int(rng.integers(0, width - out + 1))
        assert tiles.tile_position(dense, np.random.default_rng([3, 0, key])) == expected


def test_images_without_annotations_are_left_out_with_a_note_and_an_unused_ignore_value_is_noted(tmp_path):
    make_rgb_folder(tmp_path, count=5, rgb=False)
    notes = []
    planned_data(plain_folder_config(tmp_path, "train.ignore_value=128", "train.val_images=[0]"), notes.append)
    assert any("train.ignore_value (or ignore_color) is in no mask" in note for note in notes)
    mask = skimage.io.imread(tmp_path / "masks" / "img4.png")
    skimage.io.imsave(tmp_path / "masks" / "img4.png", np.full_like(mask, 128), check_contrast=False)
    notes.clear()
    config = plain_folder_config(tmp_path, "train.ignore_value=128", "train.val_images=[0]")
    plan, data = planned_data(config, notes.append)
    assert any("1 image(s) have no annotated pixel and are left out: img4.png" in note for note in notes)
    assert "img4.png" not in [image.name for image in data.train.images] and plan.ignore_value == 128.0
    assert plan.sparse and not any("in no mask" in note for note in notes)
    for index in range(4):
        skimage.io.imsave(tmp_path / "masks" / f"img{index}.png", np.full_like(mask, 128), check_contrast=False)
    with pytest.raises(UserError, match="no train image has an annotated pixel"):
        planned_data(plain_folder_config(tmp_path, "train.ignore_value=128", "train.val_images=[4]"))
