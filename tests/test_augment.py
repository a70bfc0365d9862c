"""segmentation.data.augment: geometry against torch.flip/rot90, slicing, scipy and a hand-written bicubic
reference; intensity against numpy/scipy; settings, randomness and probability."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from losses import IGNORE_LABEL
from segmentation.config import AugmentSettings, ConfigError, resolve
from segmentation.data.augment import BLUR_TRUNCATE, apply_parameters, augment_batch, random_parameters
from segmentation.runs.figures import save_samples_figure

ALL_OFF = {
    "flip": False,
    "rotate90": False,
    "rotation": 0.0,
    "scale": 0.0,
    "shift": 0.0,
    "elastic_std": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "gamma": 0.0,
    "noise": 0.0,
    "blur": 0.0,
}

EVERYTHING_ON = {
    "flip": True,
    "rotate90": True,
    "rotation": 180.0,
    "scale": 0.2,
    "shift": 5.0,
    "elastic_std": 4.0,
    "brightness": 0.2,
    "contrast": 0.2,
    "gamma": 0.3,
    "noise": 0.1,
    "blur": 1.0,
}


def settings_of(**values) -> AugmentSettings:
    """The ``augment`` section with these values, resolved and checked as the config is."""
    return resolve({"augment": values}).augment


def only(**on) -> AugmentSettings:
    """Settings with every transform off except the given ones."""
    return settings_of(**{**ALL_OFF, **on})


def everything_on(**values) -> AugmentSettings:
    """Every transform on, with these values changed."""
    return settings_of(**{**EVERYTHING_ON, **values})


def identity_parameters(batch: int, grid: int = 3) -> dict:
    """Parameters that leave every sample unchanged (all samples marked as augmented)."""
    return {
        "augmented": torch.ones(batch, dtype=torch.bool),
        "flip_horizontal": torch.zeros(batch, dtype=torch.bool),
        "flip_vertical": torch.zeros(batch, dtype=torch.bool),
        "quarter_turns": torch.zeros(batch, dtype=torch.int64),
        "angle": torch.zeros(batch),
        "zoom": torch.ones(batch),
        "shift": torch.zeros(batch, 2),
        "displacement": torch.zeros(batch, 2, grid, grid),
        "brightness": torch.zeros(batch),
        "contrast": torch.ones(batch),
        "gamma": torch.ones(batch),
        "noise_std": torch.zeros(batch),
        "blur_sigma": torch.zeros(batch),
    }


def random_batch(batch: int, channels: int, height: int, width: int, seed: int = 0, smoothness: float = 3.0):
    """Smooth random images (unit std), labels with classes {0, 2, 5} in blobs, positive weights;
    ``smoothness`` is the Gaussian sigma (px) that sets the size of structures."""
    rng = np.random.default_rng(seed)
    sigma = (0, 0, smoothness, smoothness)
    smooth = ndimage.gaussian_filter(rng.standard_normal((batch, channels + 1, height, width)), sigma)
    smooth /= smooth.std(axis=(2, 3), keepdims=True)
    image = torch.from_numpy(smooth[:, :channels].astype(np.float32))
    classes = np.digitize(smooth[:, channels], [-0.4, 0.5])  # 0, 1, 2
    label = torch.from_numpy(np.array([0, 2, 5])[classes].astype(np.int64))
    weight = torch.from_numpy(rng.uniform(0.5, 3.0, (batch, height, width)).astype(np.float32))
    return image, label, weight


def coordinate_ramps(batch: int, height: int, width: int) -> torch.Tensor:
    """(B, 2, H, W) float32 image whose channels are each pixel's column (x) and row (y) in px."""
    rows, columns = torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32)
    y, x = torch.meshgrid(rows, columns, indexing="ij")
    return torch.stack([x, y])[None].repeat(batch, 1, 1, 1)


def keys_bicubic_matrix(nodes: int, size: int, a: float = -0.75) -> np.ndarray:
    """(size, nodes) weights of Keys' cubic convolution upsampling with the end nodes on the end
    pixels (align_corners=True) and clamped node indices, as PyTorch's bicubic mode."""
    position = np.arange(size) * (nodes - 1) / (size - 1)
    base = np.floor(position).astype(int)
    weights = np.zeros((size, nodes))
    for offset in (-1, 0, 1, 2):
        d = np.abs(position - (base + offset))
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = a * (((d - 5) * d + 8) * d - 4)
        kernel = np.where(d <= 1, near, np.where(d < 2, far, 0.0))
        np.add.at(weights, (np.arange(size), np.clip(base + offset, 0, nodes - 1)), kernel)
    return weights


# ---------------------------------------------------------------------------------------------------
# Settings and pass-through
# ---------------------------------------------------------------------------------------------------


def test_settings_are_checked():
    assert settings_of() == AugmentSettings()
    with pytest.raises(ConfigError, match="rotaton"):
        settings_of(rotaton=10)
    with pytest.raises(ConfigError, match="interpolation"):
        settings_of(interpolation="nearest")
    with pytest.raises(ConfigError, match="probability"):
        settings_of(probability=1.5)


def test_random_parameters_have_the_documented_keys_and_shapes():
    params = random_parameters((4, 3, 20, 30), settings_of(noise=0.1, elastic_grid=5), torch.Generator().manual_seed(0))
    reference = identity_parameters(4, grid=5)
    assert set(params) == set(reference) | {"noise"}
    for key, value in reference.items():
        assert params[key].shape == value.shape and params[key].dtype == value.dtype, key
    assert params["noise"].shape == (4, 3, 20, 30)


@pytest.mark.parametrize(
    "settings, shape",
    [(only(), (3, 2, 32, 40)), (everything_on(probability=0.0), (4, 1, 48, 48))],
    ids=["all transforms off", "probability 0"],
)
def test_batch_passes_through_bit_exact(settings, shape):
    image, label, weight = random_batch(*shape)
    out = augment_batch(image, label, weight, settings, torch.Generator().manual_seed(1))
    for before, after in zip((image, label, weight), out):
        assert torch.equal(before, after)


def test_samples_not_augmented_are_bit_exact_and_the_others_change():
    image, label, weight = random_batch(4, 1, 48, 48)
    settings = everything_on(probability=0.5)
    params = random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(3))
    params["augmented"] = torch.tensor([True, False, True, False])
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, settings)
    for index in (1, 3):
        assert torch.equal(out_image[index], image[index]) and torch.equal(out_label[index], label[index])
        assert torch.equal(out_weight[index], weight[index])
    for index in (0, 2):
        assert not torch.allclose(out_image[index], image[index], atol=1e-2)


def test_probability_selects_about_that_fraction_of_samples():
    image, label, weight = random_batch(200, 1, 8, 8)
    settings = everything_on(probability=0.3)
    out_image = augment_batch(image, label, weight, settings, torch.Generator().manual_seed(4))[0]
    unchanged = (out_image == image).flatten(1).all(dim=1).float().mean().item()
    assert abs(unchanged - 0.7) < 0.1


# ---------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------


def test_flips_are_exact_and_all_four_combinations_occur():
    image, label, weight = random_batch(32, 2, 40, 56)
    generator = torch.Generator().manual_seed(5)
    out_image, out_label, out_weight = augment_batch(image, label, weight, only(flip=True), generator)
    combinations = [(), (-1,), (-2,), (-2, -1)]
    seen = set()
    for index in range(len(image)):
        errors = [(out_image[index] - image[index].flip(dims)).abs().max().item() for dims in combinations]
        match = int(np.argmin(errors))
        dims = combinations[match]
        assert errors[match] < 1e-5
        assert torch.equal(out_label[index], label[index].flip(dims))
        assert torch.allclose(out_weight[index], weight[index].flip(dims), atol=1e-5)
        seen.add(match)
    assert seen == {0, 1, 2, 3}


def test_without_vertical_flips_only_left_right_flips_occur():
    image, label, weight = random_batch(32, 1, 40, 56)
    settings = only(flip=True, vertical_flip=False)
    out_image, _, _ = augment_batch(image, label, weight, settings, torch.Generator().manual_seed(5))
    flipped = [not torch.allclose(out_image[i], image[i], atol=1e-5) for i in range(len(image))]
    for index in range(len(image)):
        expected = image[index].flip(-1) if flipped[index] else image[index]
        assert torch.allclose(out_image[index], expected, atol=1e-5)
    assert 4 < sum(flipped) < 28


def test_flip_parameters_mean_left_right_and_top_bottom():
    image, label, weight = random_batch(2, 1, 24, 30)
    params = identity_parameters(2)
    params["flip_horizontal"] = torch.tensor([True, False])
    params["flip_vertical"] = torch.tensor([False, True])
    out_image, out_label, _ = apply_parameters(image, label, weight, params, only(flip=True))
    assert torch.allclose(out_image[0], image[0].flip(-1), atol=1e-5)
    assert torch.allclose(out_image[1], image[1].flip(-2), atol=1e-5)
    assert torch.equal(out_label[0], label[0].flip(-1))


def test_quarter_turns_equal_rot90_counter_clockwise():
    image, label, weight = random_batch(4, 3, 36, 36)
    params = identity_parameters(4)
    params["quarter_turns"] = torch.arange(4)
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, only(rotate90=True))
    for turns in range(4):
        assert torch.allclose(out_image[turns], torch.rot90(image[turns], turns, dims=(-2, -1)), atol=1e-5)
        assert torch.equal(out_label[turns], torch.rot90(label[turns], turns, dims=(-2, -1)))
        assert torch.allclose(out_weight[turns], torch.rot90(weight[turns], turns, dims=(-2, -1)), atol=1e-5)


def test_random_quarter_turns_are_rot90():
    image, label, weight = random_batch(16, 1, 32, 32)
    out_image = augment_batch(image, label, weight, only(rotate90=True), torch.Generator().manual_seed(6))[0]
    seen = set()
    for index in range(len(image)):
        errors = [(out_image[index] - torch.rot90(image[index], k, dims=(-2, -1))).abs().max().item() for k in range(4)]
        assert min(errors) < 1e-5
        seen.add(int(np.argmin(errors)))
    assert seen == {0, 1, 2, 3}


def test_rotation_angle_of_90_degrees_equals_rot90():
    image, label, weight = random_batch(3, 1, 64, 64)
    params = identity_parameters(3)
    params["angle"] = torch.tensor([90.0, -90.0, 180.0])
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, only(rotation=180.0))
    for index, turns in enumerate((1, -1, 2)):
        expected = torch.rot90(image[index], turns, dims=(-2, -1))
        assert (out_image[index] - expected).abs().max() < 1e-4
        assert torch.equal(out_label[index], torch.rot90(label[index], turns, dims=(-2, -1)))
        assert (out_weight[index] - torch.rot90(weight[index], turns, dims=(-2, -1))).abs().max() < 1e-4


def test_integer_shift_moves_content_by_that_many_pixels():
    image, label, weight = random_batch(1, 2, 40, 50)
    params = identity_parameters(1)
    params["shift"] = torch.tensor([[3.0, -5.0]])  # 3 px down, 5 px left
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, only(shift=10.0))
    assert (out_image[..., 3:, :-5] - image[..., :-3, 5:]).abs().max() < 1e-5
    assert torch.equal(out_label[..., 3:, :-5], label[..., :-3, 5:])
    assert (out_weight[..., 3:, :-5] - weight[..., :-3, 5:]).abs().max() < 1e-5


def test_fractional_shift_weight_bilinear_label_nearest():
    height, width = 16, 20
    ramps = coordinate_ramps(2, height, width)
    label = ramps[:, 0].long()  # class = column index
    weight = ramps[:, 0].clone()
    params = identity_parameters(2)
    params["shift"] = torch.tensor([[0.0, 0.25], [0.0, 0.75]])  # content moves right
    _, out_label, out_weight = apply_parameters(ramps[:, :1], label, weight, params, only(shift=1.0))
    interior = slice(2, width - 2)
    # The weight at column x is the linear interpolation at x - shift: exactly x - shift on a ramp.
    assert torch.allclose(out_weight[0, :, interior], weight[0, :, interior] - 0.25, atol=1e-5)
    assert torch.allclose(out_weight[1, :, interior], weight[1, :, interior] - 0.75, atol=1e-5)
    # The label is copied from the nearest source pixel: x for x - 0.25, x - 1 for x - 0.75.
    assert torch.equal(out_label[0, :, interior], label[0, :, interior])
    assert torch.equal(out_label[1, :, interior], label[1, :, interior] - 1)


def test_affine_transform_matches_scipy():
    """Flip, quarter turn, rotation, zoom and shift together, against scipy.ndimage.affine_transform
    with the matrix built from the documented convention (non-square tile, mirrored borders)."""
    image, label, weight = random_batch(1, 1, 60, 76, seed=3)
    angle, turns, zoom, shift = 30.0, 1, 1.25, np.array([2.5, -4.0])
    params = identity_parameters(1)
    params.update(
        flip_horizontal=torch.tensor([True]),
        quarter_turns=torch.tensor([turns]),
        angle=torch.tensor([angle]),
        zoom=torch.tensor([zoom]),
        shift=torch.tensor(shift[None], dtype=torch.float32),
    )
    settings = only(flip=True, rotate90=True, rotation=45.0, scale=0.3, shift=5.0)
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, settings)

    # Forward map of the content in (x, y), y down: flip x, rotate counter-clockwise as displayed,
    # zoom; scipy wants the inverse in (row, col): input = M @ output + offset.
    phi = math.radians(angle + 90 * turns)
    rotate = np.array([[math.cos(phi), math.sin(phi)], [-math.sin(phi), math.cos(phi)]])
    forward_xy = zoom * rotate @ np.diag([-1.0, 1.0])
    swap = np.array([[0.0, 1.0], [1.0, 0.0]])
    inverse_rc = swap @ np.linalg.inv(forward_xy) @ swap
    centre = (np.array(image.shape[-2:]) - 1) / 2.0
    offset = centre - inverse_rc @ (shift + centre)
    expected = ndimage.affine_transform(image[0, 0].double().numpy(), inverse_rc, offset, order=1, mode="reflect")
    expected_weight = ndimage.affine_transform(weight[0].double().numpy(), inverse_rc, offset, order=1, mode="reflect")
    expected_label = ndimage.affine_transform(label[0].numpy(), inverse_rc, offset, order=0, mode="reflect")
    assert np.abs(out_image[0, 0].numpy() - expected).max() < 1e-4
    assert np.abs(out_weight[0].numpy() - expected_weight).max() < 1e-4
    # Nearest neighbour may break ties between two pixels differently.
    assert np.mean(out_label[0].numpy() == expected_label) > 0.99


def test_elastic_field_equals_sampled_vectors_at_nodes_and_is_bicubic():
    size, nodes, std = 65, 5, 3.0  # nodes fall on pixels 0, 16, 32, 48, 64
    ramps = coordinate_ramps(3, size, size)
    label = torch.zeros(3, size, size, dtype=torch.int64)
    settings = only(elastic_std=std, elastic_grid=nodes)
    params = random_parameters(tuple(ramps.shape), settings, torch.Generator().manual_seed(7))
    out = apply_parameters(ramps, label, label.float(), params, settings)[0].numpy()
    displacement = params["displacement"].numpy()  # (B, 2, g, g), (down, right)
    assert 2.0 < displacement.std() < 4.0

    # On a linear ramp bilinear sampling is exact, so output - coordinate is the displacement.
    field_x = out[:, 0] - ramps[:, 0].numpy()
    field_y = out[:, 1] - ramps[:, 1].numpy()
    inner = np.arange(1, nodes - 1)
    pixels = inner * (size - 1) // (nodes - 1)
    assert np.abs(field_x[:, pixels][:, :, pixels] - displacement[:, 1][:, inner][:, :, inner]).max() < 1e-4
    assert np.abs(field_y[:, pixels][:, :, pixels] - displacement[:, 0][:, inner][:, :, inner]).max() < 1e-4

    # Between nodes: Keys bicubic interpolation, wherever the source point stays inside the tile.
    upsample = keys_bicubic_matrix(nodes, size)
    expected_x = upsample @ displacement[:, 1] @ upsample.T
    expected_y = upsample @ displacement[:, 0] @ upsample.T
    coordinate = np.arange(size, dtype=float)
    inside = (
        (coordinate + expected_x >= 0)
        & (coordinate + expected_x <= size - 1)
        & (coordinate[:, None] + expected_y >= 0)
        & (coordinate[:, None] + expected_y <= size - 1)
    )
    assert inside.mean() > 0.8
    assert np.abs(field_x - expected_x)[inside].max() < 1e-3
    assert np.abs(field_y - expected_y)[inside].max() < 1e-3
    # Smooth: neighbouring pixels move nearly alike, unlike the nodes 16 px apart.
    node_step = np.abs(np.diff(displacement, axis=-1)).max()
    pixel_step = np.abs(np.diff(expected_x[:, 4:-4, 4:-4], axis=-1)).max()
    assert pixel_step < node_step / 8


def test_labels_image_and_weight_stay_aligned_under_all_geometry():
    image, label, weight = random_batch(8, 1, 64, 64, seed=11, smoothness=6.0)
    image = label[:, None].float()  # image and weight encode the class, so misalignment shows
    weight = 0.5 * label.float() + 1.0
    for interpolation in ("bilinear", "bicubic"):
        settings = only(
            flip=True, rotate90=True, rotation=180.0, scale=0.2, shift=6.0, elastic_std=4.0, interpolation=interpolation
        )
        generator = torch.Generator().manual_seed(8)
        out_image, out_label, out_weight = augment_batch(image, label, weight, settings, generator)
        assert out_label.dtype == torch.int64
        assert set(out_label.unique().tolist()) <= {0, 2, 5}
        assert (out_label != label).flatten(1).float().mean(dim=1).min() > 0.05  # every sample moved
        # Away from class boundaries (the 5 x 5 neighbourhood has one class) interpolation is
        # unambiguous; the constant -1 outside also excludes the 2 px next to the tile edge, where
        # that neighbourhood is incomplete.
        labels = out_label.numpy()
        window = (1, 5, 5)
        lowest = ndimage.minimum_filter(labels, window, mode="constant", cval=-1)
        uniform = ndimage.maximum_filter(labels, window) == lowest
        assert uniform.mean() > 0.3  # the check below covers a good part of the batch
        assert np.array_equal(np.round(out_image[:, 0].numpy())[uniform], labels[uniform])
        assert np.abs(out_weight.numpy() - (0.5 * labels + 1.0))[uniform].max() < 1e-4


def test_non_square_colour_batch_with_everything_on():
    image, label, weight = random_batch(2, 3, 100, 140, seed=5)
    for interpolation in ("bilinear", "bicubic"):
        settings = everything_on(interpolation=interpolation, elastic_std=10.0)
        generator = torch.Generator().manual_seed(9)
        out_image, out_label, out_weight = augment_batch(image, label, weight, settings, generator)
        assert out_image.shape == image.shape and out_image.dtype == torch.float32
        assert out_label.shape == label.shape and out_label.dtype == torch.int64
        assert out_weight.shape == weight.shape and out_weight.dtype == torch.float32
        assert torch.isfinite(out_image).all() and torch.isfinite(out_weight).all()
        assert set(out_label.unique().tolist()) <= {0, 2, 5}
        # Bilinear weights stay within the input's range; mirrored borders add no new values.
        assert weight.min() - 1e-5 <= out_weight.min() and out_weight.max() <= weight.max() + 1e-5


# ---------------------------------------------------------------------------------------------------
# Intensity
# ---------------------------------------------------------------------------------------------------


def test_contrast_scales_deviation_from_the_mean():
    image, label, weight = random_batch(2, 2, 32, 32)
    params = identity_parameters(2)
    params["contrast"] = torch.tensor([0.5, 1.5])
    out = apply_parameters(image, label, weight, params, only(contrast=0.5))[0].double().numpy()
    source = image.double().numpy()
    for index, factor in enumerate((0.5, 1.5)):
        mean = source[index].mean()
        assert np.abs(out[index] - (mean + factor * (source[index] - mean))).max() < 1e-5


def test_random_contrast_factors_lie_in_range():
    image, label, weight = random_batch(32, 1, 24, 24)
    out = augment_batch(image, label, weight, only(contrast=0.3), torch.Generator().manual_seed(10))[0]
    ratio = (out.std(dim=(1, 2, 3)) / image.std(dim=(1, 2, 3))).numpy()
    assert ratio.min() >= 0.7 - 1e-5 and ratio.max() <= 1.3 + 1e-5
    assert ratio.max() - ratio.min() > 0.3  # spread over the range, not one value
    assert torch.allclose(out.mean(dim=(1, 2, 3)), image.mean(dim=(1, 2, 3)), atol=1e-5)


def test_brightness_adds_one_offset_per_sample():
    image, label, weight = random_batch(32, 2, 24, 24)
    out = augment_batch(image, label, weight, only(brightness=0.2), torch.Generator().manual_seed(11))[0]
    difference = (out - image).flatten(1)
    offset = difference[:, 0]
    assert (difference - offset[:, None]).abs().max() < 1e-5
    assert offset.abs().max() <= 0.2 + 1e-6 and offset.max() - offset.min() > 0.2


def test_gamma_on_range_normalised_image():
    image, label, weight = random_batch(2, 1, 32, 32)
    params = identity_parameters(2)
    params["gamma"] = torch.tensor([2.0, 0.5])
    out = apply_parameters(image, label, weight, params, only(gamma=1.0))[0].double().numpy()
    for index, gamma in enumerate((2.0, 0.5)):
        source = image[index].double().numpy()
        low, high = source.min(), source.max()
        expected = low + (high - low) * ((source - low) / (high - low)) ** gamma
        assert np.abs(out[index] - expected).max() < 1e-5
        assert abs(out[index].min() - low) < 1e-6 and abs(out[index].max() - high) < 1e-5


def test_random_gamma_range():
    image, label, weight = random_batch(64, 1, 16, 16)
    params = random_parameters(tuple(image.shape), only(gamma=0.5), torch.Generator().manual_seed(12))
    assert params["gamma"].min() >= 1 / 1.5 - 1e-6 and params["gamma"].max() <= 1.5 + 1e-6
    # log-uniform: as many below 1 as above
    assert abs((params["gamma"] < 1).float().mean().item() - 0.5) < 0.2


def test_noise_standard_deviation():
    image, label, weight = random_batch(2, 1, 128, 128)
    settings = only(noise=0.5)
    params = random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(13))
    params["noise_std"] = torch.tensor([0.0, 0.3])
    out = apply_parameters(image, label, weight, params, settings)[0]
    assert torch.equal(out[0], image[0])
    residual = (out[1] - image[1]).numpy()
    assert abs(residual.std() - 0.3) < 0.015 and abs(residual.mean()) < 0.015


def test_random_noise_levels_lie_in_range():
    image, label, weight = random_batch(32, 1, 64, 64)
    out = augment_batch(image, label, weight, only(noise=0.2), torch.Generator().manual_seed(14))[0]
    level = (out - image).flatten(1).std(dim=1)
    assert level.max() <= 0.2 * 1.05
    assert abs(level.mean().item() - 0.1) < 0.03  # std uniform in [0, 0.2]


def test_blur_matches_scipy_gaussian_filter_per_sample():
    image, label, weight = random_batch(3, 2, 40, 48)
    image = image + torch.randn(image.shape, generator=torch.Generator().manual_seed(0))  # fine detail
    settings = only(blur=1.5)
    params = identity_parameters(3)
    params["blur_sigma"] = torch.tensor([1.5, 0.05, 0.8])
    out = apply_parameters(image, label, weight, params, settings)[0].numpy()
    radius = math.ceil(BLUR_TRUNCATE * 1.5)  # one kernel size for the batch, from the largest sigma
    for index, sigma in ((0, 1.5), (2, 0.8)):
        for channel in range(2):
            # scipy's mode "mirror" (d c b | a b c d) is torch's "reflect" padding.
            expected = ndimage.gaussian_filter(
                image[index, channel].double().numpy(), sigma, mode="mirror", truncate=radius / sigma
            )
            assert np.abs(out[index, channel] - expected).max() < 1e-4
    assert np.array_equal(out[1], image[1].numpy())  # sigma below 0.1 px: untouched


# ---------------------------------------------------------------------------------------------------
# Randomness and figure
# ---------------------------------------------------------------------------------------------------


def test_same_seed_same_batch_other_seed_other_batch():
    image, label, weight = random_batch(4, 1, 48, 48)

    def run(seed):
        return augment_batch(image, label, weight, everything_on(), torch.Generator().manual_seed(seed))

    first, again, other = run(15), run(15), run(16)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.allclose(first[0], other[0], atol=1e-2)
    assert not torch.equal(first[1], other[1])


def test_default_settings_run(tmp_path):
    image, label, weight = random_batch(3, 1, 64, 64)
    out = augment_batch(image, label, weight, AugmentSettings(), torch.Generator().manual_seed(17))
    path = tmp_path / "augmented.png"
    save_samples_figure(path, *out, count=2, title="defaults")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000


def test_labels_annotated_in_part_keep_the_ignore_label_and_their_weights_through_warps():
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 1, 48, 48, generator=generator)
    label = torch.randint(0, 2, (2, 48, 48), generator=generator)
    unannotated = torch.zeros(2, 48, 48, dtype=torch.bool)
    unannotated[:, :, 20:] = True
    label[unannotated] = IGNORE_LABEL
    weight = torch.where(unannotated, 0.0, 2.0)  # as the cache weighs them
    settings = resolve({"augment": {"elastic_std": 4.0, "rotation": 30.0}}).augment
    params = random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(1))
    _, new_label, new_weight = apply_parameters(image, label, weight, params, settings, sparse=True)
    # nearest sampling copies labels: no pixel becomes a class it never was, the unannotated stay unannotated
    assert set(new_label.unique().tolist()) <= {0, 1, IGNORE_LABEL} and (new_label == IGNORE_LABEL).any()
    given = new_label != IGNORE_LABEL
    # an annotated pixel keeps its weight, also beside unannotated ones (bilinear from annotated neighbours)
    torch.testing.assert_close(new_weight[given], torch.full_like(new_weight[given], 2.0))
    _, _, blended = apply_parameters(image, label, weight, params, settings, sparse=False)
    assert blended[given].min() < 1.9  # without it, the edge of the annotations would be blended with 0
