"""3D runs (unet.dims: 3): the plan of a volume run, its tiles and cache entries, a run on synthetic volumes,
and test.py on it (mask stacks, orthogonal views, a stack predicted in slabs)."""

import dataclasses

import numpy as np
import pytest
import test_script
import tifffile
import torch

from dataset import TileDataset
from model import UNet
from segmentation.config import UserError, load_config
from segmentation.data.cache import PreprocessingSettings, normalize_volume, prepare_images
from segmentation.data.images import image_layout
from segmentation.data.readers import MaskSettings, volume_samples
from segmentation.data.synthetic_volumes import synthetic_em_volume
from segmentation.engine.run import check_training_memory
from segmentation.inference.trained import load_trained
from segmentation.inference.volumes import volume_source
from segmentation.plan import Plan
from tests.helpers import TINY_3D, planned_data
from training import train


def write_volume(path, array, **metadata):
    tifffile.imwrite(path, array, photometric="minisblack", **metadata)
    return path


def test_a_3d_plan_keeps_its_geometry_through_a_checkpoint_round_trip(tmp_path):
    config = load_config(None, [*TINY_3D, f"train.cache_dir={tmp_path / 'cache'}"])
    plan, data = planned_data(config)
    # spacing (5, 1, 1): y and x pooled twice before z would be, z convolved only at the deepest level
    assert plan.dims == 3 and plan.spacing == (5.0, 1.0, 1.0)
    assert plan.kernel_sizes == ((1, 3, 3), (1, 3, 3), (3, 3, 3)) and plan.pool_sizes == ((1, 2, 2), (1, 2, 2))
    assert plan.tile_shape == (16, 32, 32)  # no further than the 16 x 32 x 32 volumes need
    assert Plan.from_dict(plan.to_dict(), "here") == plan
    image, label, weight = data.train[0]
    assert image.shape == (1, 16, 32, 32) and label.shape == weight.shape == (16, 32, 32)
    edited = plan.to_dict() | {"kernel_sizes": None}
    with pytest.raises(UserError, match="without its kernel and pooling sizes"):
        Plan.from_dict(edited, "best.pt")


def test_a_3d_step_is_checked_against_memory_with_its_planned_tile(tmp_path):
    config = load_config(None, [*TINY_3D, f"train.cache_dir={tmp_path / 'cache'}"])
    plan, _ = planned_data(config)
    check_training_memory(config, torch.device("cpu"))  # before the data: a volume's tile is not known yet
    check_training_memory(config, torch.device("cpu"), plan)  # 16 x 32 x 32 voxels fit
    huge = dataclasses.replace(plan, tile_depth=1024, tile_size=2048)
    with pytest.raises(UserError, match=r"activations of 2 tiles of 1024x2048x2048 px") as caught:
        check_training_memory(config, torch.device("cpu"), huge)
    assert "\n" not in str(caught.value)


def test_volume_tiles_are_mirrored_windows_of_the_volume(tmp_path):
    volume = np.random.default_rng(0).integers(0, 255, (5, 12, 14)).astype(np.uint8)
    mask = (volume > 128).astype(np.uint8) * 255
    image = write_volume(tmp_path / "v.tif", volume)
    (sample,), _ = volume_samples(image, write_volume(tmp_path / "m.tif", mask), "classes", spacing=(2, 1, 1))
    settings = PreprocessingSettings(1, 0.0, 5.0, MaskSettings())
    (entry,) = prepare_images([sample], [1.0], settings, tmp_path / "cache", note=lambda _: None)
    assert entry.shape == (5, 12, 14) and entry.spacing == (2.0, 1.0, 1.0) and entry.dims == 3
    tiles = TileDataset([entry], None, (8, 16, 16), (4, 8, 8), 3, seed=0)  # margins 2, 4, 4 mirrored
    reference = np.pad(normalize_volume(volume, 1)[0], ((2, 2), (4, 4), (4, 4)), mode="reflect")
    for key in range(3):
        tile, label, _ = tiles[key]
        corner = tiles.tile_position(entry, np.random.default_rng([0, 0, key]))
        window = tuple(slice(start, start + side) for start, side in zip(corner, (8, 16, 16)))
        assert tile.shape == (1, 8, 16, 16) and label.shape == (8, 16, 16)
        assert np.allclose(tile[0].numpy(), reference[window], atol=1e-3)


def test_volume_tiles_are_cut_where_the_annotations_are(tmp_path):
    mask = np.full((8, 40, 40), 128, np.uint8)
    mask[6, 30:34, 30:34] = 255  # a few annotated voxels in one corner of one section
    mask[6, 34:36, 30:34] = 0
    image = write_volume(tmp_path / "v.tif", np.zeros((8, 40, 40), np.uint8))
    (sample,), _ = volume_samples(image, write_volume(tmp_path / "m.tif", mask), "classes", spacing=(1, 1, 1))
    settings = PreprocessingSettings(1, 0.0, 5.0, MaskSettings(ignore_value=128))
    (entry,) = prepare_images([sample], [1.0], settings, tmp_path / "cache", note=lambda _: None)
    assert entry.unannotated == mask.size - 24 and entry.annotated_points().shape == (24, 3)
    tiles = TileDataset([entry], None, (4, 12, 12), (4, 12, 12), 10, seed=1)
    for key in range(10):
        _, label, weight = tiles[key]
        assert (label != 255).any() and float(weight[label == 255].abs().sum()) == 0


def test_a_stack_given_to_a_3d_model_must_be_a_stack_of_its_channels(tmp_path):
    flat = write_volume(tmp_path / "flat.tif", np.zeros((6, 7), np.uint8))
    with pytest.raises(UserError, match="one 2D image, but the model is 3D"):
        volume_source(image_layout(flat), 1)
    stack = write_volume(tmp_path / "stack.tif", np.arange(3 * 6 * 7, dtype=np.uint16).reshape(3, 6, 7))
    source = volume_source(image_layout(stack), 1)
    assert source.shape == (1, 3, 6, 7) and source[0, 2, 5, 6] == 3 * 6 * 7 - 1


@pytest.mark.slow
def test_a_3d_run_trains_and_test_py_writes_mask_stacks_and_orthogonal_views(tmp_path, capsys):
    paths = [f"train.{key}={tmp_path / key}" for key in ("save_path", "log_path", "cache_dir")]
    result = train(load_config(None, [*TINY_3D, *paths, "train.run_name=volumes"]))
    checkpoint = result.folders.weights / "best.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["plan"]["dims"] == 3 and state["model"]["inc.double_conv.0.weight"].shape == (4, 1, 1, 3, 3)
    trained = load_trained(checkpoint)
    assert isinstance(trained.model, UNet) and trained.model.dims == 3
    assert trained.model.pool_sizes == ((1, 2, 2), (1, 2, 2))

    capsys.readouterr()
    assert test_script.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "diagnostics")]) == 0
    written = tifffile.imread(tmp_path / "diagnostics" / "masks" / "synthetic volume 3.tif")
    assert written.shape == (16, 32, 32) and set(np.unique(written)) <= {0, 255}
    assert (tmp_path / "diagnostics" / "test_000.png").is_file()  # xy, xz and yz views

    # a stack of another size, predicted from its file in slabs along z, as in memory
    image, *_ = synthetic_em_volume(12, 40, np.random.default_rng(3))
    pixels = (np.clip(image, 0, 1) * 255).astype(np.uint8)
    stack = write_volume(tmp_path / "stack.tif", pixels, imagej=True, metadata={"spacing": 5.0, "axes": "ZYX"})
    assert (
        test_script.main(["--checkpoint", str(checkpoint), "--input", str(stack), "--output", str(tmp_path / "o")]) == 0
    )
    assert "streamed in slabs" in capsys.readouterr().out
    streamed = tifffile.imread(tmp_path / "o" / "stack.tif")
    predictor = trained.predictor
    probabilities = predictor.probabilities(torch.from_numpy(normalize_volume(pixels, 1)))
    expected = predictor.classes(probabilities).numpy() * 255
    assert streamed.shape == (12, 40, 40) and np.array_equal(streamed, expected)
    assert dataclasses.asdict(predictor.plan)["dims"] == 3
