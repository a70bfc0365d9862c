"""The synthetic generators: EM slices (deterministic, ISBI-like, not solvable by a threshold) and nuclei."""

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure

from segmentation.data.synthetic import clumped_nuclei, synthetic_em, synthetic_em_set, touching_nuclei


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


@pytest.mark.parametrize("generator, size", [(synthetic_em, 64), (clumped_nuclei, 96)])
def test_generators_are_deterministic_given_the_seed(generator, size):
    first = generator(size, np.random.default_rng(3))
    again = generator(size, np.random.default_rng(3))
    other = generator(size, np.random.default_rng(4))
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


def test_touching_nuclei_touch_and_merge_in_a_binary_mask():
    from segmentation.data.readers import separation_lines

    image, ids = touching_nuclei(128, np.random.default_rng(3), spacing=22.0)
    assert image.dtype == np.float32 and image.min() >= 0 and image.max() <= 1 and ids.dtype == np.uint16
    count = len(np.unique(ids)) - 1
    merged = measure.label(ids > 0, connectivity=1).max()
    assert count > 20 and merged < 0.8 * count  # many nuclei touch: a 0/255 mask joins them
    assert separation_lines(ids.astype(np.int32)).sum() > 50
    assert image[ids > 0].mean() > image[ids == 0].mean() + 0.3  # bright nuclei on a dark background


# ---------------------------------------------------------------- clumped_nuclei


def touching_id_set(ids: np.ndarray) -> set[int]:
    """Ids with a pixel 4-adjacent to a pixel of another nonzero id."""
    found: set[int] = set()
    for a, b in ((ids[:, 1:], ids[:, :-1]), (ids[1:, :], ids[:-1, :])):
        contact = (a != b) & (a > 0) & (b > 0)
        found |= set(a[contact].tolist()) | set(b[contact].tolist())
    return found


def inner_regions(ids: np.ndarray) -> list:
    """skimage regionprops of the objects that do not touch the image border."""
    height, width = ids.shape
    return [
        region
        for region in measure.regionprops(ids)
        if region.bbox[0] > 0 and region.bbox[1] > 0 and region.bbox[2] < height and region.bbox[3] < width
    ]


@pytest.fixture(scope="module")
def clumped_256():
    return [clumped_nuclei(256, np.random.default_rng(seed)) for seed in range(4)]


@pytest.mark.parametrize("size", [1, 37, 128, 256])
def test_clumped_nuclei_types_shapes_ranges_and_consecutive_ids(size):
    for seed in range(3):
        image, ids = clumped_nuclei(size, np.random.default_rng(seed))
        assert image.shape == ids.shape == (size, size)
        assert image.dtype == np.float32 and ids.dtype == np.uint16
        assert image.min() >= 0.0 and image.max() <= 1.0
        # 1..n without gaps, each present (0, the background, may be absent in a tiny image)
        np.testing.assert_array_equal(np.setdiff1d(np.unique(ids), [0]), np.arange(1, ids.max() + 1))


def test_clumped_nuclei_ids_are_single_4_connected_objects_that_touch(clumped_256):
    for _, ids in clumped_256:
        regions = measure.regionprops(ids)
        assert len(regions) > 40
        for region in regions:
            assert measure.label(region.image, connectivity=1).max() == 1, region.label
        # Nuclei come in clumps: a binary mask merges many of them into one component.
        assert measure.label(ids > 0, connectivity=1).max() < 0.5 * ids.max()


def test_clumped_nuclei_a_sizeable_share_touches_another_nucleus(clumped_256):
    for _, ids in clumped_256:
        share = len(touching_id_set(ids)) / ids.max()
        # Clumps and some isolated nuclei; scattered nuclei alone (no clumps) touch in 10 to 45 %.
        assert 0.6 <= share < 1.0


def test_clumped_nuclei_sizes_spread_and_small_ones_are_common(clumped_256):
    regions = [region for _, ids in clumped_256 for region in inner_regions(ids)]
    diameters = np.array([region.equivalent_diameter_area for region in regions])
    assert diameters.min() <= 6.0 and diameters.max() >= 30.0
    assert np.median(diameters) < 18.0
    # elongated nuclei (axis ratio up to 2) beside round ones
    roundness = np.array([r.axis_minor_length / r.axis_major_length for r in regions if r.area >= 50])
    assert roundness.min() < 0.6 and roundness.max() > 0.9


def test_clumped_nuclei_border_cuts_nuclei(clumped_256):
    cut_areas = []
    for _, ids in clumped_256:
        edge_ids = np.unique(np.concatenate([ids[0], ids[-1], ids[:, 0], ids[:, -1]]))
        edge_ids = edge_ids[edge_ids > 0]
        assert len(edge_ids) >= 4
        cut_areas += ndimage.sum_labels(np.ones_like(ids), ids, edge_ids).tolist()
    assert min(cut_areas) <= 20  # some nuclei are cut down to a few pixels


def test_clumped_nuclei_background_is_uneven(clumped_256):
    ranges = []
    for image, ids in clumped_256 + [clumped_nuclei(256, np.random.default_rng(4))]:
        # Far from any nucleus, so that the halo of blurred nuclei does not count as background.
        far = ndimage.distance_transform_edt(ids == 0) > 8
        # A quadratic surface (a tilt and a vignetting) fitted to the background by least squares.
        y, x = np.indices(image.shape) / (image.shape[0] - 1) * 2.0 - 1.0
        design = np.stack([np.ones_like(x), x, y, x * x, y * y, x * y], axis=-1)
        coefficients, *_ = np.linalg.lstsq(design[far], image[far], rcond=None)
        fitted = design @ coefficients
        # Pixel noise from differences of horizontal neighbours (robust std of white noise).
        pairs = far[:, 1:] & far[:, :-1]
        noise_std = np.median(np.abs(np.diff(image, axis=1)[pairs])) / 0.6745 / math.sqrt(2.0)
        assert 0.015 < noise_std < 0.05
        ranges.append((fitted.max() - fitted.min()) / noise_std)
    # A flat illumination (smooth autofluorescence and blurred halos only) gives about 1.8 noise std.
    assert sum(spread > 3.0 for spread in ranges) >= 4


def test_clumped_nuclei_no_sliver_is_an_object_of_its_own(clumped_256):
    # A neighbour that cuts a sliver off a nucleus sends it to the background; were it kept, it would
    # be a separate object of a few pixels away from the border (about one per image).
    for _, ids in clumped_256:
        assert min(region.area for region in inner_regions(ids)) >= 10


def edge_steepness_and_contrast(image: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """(n, 2): contrast over the local background and mean gradient on the outline / contrast, of the
    inner nuclei (area >= 150 px) with enough outline on the background to measure."""
    smooth = ndimage.gaussian_filter(image.astype(np.float64), 1.0)
    gradient = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8.0  # per px
    background = ids == 0
    rows = []
    for region in inner_regions(ids):
        if region.area < 150:
            continue
        mask = ids == region.label
        inside = ndimage.binary_erosion(mask, iterations=3)
        ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=3) & background
        outline = mask & ~ndimage.binary_erosion(mask) & ndimage.binary_dilation(background)
        if inside.sum() < 20 or ring.sum() < 30 or outline.sum() < 20:
            continue
        contrast = np.median(image[inside]) - np.median(image[ring])
        rows.append((contrast, gradient[outline].mean() / contrast))
    return np.array(rows)


def test_clumped_nuclei_vary_in_focus_and_brightness(clumped_256):
    measured = np.concatenate([edge_steepness_and_contrast(image, ids) for image, ids in clumped_256])
    contrast, steepness = measured[:, 0], measured[:, 1]
    assert contrast.min() < 0.06 and contrast.max() > 0.3  # some dim (noise std 0.02 to 0.04), some bright
    # Relative edge steepness of the clearly visible nuclei spreads (sharp and blurred nuclei) ...
    steepness = steepness[contrast > 0.12]
    assert len(steepness) >= 20
    assert np.percentile(steepness, 90) > 1.6 * np.percentile(steepness, 10)
    # ... where one blur for all nuclei (touching_nuclei, sigma 1 px) gives a narrow spread.
    control = np.concatenate(
        [edge_steepness_and_contrast(*touching_nuclei(128, np.random.default_rng(seed), 22.0)) for seed in range(2)]
    )[:, 1]
    assert np.percentile(control, 90) < 1.3 * np.percentile(control, 10)
