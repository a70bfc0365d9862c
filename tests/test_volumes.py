"""Volumes (z-stacks): their voxel spacing from TIFF metadata, reading a stack as one volume, the network's
geometry planned from the spacing (nnU-Net's rule) and the paper's weight map with anisotropic distances."""

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from model import UNet, output_size
from segmentation.config import UserError, load_config
from segmentation.data.datacheck import check_data
from segmentation.data.images import tiff_spacing
from segmentation.data.readers import ISBI_SPACING, MaskSettings, read_folder_pairs, read_isbi2012, volume_samples
from segmentation.data.weight_maps import border_weights
from segmentation.geometry import axis_geometry, kernels_and_pools, volume_tile
from segmentation.settings import UNetSettings

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"


def write_stack(path: Path, array: np.ndarray, **metadata) -> Path:
    tifffile.imwrite(path, array, **({"photometric": "minisblack"} | metadata))  # pages, never RGB planes
    return path


def test_spacing_is_read_from_imagej_and_ome_metadata_and_absent_from_plain_stacks(tmp_path):
    volume = np.zeros((4, 6, 8), np.uint8)
    imagej = write_stack(
        tmp_path / "ij.tif", volume, imagej=True, resolution=(1 / 0.25, 1 / 0.5), metadata={"spacing": 2.0}
    )
    ome = write_stack(
        tmp_path / "ome.tif",
        volume,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 3.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.25},
    )
    plain = write_stack(tmp_path / "plain.tif", volume)
    assert tiff_spacing(imagej) == pytest.approx((2.0, 0.5, 0.25))  # ImageJ: resolution = pixels per unit
    assert tiff_spacing(ome) == pytest.approx((3.0, 0.5, 0.25))
    assert tiff_spacing(plain) is None


def test_a_stack_is_one_volume_in_blocks_of_sections_and_a_missing_spacing_is_a_note(tmp_path):
    image = write_stack(tmp_path / "v.tif", np.arange(7 * 5 * 6, dtype=np.uint16).reshape(7, 5, 6))
    mask = write_stack(tmp_path / "m.tif", np.zeros((7, 5, 6), np.uint8))
    (whole,), note = volume_samples(image, mask)
    assert whole.sections == (0, 7) and whole.spacing == (1.0, 1.0, 1.0)
    assert note.startswith(f"{image}: its metadata states no voxel spacing") and "train.spacing" in note
    blocks, note = volume_samples(image, mask, spacing=(5, 1, 1), blocks=3)
    assert [sample.sections for sample in blocks] == [(0, 2), (2, 5), (5, 7)] and note is None
    sample = blocks[1].read(MaskSettings())
    assert sample.image.shape == (3, 5, 6) and sample.spacing == (5.0, 1.0, 1.0)
    assert np.array_equal(sample.image, np.arange(7 * 5 * 6).reshape(7, 5, 6)[2:5])


def test_a_2d_image_or_a_shorter_mask_stack_is_refused_in_one_line(tmp_path):
    flat = write_stack(tmp_path / "flat.tif", np.zeros((5, 6), np.uint8))
    stack = write_stack(tmp_path / "stack.tif", np.zeros((4, 5, 6), np.uint8))
    short = write_stack(tmp_path / "short.tif", np.zeros((3, 5, 6), np.uint8))
    with pytest.raises(UserError, match="one 2D image, but unet.dims: 3 trains on volumes") as caught:
        volume_samples(flat, flat)
    assert "\n" not in str(caught.value)
    with pytest.raises(UserError, match="3 page.*holds 4 image"):
        volume_samples(stack, short)


def test_object_ids_span_sections_and_touching_objects_part_in_3d(tmp_path):
    ids = np.zeros((3, 6, 8), np.uint16)
    ids[:, 1:5, 1:4], ids[:, 1:5, 4:7] = 1, 2  # two objects touching along x in every section
    ids[1, 5, 2] = 7  # an object of one voxel below object 1
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_stack(tmp_path / "images" / "a.tif", np.ones((3, 6, 8), np.uint8))
    write_stack(tmp_path / "masks" / "a.tif", ids)
    (sample,) = read_folder_pairs(tmp_path / "images", tmp_path / "masks", "auto", dims=3, note=lambda _: None)
    read = sample.read(MaskSettings())
    assert read.mask_read_as == "instances" and read.label.shape == (3, 6, 8)
    # the line between 1 and 2 is the larger id's face (x = 4), in every section; 7 touches 1 from below
    assert not read.label[:, 1:5, 4].any() and read.label[:, 1:5, 5].all()
    assert read.label[1, 5, 2] == 0 and read.label[1, 4, 2] == 1


def test_the_ignore_value_is_read_in_volumes(tmp_path):
    mask = np.zeros((3, 4, 5), np.uint8)
    mask[0], mask[1, :2] = 255, 128
    image = write_stack(tmp_path / "v.tif", np.zeros((3, 4, 5), np.uint8))
    labels = write_stack(tmp_path / "m.tif", mask)
    (sample,), _ = volume_samples(image, labels, "classes")
    read = sample.read(MaskSettings(ignore_value=128))
    assert (read.label[0] == 1).all() and (read.label[1, :2] == 255).all() and (read.label[1, 2:] == 0).all()


@pytest.mark.skipif(not (ISBI / "train-volume.tif").is_file(), reason="needs ../shared/data/isbi2012")
def test_isbi_2012_as_a_volume_is_ten_blocks_of_three_sections_of_its_known_spacing():
    samples = read_isbi2012(ISBI, dims=3)
    assert [sample.sections for sample in samples] == [(start, start + 3) for start in range(0, 30, 3)]
    assert all(sample.spacing == ISBI_SPACING for sample in samples)
    read = samples[9].read(MaskSettings())
    assert read.image.shape == (3, 512, 512) and set(np.unique(read.label)) == {0, 1}


def test_geometry_follows_nnunets_rule_on_isbi_spacing():
    # 50 x 4 x 4 nm: z is 12.5x coarser; x and y are pooled until their spacing (64 nm) passes half of z's
    kernels, pools = kernels_and_pools((50, 4, 4), 4)
    assert pools == ((1, 2, 2), (1, 2, 2), (1, 2, 2), (2, 2, 2))
    assert kernels == ((1, 3, 3), (1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3))
    assert kernels_and_pools((1, 1, 1), 2) == (((3, 3, 3),) * 3, ((2, 2, 2),) * 2)
    # a tile of 8 sections is pooled along z only while 4 or more remain
    assert kernels_and_pools((1, 1, 1), 3, (8, 64, 64))[1] == ((2, 2, 2), (1, 2, 2), (1, 2, 2))


@pytest.mark.parametrize(("spacing", "padding"), [((50, 4, 4), 1), ((50, 4, 4), 0), ((1, 1, 1), 1), ((2, 1, 1), 0)])
def test_an_automatic_volume_tile_is_valid_along_every_axis_and_the_network_runs_on_it(spacing, padding):
    depth = 2
    tile, kernels, pools = volume_tile(spacing, depth, padding, None, None)
    for axis, side in enumerate(tile):
        output_size(side, depth, padding, *axis_geometry(kernels, pools, axis))  # raises where invalid
    ratio = spacing[0] / spacing[-1]
    assert tile[0] <= tile[1] and tile[0] * ratio >= tile[1] / 3  # about the same extent along z as in-plane
    net = UNet(1, 2, (2, 4), padding=padding, dims=3, kernel_sizes=kernels, pool_sizes=pools)
    small = tuple(net.valid_input_size(1, axis) for axis in range(3))
    expected = tuple(net.output_size(side, axis) for axis, side in enumerate(small))
    assert net(torch.zeros(1, 1, *small)).shape == (1, 2, *expected)


def test_the_border_term_in_3d_uses_distances_with_the_spacing():
    instances = np.zeros((5, 12, 12), np.int32)
    instances[:, 2:6, 2:10], instances[:, 7:11, 2:10] = 1, 2
    instances[4, :, :] = 0  # the last section shows no object: its distances run along z
    label = (instances > 0).astype(np.uint8)
    spacing = (3.0, 1.0, 1.0)
    border = border_weights(label, instances, w_0=10, sigma=5, spacing=spacing)
    # reference: exact distances to each object over the whole volume, with scipy's sampling
    distances = np.sort(
        np.stack([ndimage.distance_transform_edt(instances != k, sampling=spacing) for k in (1, 2)]), axis=0
    )
    expected = np.where(label == 0, 10 * np.exp(-((distances[0] + distances[1]) ** 2) / (2 * 5.0**2)), 0)
    assert np.allclose(border, expected, atol=1e-5)
    isotropic = border_weights(label, instances, w_0=10, sigma=5)
    assert border[4, 6, 5] < isotropic[4, 6, 5]  # a section 3 px away, not 1: a smaller border term there


def test_volume_settings_that_cannot_work_are_one_line_each():
    with pytest.raises(UserError) as caught:
        load_config(None, ["unet.dims=3", "train.spacing=[1, 2]", "augment.interpolation=bicubic"])
    lines = str(caught.value).splitlines()
    assert any(line.startswith("train.spacing: expected the voxel size [z, y, x]") for line in lines)
    assert any(line.startswith("augment.interpolation: bicubic warps only images") for line in lines)
    with pytest.raises(UserError, match="Penn-Fudan holds photographs"):
        load_config(None, ["unet.dims=3", "train.dataset_name=pennfudan"])


def test_dataset_check_lists_stacks_as_volumes_with_their_spacing_and_a_valid_3d_tile(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    metadata = {"spacing": 2.5, "axes": "ZYX"}
    write_stack(
        tmp_path / "images" / "a.tif",
        np.zeros((10, 64, 80), np.uint8),
        imagej=True,
        resolution=(2, 2),
        metadata=metadata,
    )
    write_stack(tmp_path / "masks" / "a.tif", np.zeros((10, 64, 80), np.uint8))
    lines = check_data(tmp_path)["lines"]
    assert "  a.tif: 10 x 64 x 80 voxels, spacing (2.5, 0.5, 0.5)" in lines
    tile_line = next(line for line in lines if line.startswith("3D tiles:"))
    depth, side = (int(number) for number in re.search(r"give (\d+) x (\d+) x", tile_line).groups())
    defaults = UNetSettings()
    kernels, pools = kernels_and_pools((2.5, 0.5, 0.5), defaults.depth, (depth, side, side))
    for axis, size in ((0, depth), (1, side)):
        output_size(size, defaults.depth, defaults.padding, *axis_geometry(kernels, pools, axis))
