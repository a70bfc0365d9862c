"""segmentation.data.augment on volumes (B, C, D, H, W): z flips, in-plane turns and affine maps, the 3D elastic
field and its spacing, sparse labels, determinism; and 2D batches bit-identical to the code before volumes."""

import importlib.util
import subprocess

import numpy as np
import pytest
import torch
from scipy import ndimage

from losses import IGNORE_LABEL
from segmentation.data.augment import apply_parameters, augment_batch, augment_on_device, random_parameters
from tests.helpers import ROOT
from tests.test_augment import everything_on, identity_parameters, only, random_batch, settings_of

SHAPE = (2, 1, 6, 20, 24)  # few thick sections, as in serial-section EM

# The last commit whose augment.py knew 2D tiles alone: the reference of the bit-identity test.
BEFORE_VOLUMES = "d1ba53c3848a2d76aaa6f6db6639edb4015d265b"


def random_volumes(batch: int, channels: int, depth: int, height: int, width: int, seed: int = 0):
    """Smooth random volumes (unit std), labels with classes {0, 2, 5} in blobs, positive weights."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.standard_normal((batch, channels + 1, depth, height, width)), (0, 0, 1, 3, 3))
    smooth /= smooth.std(axis=(2, 3, 4), keepdims=True)
    image = torch.from_numpy(smooth[:, :channels].astype(np.float32))
    label = torch.from_numpy(np.array([0, 2, 5])[np.digitize(smooth[:, channels], [-0.4, 0.5])].astype(np.int64))
    weight = torch.from_numpy(rng.uniform(0.5, 3.0, (batch, depth, height, width)).astype(np.float32))
    return image, label, weight


def volume_parameters(batch: int, grid: int = 3) -> dict:
    """Parameters that leave every volume unchanged."""
    params = identity_parameters(batch)
    params.update(displacement=torch.zeros(batch, 3, grid, grid, grid), flip_depth=torch.zeros(batch, dtype=torch.bool))
    return params


def coordinate_volumes(batch: int, depth: int, height: int, width: int) -> torch.Tensor:
    """(B, 3, D, H, W) float32 whose channels are each voxel's z, y and x in sections and px."""
    axes = [torch.arange(size, dtype=torch.float32) for size in (depth, height, width)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None].repeat(batch, 1, 1, 1, 1)


@pytest.mark.parametrize("spacing", [None, (5.0, 1.0, 1.0)])
@pytest.mark.parametrize("sparse", [False, True])
def test_volume_shapes_and_dtypes_are_kept(spacing, sparse):
    image, label, weight = random_volumes(*SHAPE)
    out = augment_batch(image, label, weight, everything_on(), torch.Generator().manual_seed(0), sparse, spacing)
    for before, after in zip((image, label, weight), out):
        assert after.shape == before.shape and after.dtype == before.dtype
        assert torch.isfinite(after.float()).all()
    assert not torch.allclose(out[0], image, atol=1e-2)


@pytest.mark.parametrize("settings", [only(), everything_on(probability=0.0)], ids=["all off", "probability 0"])
def test_volume_passes_through_bit_exact(settings):
    image, label, weight = random_volumes(*SHAPE)
    out = augment_batch(image, label, weight, settings, torch.Generator().manual_seed(1), spacing=(5.0, 1.0, 1.0))
    for before, after in zip((image, label, weight), out):
        assert torch.equal(before, after)


def test_depth_flip_parameter_mirrors_the_sections():
    image, label, weight = random_volumes(*SHAPE)
    params = volume_parameters(2)
    params["flip_depth"] = torch.tensor([True, False])
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, only(flip=True))
    # grid_sample lands on the voxel centres to float rounding (as in 2D); nearest sampling copies labels exactly.
    torch.testing.assert_close(out_image[0], image[0].flip(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out_image[1], image[1], atol=1e-5, rtol=0)
    assert torch.equal(out_label[0], label[0].flip(0)) and torch.equal(out_label[1], label[1])
    torch.testing.assert_close(out_weight[0], weight[0].flip(0), atol=1e-5, rtol=0)


def test_random_flips_of_volumes_include_z_and_only_flips():
    image, label, weight = random_volumes(24, 1, 6, 20, 24)
    settings = only(flip=True, vertical_flip=False)
    out_image, out_label, _ = augment_batch(image, label, weight, settings, torch.Generator().manual_seed(2))
    combinations = [(), (-1,), (-3,), (-3, -1)]  # none, left-right, z, both
    seen = set()
    for index in range(len(image)):
        errors = [(out_image[index] - image[index].flip(dims)).abs().max().item() for dims in combinations]
        match = int(np.argmin(errors))
        assert errors[match] < 1e-5
        assert torch.equal(out_label[index], label[index].flip(combinations[match]))
        seen.add(match)
    assert seen == {0, 1, 2, 3}
    params = random_parameters(tuple(image.shape), only(flip=False, rotate90=True), torch.Generator().manual_seed(2))
    assert not params["flip_depth"].any()


def test_quarter_turns_of_volumes_are_rot90_in_plane():
    image, label, weight = random_volumes(4, 2, 5, 20, 20)
    params = volume_parameters(4)
    params["quarter_turns"] = torch.arange(4)
    out_image, out_label, out_weight = apply_parameters(image, label, weight, params, only(rotate90=True))
    for turns in range(4):
        torch.testing.assert_close(out_image[turns], torch.rot90(image[turns], turns, (-2, -1)), atol=1e-5, rtol=0)
        assert torch.equal(out_label[turns], torch.rot90(label[turns], turns, (-2, -1)))
        torch.testing.assert_close(out_weight[turns], torch.rot90(weight[turns], turns, (-2, -1)), atol=1e-5, rtol=0)
    random_image = augment_batch(image, label, weight, only(rotate90=True), torch.Generator().manual_seed(3))[0]
    for index in range(4):
        errors = [(random_image[index] - torch.rot90(image[index], k, (-2, -1))).abs().max() for k in range(4)]
        assert min(errors) < 1e-5


def test_rotation_and_zoom_act_in_plane_alone():
    """A z ramp is left as it is by rotation, zoom and shift (no resampling along z); an x ramp is rotated
    and zoomed alike in every section."""
    ramps = coordinate_volumes(3, 6, 24, 24)
    label = torch.zeros(3, 6, 24, 24, dtype=torch.int64)
    settings = only(rotation=180.0, scale=0.5, shift=3.0)
    out = augment_batch(ramps, label, label.float(), settings, torch.Generator().manual_seed(4))[0]
    torch.testing.assert_close(out[:, 0], ramps[:, 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[:, 1:], out[:, 1:, :1].expand_as(out[:, 1:]), atol=1e-4, rtol=0)
    assert (out[:, 2] - ramps[:, 2]).abs().mean() > 1.0


def test_elastic_field_of_volumes_equals_the_vectors_at_the_nodes():
    """On coordinate ramps trilinear sampling is exact, so output - coordinate is the displacement; at the
    central node (section 2, pixel 4, 4) it is the drawn vector, z converted to sections by the spacing."""
    ramps = coordinate_volumes(16, 5, 9, 9)
    label = torch.zeros(16, 5, 9, 9, dtype=torch.int64)
    settings = only(elastic_std=0.6)
    params = random_parameters(tuple(ramps.shape), settings, torch.Generator().manual_seed(5))
    out = apply_parameters(ramps, label, label.float(), params, settings, spacing=(2.0, 0.5, 0.5))[0]
    measured = out[:, :, 2, 4, 4] - ramps[:, :, 2, 4, 4]  # (B, 3): z, y, x
    expected = params["displacement"][:, :, 1, 1, 1] * torch.tensor([0.25, 1.0, 1.0])
    inside = (expected.abs() < 1.9).all(dim=1)  # the source stays in the volume: no mirrored ramp
    assert inside.sum() > 10
    torch.testing.assert_close(measured[inside], expected[inside], atol=1e-4, rtol=0)


def test_labels_keep_their_classes_under_elastic_and_rotation():
    image, label, weight = random_volumes(*SHAPE, seed=6)
    settings = only(elastic_std=4.0, rotation=30.0, scale=0.2)
    out_image, out_label, out_weight = augment_batch(image, label, weight, settings, torch.Generator().manual_seed(6))
    assert set(out_label.unique().tolist()) <= {0, 2, 5}
    assert (out_label != label).float().mean() > 0.05
    assert weight.min() - 1e-5 <= out_weight.min() and out_weight.max() <= weight.max() + 1e-5


def test_sparse_labels_carry_the_ignore_label_through_the_3d_warp():
    image, label, weight = random_volumes(*SHAPE, seed=7)
    unannotated = torch.zeros(label.shape, dtype=torch.bool)
    unannotated[:, 3:] = True  # three sections nobody annotated
    unannotated[:, :, :, 14:] = True
    label[unannotated] = IGNORE_LABEL
    weight = torch.where(unannotated, 0.0, 2.0)
    settings = only(elastic_std=3.0, rotation=30.0)
    params = random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(7))
    _, new_label, new_weight = apply_parameters(image, label, weight, params, settings, sparse=True)
    assert set(new_label.unique().tolist()) <= {0, 2, 5, IGNORE_LABEL} and (new_label == IGNORE_LABEL).any()
    ignored = new_label == IGNORE_LABEL
    torch.testing.assert_close(new_weight[~ignored], torch.full_like(new_weight[~ignored], 2.0))
    # As in 2D, an unannotated voxel weighs 0 unless an annotated one is within the trilinear reach, on the rim of
    # the annotations: then it has their weight, never a blend (the loss counts no unannotated voxel anyway).
    assert set(new_weight[ignored].unique().tolist()) <= {0.0, 2.0}
    assert (new_weight[ignored] == 0).float().mean() > 0.9
    _, _, blended = apply_parameters(image, label, weight, params, settings, sparse=False)
    assert blended[~ignored].min() < 1.9  # without sparse, annotated voxels next to unannotated lose weight


def test_3d_warp_of_identical_sections_is_the_2d_warp_of_each():
    """A stack of copies of a 2D tile, with the 2D parameters in-plane (no z displacement, no z flip), comes out
    as the stack of the 2D result: the in-plane geometry, the label's nearest sampling and the sparse weights of
    volumes are those of tiles."""
    image, label, weight = random_batch(2, 1, 24, 28, seed=8)
    label[:, :, 18:] = IGNORE_LABEL
    weight = torch.where(label == IGNORE_LABEL, 0.0, weight)
    settings = only(flip=True, rotate90=True, rotation=30.0, scale=0.2, shift=2.0, elastic_std=3.0)
    params = random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(8))
    tiles = apply_parameters(image, label, weight, params, settings, sparse=True)
    volume_params = dict(params, flip_depth=torch.zeros(2, dtype=torch.bool))
    in_plane = params["displacement"][:, :, None].expand(-1, -1, 3, -1, -1)
    volume_params["displacement"] = torch.cat([torch.zeros_like(in_plane[:, :1]), in_plane], dim=1)
    stacks = [
        image[:, :, None].repeat(1, 1, 4, 1, 1),
        label[:, None].repeat(1, 4, 1, 1),
        weight[:, None].repeat(1, 4, 1, 1),
    ]
    volumes = apply_parameters(*stacks, volume_params, settings, sparse=True)
    for tile, volume in zip(tiles, volumes):
        for section in range(4):
            torch.testing.assert_close(volume[..., section, :, :], tile, atol=1e-5, rtol=0)
    assert torch.equal(volumes[1], tiles[1][:, None].expand_as(volumes[1]))


def test_spacing_shrinks_the_elastic_z_displacement():
    ramps = coordinate_volumes(4, 6, 20, 24)
    label = torch.zeros(4, 6, 20, 24, dtype=torch.int64)
    settings = only(elastic_std=1.0)

    def change(spacing):
        out = augment_batch(ramps, label, label.float(), settings, torch.Generator().manual_seed(8), spacing=spacing)[0]
        return (out - ramps).abs().mean(dim=(0, 2, 3, 4))  # (3,): z, y, x

    isotropic, thick = change(None), change((5.0, 1.0, 1.0))
    assert thick[0] < isotropic[0] / 4 and thick[0] > isotropic[0] / 6
    torch.testing.assert_close(thick[1:], isotropic[1:], atol=1e-4, rtol=0)  # in-plane: the same field


def test_blur_of_volumes_is_in_plane_per_section():
    image, label, weight = random_volumes(2, 1, 4, 24, 24, seed=9)
    params = volume_parameters(2)
    params["blur_sigma"] = torch.tensor([1.0, 0.0])
    out = apply_parameters(image, label, weight, params, only(blur=1.0))[0].double().numpy()
    expected = ndimage.gaussian_filter(image[0, 0].double().numpy(), (0, 1.0, 1.0), mode="mirror", truncate=3.0)
    assert np.abs(out[0, 0] - expected).max() < 1e-4
    assert np.array_equal(out[1], image[1].numpy())


def test_volume_augmentation_is_deterministic_for_a_seed():
    image, label, weight = random_volumes(*SHAPE)
    settings = everything_on(elastic_std=3.0)

    def run(seed):
        return augment_on_device((image, label, weight), settings, seed, 3, torch.device("cpu"), spacing=(4, 1, 1))

    first, again, other = run(10), run(10), run(11)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.allclose(first[0], other[0], atol=1e-2)


def test_volumes_refuse_bicubic_and_bad_spacing_and_wrong_shapes():
    image, label, weight = random_volumes(*SHAPE)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="bicubic"):
        augment_batch(image, label, weight, everything_on(interpolation="bicubic"), generator)
    with pytest.raises(ValueError, match="spacing"):
        augment_batch(image, label, weight, everything_on(), generator, spacing=(5.0, 1.0))
    with pytest.raises(ValueError, match="B, D, H, W"):
        augment_batch(image, label[:, 0], weight[:, 0], everything_on(), generator)


def module_before_volumes():
    """segmentation/data/augment.py as of BEFORE_VOLUMES, loaded as a module of its own (skips without git)."""
    try:
        source = subprocess.run(
            ["git", "show", f"{BEFORE_VOLUMES}:segmentation/data/augment.py"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the 2D reference needs git and commit {BEFORE_VOLUMES}: {error}")
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("augment_before_volumes", loader=None))
    exec(compile(source, f"augment.py@{BEFORE_VOLUMES}", "exec"), module.__dict__)
    return module


@pytest.mark.parametrize(
    "settings, sparse",
    [
        (everything_on(), False),
        (everything_on(interpolation="bicubic", elastic_std=10.0, probability=0.5), False),
        (settings_of(), False),
        (settings_of(elastic_std=4.0, rotation=30.0, flip=True), True),
    ],
    ids=["everything on", "bicubic, probability 0.5", "defaults", "sparse"],
)
def test_2d_batches_are_bit_identical_to_the_code_before_volumes(settings, sparse):
    before = module_before_volumes()
    image, label, weight = random_batch(4, 2, 36, 44, seed=12)
    if sparse:
        label[:, :, 30:] = IGNORE_LABEL
        weight = torch.where(label == IGNORE_LABEL, 0.0, weight)
    params_now = random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(13))
    params_then = before.random_parameters(tuple(image.shape), settings, torch.Generator().manual_seed(13))
    assert params_now.keys() == params_then.keys()
    assert all(torch.equal(params_now[key], params_then[key]) for key in params_now)
    now = augment_on_device((image, label, weight), settings, 14, 5, torch.device("cpu"), sparse=sparse)
    then = before.augment_on_device((image, label, weight), settings, 14, 5, torch.device("cpu"), sparse=sparse)
    for a, b in zip(now, then):
        assert torch.equal(a, b)
