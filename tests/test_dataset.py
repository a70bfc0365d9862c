import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage import measure

from dataset import class_balance_weights, save_samples_figure, synthetic_em, synthetic_em_set, weight_map


def best_threshold_accuracy(image: np.ndarray, label: np.ndarray) -> float:
    """Best pixel accuracy of 'interior where image > t' over 200 thresholds."""
    thresholds = np.quantile(image, np.linspace(0.0, 1.0, 200))
    interior = label == 1
    return max(float(np.mean((image > t) == interior)) for t in thresholds)


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True if the label images a and b differ only by a renaming of ids."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    # A bijection between the ids pairs every id of a with exactly one of b.
    return pairs.shape[1] == np.unique(a).size == np.unique(b).size


@pytest.fixture(scope="module")
def em_256():
    return synthetic_em(256, np.random.default_rng(7))


# ---------------------------------------------------------------- synthetic_em


def test_synthetic_em_is_deterministic_given_the_seed():
    first = synthetic_em(64, np.random.default_rng(3))
    again = synthetic_em(64, np.random.default_rng(3))
    other = synthetic_em(64, np.random.default_rng(4))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


def test_synthetic_em_types_shapes_and_ranges(em_256):
    image, label, instances = em_256
    assert image.shape == label.shape == instances.shape == (256, 256)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and instances.dtype == np.int32
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert set(np.unique(label)) == {0, 1}
    assert image.std() > 0.05


def test_synthetic_em_instances_are_4_connected_components_of_interior(em_256):
    _, label, instances = em_256
    np.testing.assert_array_equal(instances == 0, label == 0)
    assert same_partition(instances, measure.label(label == 1, connectivity=1))
    # The comparison itself must notice two merged cells.
    merged = np.where(instances == 2, 1, instances)
    assert not same_partition(instances, merged)


def test_synthetic_em_membrane_fraction_is_isbi_like(em_256):
    _, label, _ = em_256
    assert 0.10 < np.mean(label == 0) < 0.40


@pytest.mark.parametrize("cell_diameter", [24.0, 32.0])
def test_synthetic_em_cell_count_matches_seed_density(cell_diameter):
    size = 256
    _, _, instances = synthetic_em(size, np.random.default_rng(11), cell_diameter)
    # Seeds lie on a jittered hexagonal lattice (one per sqrt(3)/2 d^2); the
    # cells cut by the border add about half a cell on each side.
    expected = (size + 0.5 * cell_diameter) ** 2 / (math.sqrt(3.0) / 2.0 * cell_diameter**2)
    assert 0.85 * expected < instances.max() < 1.25 * expected


def test_synthetic_em_is_not_solvable_by_a_threshold(em_256):
    image, label, _ = em_256
    assert image[label == 0].mean() < image[label == 1].mean() - 0.1
    accuracy = best_threshold_accuracy(image, label)
    # Better than always predicting "interior", but far from perfect.
    assert np.mean(label == 1) < accuracy < 0.95


def test_synthetic_em_has_dark_blobs_inside_cells(em_256):
    image, label, _ = em_256
    deep_inside = ndimage.distance_transform_edt(label) > 3
    smoothed = ndimage.gaussian_filter(image, 1.0)  # so that noise alone is not dark enough
    dark = smoothed[deep_inside] < np.median(image[label == 0])
    assert dark.mean() > 0.002


def test_synthetic_em_has_pixel_noise(em_256):
    image, label, _ = em_256
    deep_inside = ndimage.distance_transform_edt(label) > 3
    pairs = deep_inside[:, 1:] & deep_inside[:, :-1]
    # Robust (median absolute deviation) estimate of the std of white noise
    # from differences of horizontal neighbours inside smooth cell interiors.
    noise_std = np.median(np.abs(np.diff(image, axis=1)[pairs])) / 0.6745 / math.sqrt(2.0)
    assert 0.03 < noise_std < 0.1


def test_synthetic_em_set_images_do_not_depend_on_count():
    three = synthetic_em_set(3, 48, seed=5)
    five = synthetic_em_set(5, 48, seed=5)
    assert len(three) == 3 and len(five) == 5
    for small, large in zip(three, five):
        for a, b in zip(small, large):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(five[0][0], five[1][0])


# ------------------------------------------------------------------ weight_map


def brute_force_weight_map(label, instances, w_0, sigma, class_weights):
    """Eq. 2 from pixel-to-pixel distances, no distance transform."""
    coords = np.indices(label.shape).reshape(2, -1).T.astype(float)
    flat = instances.ravel()
    per_instance = []
    for instance_id in np.unique(flat[flat > 0]):
        members = coords[flat == instance_id]
        pairwise = np.sqrt(((coords[:, None, :] - members[None, :, :]) ** 2).sum(axis=2))
        per_instance.append(pairwise.min(axis=1))
    d1, d2 = np.sort(np.stack(per_instance), axis=0)[:2]
    border = w_0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2))
    return class_weights[label.ravel()] + np.where(label.ravel() == 0, border, 0.0)


def full_edt_weight_map(label, instances, w_0, sigma):
    """Eq. 2 with an unrestricted distance transform per instance."""
    ids = np.unique(instances[instances > 0])
    distances = np.stack([ndimage.distance_transform_edt(instances != i) for i in ids])
    d1, d2 = np.sort(distances, axis=0)[:2]
    return 1.0 + np.where(label == 0, w_0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0)


@pytest.fixture
def tiny_cells():
    instances = np.zeros((28, 32), dtype=np.int32)
    instances[2:10, 3:12] = 4  # ids need not be consecutive
    instances[2:10, 14:20] = 9
    instances[13:25, 4:9] = 2
    rows, cols = np.indices(instances.shape)
    instances[(rows - 18) ** 2 + (cols - 21) ** 2 <= 25] = 5
    label = (instances > 0).astype(np.uint8)
    return label, instances


def test_weight_map_matches_brute_force(tiny_cells):
    label, instances = tiny_cells
    class_weights = np.array([2.5, 0.75])
    expected = brute_force_weight_map(label, instances, 10.0, 3.0, class_weights)
    result = weight_map(label, instances, w_0=10.0, sigma=3.0, class_weights=class_weights)
    assert result.dtype == np.float32 and result.shape == label.shape
    np.testing.assert_allclose(result.ravel(), expected, rtol=0, atol=1e-5 * 10.0)
    # The border term must be visible between the close cells (columns 12, 13).
    assert result[5, 12] > class_weights[0] + 1.0


def test_weight_map_without_border_term_is_the_class_weights(tiny_cells):
    label, instances = tiny_cells
    class_weights = np.array([3.0, 0.5])
    np.testing.assert_array_equal(
        weight_map(label, instances, w_0=0.0, class_weights=class_weights),
        class_weights[label].astype(np.float32),
    )
    np.testing.assert_array_equal(weight_map(label, instances, w_0=0.0), np.ones(label.shape, np.float32))


def test_weight_map_single_instance_has_no_border_term():
    instances = np.zeros((20, 20), dtype=np.int32)
    instances[5:12, 6:15] = 3
    label = (instances > 0).astype(np.uint8)
    np.testing.assert_array_equal(weight_map(label, instances, w_0=10.0), np.ones((20, 20), np.float32))


def test_weight_map_bounded_radius_matches_full_computation():
    image, label, instances = synthetic_em(96, np.random.default_rng(2))
    assert instances.max() > 15
    for sigma in (2.0, 5.0):
        expected = full_edt_weight_map(label, instances, 10.0, sigma)
        result = weight_map(label, instances, w_0=10.0, sigma=sigma)
        np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5 * 10.0)


def test_weight_map_bounded_radius_is_exact_where_instances_are_far_apart():
    # Two cells 31 px apart, just beyond the cut-off radius (about 5.3 sigma)
    # for sigma = 5: the restricted computation sees only one of them from
    # many pixels; the border term there must still match the exact, tiny one.
    instances = np.zeros((20, 60), dtype=np.int32)
    instances[8:12, 5:10] = 1
    instances[8:12, 40:45] = 2
    label = (instances > 0).astype(np.uint8)
    expected = full_edt_weight_map(label, instances, 10.0, 5.0)
    result = weight_map(label, instances, w_0=10.0, sigma=5.0)
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-5 * 10.0)


# ------------------------------------------------------- class_balance_weights


def test_class_balance_weights_by_hand():
    labels = [np.array([[0, 0, 0], [1, 1, 2]]), np.array([0, 0])]
    # Pixels: class 0: 5, class 1: 2, class 2: 1, class 3: 0 (of 8).
    # w_c = 1 / (3 * freq_c) for the 3 present classes; absent class -> 1.
    expected = np.array([8 / 15, 4 / 3, 8 / 3, 1.0], dtype=np.float32)
    weights = class_balance_weights(labels, num_classes=4)
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert math.isclose(5 / 8 * weights[0] + 2 / 8 * weights[1] + 1 / 8 * weights[2], 1.0, rel_tol=1e-6)


def test_class_balance_weights_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        class_balance_weights([np.array([0, 1, 2])], num_classes=2)


# --------------------------------------------------------------------- figure


def test_samples_figure_of_one_weight_map_writes_png(tmp_path, tiny_cells):
    label, instances = tiny_cells
    image = np.random.default_rng(0).random(label.shape).astype(np.float32)
    path = tmp_path / "weights.png"
    arrays = (image[None], label.astype(np.int64), weight_map(label, instances))
    save_samples_figure(path, *(torch.from_numpy(array)[None] for array in arrays), title="tiny")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_importing_dataset_does_not_import_matplotlib():
    root = Path(__file__).resolve().parents[1]
    code = "import sys, dataset; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
