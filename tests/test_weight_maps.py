"""segmentation.data.weight_maps: the paper's weight map against brute force and full distance transforms;
class balance by hand."""

import math

import numpy as np
import pytest
from scipy import ndimage

from losses import IGNORE_LABEL
from segmentation.data.synthetic import synthetic_em
from segmentation.data.weight_maps import add_class_weights, class_balance_weights, class_counts, weight_map

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


def test_unannotated_pixels_weigh_nothing_and_are_not_counted():
    label = np.array([[0, 1, IGNORE_LABEL], [1, IGNORE_LABEL, 0]], dtype=np.uint8)
    border = np.full(label.shape, 0.5)
    weights = add_class_weights(label, border, np.array([2.0, 3.0], dtype=np.float32))
    # by hand: w_c + border where annotated, 0 where not
    assert weights.tolist() == [[2.5, 3.5, 0.0], [3.5, 0.0, 2.5]]
    assert add_class_weights(label, None).tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    assert class_counts(label, 2).tolist() == [2, 2]
