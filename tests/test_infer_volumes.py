"""segmentation.inference.infer on volumes: tiled 3D prediction against one pass over the whole mirrored volume,
per-axis kernels and poolings, Gaussian blending in 3D, in-plane test-time augmentation and scaling, slabs of a
memory-mapped stack in bounded memory, the volume's streaming statistics, and clear errors for wrong shapes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import UNet, output_size, valid_input_sizes
from segmentation.data.preprocess import volume_statistics
from segmentation.inference.infer import predict_probabilities, predict_slabs
from segmentation.inference.tiles import tile_grid

SHAPE = (1, 10, 20, 24)  # (C, D, H, W)
ANISOTROPIC = {"kernel_sizes": ((1, 3, 3), (1, 3, 3), (3, 3, 3)), "pool_sizes": ((1, 2, 2), (2, 2, 2))}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; two spin-wait badly when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet3d(padding: int = 0, norm: str = "none", **geometry) -> UNet:
    torch.manual_seed(0)
    return UNet(1, 2, (4, 8), padding=padding, norm=norm, dims=3, **geometry).eval()


class ConvStandIn3D(nn.Module):
    """One same-size 3D convolution with the attributes of a padding-1, depth-2 3D UNet that inference reads."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.image_channels, self.num_classes, self.depth, self.padding, self.dims = 1, 3, 2, 1, 3
        self.conv = nn.Conv3d(1, 3, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def mirrored_volume(model: nn.Module, volume: torch.Tensor) -> torch.Tensor:
    """(1, C, D', H', W') the volume mirrored by NumPy's reflect (as ``preprocess.pad_for_model`` in 2D) by each axis'
    margin before and up to a valid input size after, the margins found from ``output_size`` along each axis."""
    pads = []
    for axis, size in enumerate(volume.shape[1:]):
        kernels, pools = model.axis(axis) if hasattr(model, "axis") else (None, None)
        smallest = valid_input_sizes(1, model.depth, model.padding, kernels, pools)[1]
        margin = (smallest - output_size(smallest, model.depth, model.padding, kernels, pools)) // 2
        padded = valid_input_sizes(size + 2 * margin, model.depth, model.padding, kernels, pools)[1]
        pads.append((margin, padded - size - margin))
    return torch.from_numpy(np.pad(volume.numpy(), [(0, 0), *pads], mode="reflect"))[None]


def whole_volume_probabilities(model: nn.Module, volume: torch.Tensor) -> torch.Tensor:
    """Reference: softmax of one forward pass over the whole mirrored volume, cropped to the volume."""
    with torch.no_grad():
        probabilities = model(mirrored_volume(model, volume)).softmax(1)[0]
    return probabilities[:, : volume.shape[1], : volume.shape[2], : volume.shape[3]]


def record_batches(model: nn.Module) -> list[tuple[int, ...]]:
    """Input shapes of every forward call of ``model`` from now on; the model must be in eval mode."""
    shapes = []

    def hook(module, inputs):
        assert not module.training
        shapes.append(tuple(inputs[0].shape))

    model.register_forward_pre_hook(hook)
    return shapes


# --- padding 0: seamless overlap-tile in 3D ------------------------------------------


@pytest.mark.parametrize(
    "geometry, tile_size, tiles_per_axis",
    [
        ({}, 52, [1, 2, 2]),  # 12 voxel output tiles: one along z, two in-plane
        ({}, (44, 52, 60), [3, 2, 2]),  # a tile side per axis: 4, 12 and 20 voxel output tiles
        (ANISOTROPIC, (14, 52, 52), [2, 2, 2]),  # z: margin 4 and period 2 (kernel 1 and pool 1 at level 0)
    ],
)
# A float32 pass over the whole volume is itself 4e-5 from a float64 one with "layer" (a norm over 4 channels
# magnifies rounding where they are nearly equal), so only "none" meets 1e-5.
@pytest.mark.parametrize("norm, tolerance", [("none", 1e-5), ("layer", 1e-4)])
def test_padding0_tiles_equal_whole_volume(geometry, tile_size, tiles_per_axis, norm, tolerance):
    model = unet3d(norm=norm, **geometry)
    volume = torch.randn(SHAPE)
    assert [len(starts) for starts in tile_grid(model, SHAPE[1:], tile_size, 0.25).starts] == tiles_per_axis
    shapes = record_batches(model)
    probabilities = predict_probabilities(model, volume, tile_size=tile_size, batch_size=3)
    assert sum(shape[0] for shape in shapes) == np.prod(tiles_per_axis)
    assert probabilities.shape == (2, *SHAPE[1:]) and probabilities.dtype == torch.float32
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, volume), atol=tolerance, rtol=0)


@pytest.mark.parametrize("padding, tile_size", [(0, (14, 44, 44)), (1, (4, 8, 8))])
def test_anisotropic_network_predicts_every_voxel(padding, tile_size):
    model = unet3d(padding, **ANISOTROPIC)
    volume = torch.randn(1, 7, 21, 18)
    shapes = record_batches(model)
    probabilities = predict_probabilities(model, volume, tile_size=tile_size, tta=True)
    assert probabilities.shape == (2, 7, 21, 18)
    torch.testing.assert_close(probabilities.sum(0), torch.ones(7, 21, 18), atol=1e-5, rtol=0)
    grid = tile_grid(model, volume.shape[1:], tile_size, 0.25)
    assert grid.margins == ((4, 20, 20) if padding == 0 else (0, 0, 0))
    assert {shape[2:] for shape in shapes} == {tuple(side + 2 * m for side, m in zip(grid.tile, grid.margins))}


def test_quarter_turns_need_the_same_geometry_in_plane():
    model = unet3d(kernel_sizes=((3, 1, 3),) * 3, pool_sizes=((2, 2, 2),) * 2)
    with pytest.raises(ValueError, match="quarter turns swaps H and W"):
        predict_probabilities(model, torch.randn(SHAPE), tta=True)
    predict_probabilities(model, torch.randn(1, 3, 4, 5), tile_size=44, tta=[(0, False), (2, True)])


def test_tta_averages_the_in_plane_transforms_and_never_flips_z():
    model = unet3d()
    volume = torch.randn(1, 6, 10, 12)
    padded = mirrored_volume(model, volume)
    expected = 0
    with torch.no_grad():
        for flip in (False, True):
            for turns in range(4):
                transformed = (padded.flip(-1) if flip else padded).rot90(turns, (-2, -1))
                probabilities = model(transformed).softmax(1).rot90(-turns, (-2, -1))
                expected = expected + (probabilities.flip(-1) if flip else probabilities) / 8
    augmented = predict_probabilities(model, volume, tile_size=(44, 48, 48), tta=True)
    torch.testing.assert_close(augmented, expected[0, :, :6, :10, :12], atol=1e-5, rtol=0)


# --- padding 1: Gaussian blending in 3D ----------------------------------------------


def test_padding1_per_voxel_model_is_exact():
    torch.manual_seed(0)
    model = ConvStandIn3D(kernel_size=1)
    volume = torch.randn(SHAPE)
    probabilities = predict_probabilities(model, volume, tile_size=8, overlap=0.5)
    torch.testing.assert_close(probabilities, whole_volume_probabilities(model, volume), atol=1e-5, rtol=0)


def test_padding1_tiles_close_to_one_tile():
    model = unet3d(padding=1)
    volume = torch.randn(1, 40, 36, 44)
    shapes = record_batches(model)
    whole = predict_probabilities(model, volume, tile_size=64)
    assert shapes == [(1, 1, 40, 36, 44)]
    errors = {}
    for overlap in (0.0, 0.5):
        probabilities = predict_probabilities(model, volume, tile_size=32, overlap=overlap)
        assert probabilities.shape == (2, 40, 36, 44)
        errors[overlap] = (probabilities - whole).abs().mean()
    assert len(shapes) > 3, "the volume should have been cut into several tiles"
    assert errors[0.5] < 0.05 and errors[0.5] < errors[0.0] / 2


@pytest.mark.parametrize("padding, side, expected", [(1, 96, 96), (0, 76, 116)])  # 116: 76 voxel output tiles
def test_default_volume_tiles(padding, side, expected):
    model = unet3d(padding)
    shapes = record_batches(model)
    predict_probabilities(model, torch.randn(1, side, 1, 1))
    assert [shape[2] for shape in shapes] == [expected]
    predict_probabilities(model, torch.randn(1, side + 1, 1, 1))
    assert sum(shape[0] for shape in shapes[1:]) == 2 and max(shape[2] for shape in shapes[1:]) <= expected


def test_image_scale_resizes_each_plane_in_plane_and_back_trilinearly():
    model = unet3d(padding=1, norm="batch")
    volume = torch.randn(1, 6, 24, 20)
    probabilities = predict_probabilities(model, volume, 16, image_scale=0.5)
    assert probabilities.shape == (2, 6, 24, 20)
    small = F.interpolate(volume.transpose(0, 1), size=(12, 10), mode="bilinear", antialias=True, align_corners=False)
    expected = F.interpolate(
        predict_probabilities(model, small.transpose(0, 1), 16)[None],
        size=(6, 24, 20),
        mode="trilinear",
        align_corners=False,
    )[0]
    torch.testing.assert_close(probabilities, expected)


# --- slabs of a memory-mapped stack, the volume's statistics ---------------------------


@pytest.mark.parametrize("padding, tile_size", [(0, (44, 60, 64)), (1, 8)])
def test_slabs_of_a_memory_map_are_the_whole_prediction(tmp_path, padding, tile_size):
    model = unet3d(padding)
    raw = np.random.default_rng(0).integers(0, 4000, size=SHAPE).astype(np.uint16)
    np.memmap(tmp_path / "stack.raw", dtype=np.uint16, mode="w+", shape=SHAPE)[:] = raw
    stack = np.memmap(tmp_path / "stack.raw", dtype=np.uint16, mode="r", shape=SHAPE)
    mean, std = volume_statistics(stack, chunk=3)

    shapes = record_batches(model)
    slabs = predict_slabs(model, stack, lambda window: (window - mean) / std, tile_size, batch_size=2)
    first = next(slabs)
    batches_before_the_first_slab = len(shapes)
    slabs = [first, *slabs]
    assert batches_before_the_first_slab < len(shapes), "the first slab should come before the last tiles"

    depths = [slab.shape[1] for _, slab in slabs]
    assert [start for start, _ in slabs] == [sum(depths[:index]) for index in range(len(slabs))]
    assert sum(depths) == SHAPE[1] and max(depths) < SHAPE[1]
    assert all(
        slab.shape == (2, depth, *SHAPE[2:]) and slab.dtype == torch.float32 for (_, slab), depth in zip(slabs, depths)
    )
    normalized = torch.from_numpy((raw.astype(np.float32) - mean) / std)
    expected = predict_probabilities(model, normalized, tile_size, batch_size=2)
    torch.testing.assert_close(torch.cat([slab for _, slab in slabs], 1), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_volume_statistics_are_numpys(tmp_path, dtype):
    values = np.random.default_rng(1).normal(30000, 50, size=(2, 10, 7, 9)).astype(dtype)
    np.memmap(tmp_path / "stack.raw", dtype=dtype, mode="w+", shape=values.shape)[:] = values
    stack = np.memmap(tmp_path / "stack.raw", dtype=dtype, mode="r", shape=values.shape)
    mean, std = volume_statistics(stack, chunk=3)
    assert isinstance(mean, float) and isinstance(std, float)
    exact = values.astype(np.float64)
    np.testing.assert_allclose([mean, std], [exact.mean(), exact.std()], rtol=1e-6)


# --- errors ------------------------------------------------------------------------------


def test_an_image_to_a_3d_model_is_a_clear_error():
    with pytest.raises(ValueError, match=r"image must be a \(C, D, H, W\) tensor .* 3D model \(unet.dims: 3\)"):
        predict_probabilities(unet3d(), torch.randn(1, 20, 24))
    with pytest.raises(ValueError, match=r"image must be a \(C, D, H, W\) array"):
        next(predict_slabs(unet3d(), np.zeros((1, 20, 24), np.float32)))


def test_a_volume_to_a_2d_model_is_a_clear_error():
    with pytest.raises(ValueError, match=r"image must be a \(C, H, W\) tensor .* 2D model \(unet.dims: 2\)"):
        predict_probabilities(UNet(1, 2, (4, 8)), torch.randn(SHAPE))


def test_a_tile_size_per_axis_must_name_every_axis():
    with pytest.raises(ValueError, match="tile_size must be one int or 3, one per spatial axis"):
        predict_probabilities(unet3d(), torch.randn(SHAPE), tile_size=(44, 44))
