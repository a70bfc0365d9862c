"""Synthetic electron-microscopy images: the default data set, needing no download.

The generator imitates ISBI 2012 slices (neuronal membranes between cells, with texture, dark
organelle-like blobs, blur and noise) so that the training pipeline can be exercised without the real
data. Each image comes with its label (1 = cell interior, 0 = membrane, ISBI's polarity) and the cells'
instance ids, which the border term of the weight map needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure, morphology

from segmentation.data.readers import MaskSettings, Sample


def _smooth_noise(size: int, correlation_length: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field, shape (size, size), float64, mean 0 and std about 1.

    White noise on a coarse grid (spacing ``correlation_length / 2`` px) is
    smoothed and upsampled with cubic splines; this is much cheaper than
    Gaussian-filtering full-resolution noise with a wide kernel.
    """
    step = max(correlation_length / 2.0, 1.0)
    coarse_size = math.ceil(size / step) + 2
    coarse = ndimage.gaussian_filter(rng.standard_normal((coarse_size, coarse_size)), 1.0)
    coarse /= coarse.std()
    return ndimage.zoom(coarse, step, order=3, mode="mirror")[:size, :size]


def _jittered_hex_seeds(size: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Cell seed points (n, 2), float64 (row, col) in px, about ``spacing`` apart.

    A hexagonal lattice with each point displaced inside a disc of radius
    0.35 * spacing keeps neighbours at least 0.3 * spacing apart (no
    degenerate cells) while looking irregular. The lattice extends one
    spacing beyond the image so that cells cut by the border are ordinary
    cells rather than stretched ones.
    """
    row_step = spacing * math.sqrt(3.0) / 2.0
    rows = np.arange(-spacing, size + spacing, row_step)
    cols = np.arange(-spacing, size + spacing, spacing)
    row_grid, col_grid = np.meshgrid(rows, cols, indexing="ij")
    # Every other lattice row is shifted by half a spacing (hexagonal packing).
    col_grid = col_grid + (np.arange(rows.size)[:, None] % 2) * spacing / 2.0
    seeds = np.stack([row_grid.ravel(), col_grid.ravel()], axis=1)
    radius = 0.35 * spacing * np.sqrt(rng.uniform(size=len(seeds)))
    angle = rng.uniform(0.0, 2.0 * np.pi, size=len(seeds))
    seeds += radius[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    return seeds


def _dark_blobs(clearance: np.ndarray, cell_diameter: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Dark blobs (mitochondria, vesicles) placed inside cells.

    Parameters
    ----------
    clearance : ndarray of float, shape (size, size)
        Distance (px) from each pixel to the nearest membrane, negative on
        membrane.
    cell_diameter : float
        Typical cell diameter (px); sets the number of blobs.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    in_blob : ndarray of bool, shape (size, size)
        True on blob pixels.
    level : ndarray of float64, shape (size, size)
        Gray value of the blob covering each pixel; meaningful only where
        ``in_blob``.
    """
    size = clearance.shape[0]
    count = round(3.0 * size * size / cell_diameter**2)
    radius = rng.uniform(1.5, 3.5, size=count)
    level = rng.uniform(0.15, 0.45, size=count)
    # Each blob is the union of two equal discs; their separation sets the
    # shape, from round vesicles (0) to elongated mitochondria (1.5 radii).
    angle = rng.uniform(0.0, np.pi, size=count)
    offset = rng.uniform(0.0, 1.5, size=count) * radius
    start = rng.uniform(0.0, size, size=(count, 2))
    end = start + offset[:, None] * np.stack([np.sin(angle), np.cos(angle)], axis=1)
    centers = np.rint(np.stack([start, end], axis=1)).astype(np.int64)  # (count, disc, axis)
    inside = np.all((centers >= 0) & (centers < size), axis=(1, 2))
    clipped = np.clip(centers, 0, size - 1)
    # Every point of a disc is within its radius of the centre, so a blob
    # whose centres both have clearance above radius + 1 keeps a 1 px margin
    # to the membrane.
    fits = inside & np.all(clearance[clipped[..., 0], clipped[..., 1]] > radius[:, None] + 1.0, axis=1)
    kept = centers[fits]
    radius_map = np.zeros((size, size))
    level_map = np.zeros((size, size))
    radius_map[kept[..., 0], kept[..., 1]] = radius[fits, None]
    level_map[kept[..., 0], kept[..., 1]] = level[fits, None]
    # With equal radii in a blob, "closer to the nearest centre than its
    # radius" draws exactly the union of the discs.
    distance, (near_row, near_col) = ndimage.distance_transform_edt(radius_map == 0, return_indices=True)
    return distance < radius_map[near_row, near_col], level_map[near_row, near_col]


def synthetic_em(
    size: int, rng: np.random.Generator, cell_diameter: float = 24.0, classes: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate one synthetic EM slice with neuronal membranes.

    Cells are the Voronoi regions of seed points on a jittered hexagonal
    lattice, computed on coordinates warped by a smooth random displacement
    field so that the membranes are curved. A pixel is membrane where it lies
    closer to the boundary between its nearest and second-nearest seed than
    half the local membrane thickness (the mean of two values drawn per cell
    from 1.5 to 4 px, modulated along the membrane by a factor 0.8 to 1.25),
    so every membrane is a closed band separating two cells. Cell interiors are
    mid-gray with per-cell brightness and low-frequency texture and contain
    small dark blobs (mitochondria / vesicles) that are labelled as interior.
    The image is finally blurred (sigma 1 px) and corrupted by Gaussian noise
    (std 0.06).

    Parameters
    ----------
    size : int
        Side length of the square image in pixels.
    rng : numpy.random.Generator
        Source of randomness; the output is a deterministic function of its
        state.
    cell_diameter : float, optional
        Typical distance between neighbouring cell centres in pixels.
    classes : int, optional
        2: membrane and cell interior; 3: the dark blobs inside cells become a
        class of their own (organelles), so a model must tell them from
        membranes of the same darkness by their shape. The image does not
        depend on it.

    Returns
    -------
    image : ndarray of float32, shape (size, size)
        Gray values in [0, 1]; membranes are dark.
    label : ndarray of uint8, shape (size, size)
        1 = cell interior, 0 = membrane (ISBI 2012 polarity, where the real
        labels store 255 for interior); with ``classes=3``, 2 = organelle.
    instances : ndarray of int32, shape (size, size)
        0 on membrane, 1..n for the cells: the 4-connected components of
        ``label == 1``, numbered as ``skimage.measure.label(label == 1,
        connectivity=1)`` numbers them.

    Notes
    -----
    With the default ``cell_diameter`` the membrane occupies about 22-24 % of
    the pixels (ISBI: ~22 %), a 256 x 256 image holds about 150 cells, and the
    best single intensity threshold classifies only about 87 % of the pixels
    correctly, because blobs are as dark as membranes, cells vary in
    brightness and thin membranes lose contrast to blur and noise.
    """
    seeds = _jittered_hex_seeds(size, cell_diameter, rng)
    num_seeds = len(seeds)

    # Curved membranes: the nearest seeds are looked up from smoothly displaced
    # pixel coordinates. A coarse component bends whole cells, a finer one
    # makes single membranes wavy; both stay well below the cell size so that
    # the warp does not fold cells over each other.
    displacement = np.stack(
        [
            0.25 * cell_diameter * _smooth_noise(size, 1.5 * cell_diameter, rng)
            + 0.08 * cell_diameter * _smooth_noise(size, 0.6 * cell_diameter, rng)
            for _axis in range(2)
        ]
    )
    warped = (np.mgrid[0:size, 0:size] + displacement).reshape(2, -1).T
    distances, nearest = cKDTree(seeds).query(warped, k=2)
    gap = (distances[:, 1] - distances[:, 0]).reshape(size, size)
    first = nearest[:, 0].reshape(size, size)
    second = nearest[:, 1].reshape(size, size)

    # Distance (px, first order) to the cell boundary, the zero set of the gap
    # d2 - d1: gap / |gradient of gap|. Measuring in image space undoes the
    # local stretching by the warp and the fanning out of the gap towards
    # junctions, so membrane bands keep their intended width everywhere. The
    # gradient is analytic (chain rule through the smooth warp) because
    # finite differences across the kink of the gap at the boundary vanish.
    # In warped space the gradient is u2 - u1, the difference of the unit
    # vectors from the two seeds.
    unit_first = (warped - seeds[nearest[:, 0]]) / np.maximum(distances[:, :1], 1e-9)
    unit_second = (warped - seeds[nearest[:, 1]]) / np.maximum(distances[:, 1:], 1e-9)
    warped_gradient = (unit_second - unit_first).T.reshape(2, size, size)
    # jacobian[i, j] = d warped_i / d x_j = delta_ij + d displacement_i / d x_j
    jacobian = np.stack(np.gradient(displacement, axis=(1, 2)), axis=1) + np.eye(2)[:, :, None, None]
    gap_gradient = np.einsum("i...,ij...->j...", warped_gradient, jacobian)
    # The floor only matters far from any boundary, where the gradient can vanish.
    edge_distance = gap / np.maximum(np.hypot(*gap_gradient), 0.5)

    # Thickness is a property of the cell pair (symmetric in the two cells),
    # modulated along the membrane. It stays above 1.2 px because a digital
    # line blocks 4-connected paths only if it is at least 1 px wide, so every
    # cell stays closed.
    cell_thickness = rng.uniform(1.5, 4.0, size=num_seeds)
    thickness = 0.5 * (cell_thickness[first] + cell_thickness[second])
    thickness *= np.clip(1.0 + 0.2 * _smooth_noise(size, cell_diameter, rng), 0.8, 1.25)
    membrane = edge_distance < 0.5 * thickness

    # Where a pointed cell corner is cut off diagonally, 4-connectivity leaves
    # specks of a few interior pixels that are no cells; they become membrane.
    interior = morphology.remove_small_objects(~membrane, max_size=8, connectivity=1)
    label = interior.astype(np.uint8)
    instances = measure.label(interior, connectivity=1).astype(np.int32)

    # Interior appearance: per-cell brightness plus low-frequency texture.
    cell_brightness = rng.uniform(0.45, 0.8, size=num_seeds)
    image = cell_brightness[first] + 0.06 * _smooth_noise(size, 0.5 * cell_diameter, rng)

    # Membrane darkness varies along the membranes, and the darkening fades out
    # over a quarter thickness beyond each side of the labelled band, as
    # stained membranes do.
    membrane_level = 0.25 + 0.07 * _smooth_noise(size, cell_diameter, rng)
    membrane_profile = np.clip((0.75 * thickness - edge_distance) / (0.25 * thickness), 0.0, 1.0)
    membrane_profile[~interior] = 1.0
    image += (membrane_level - image) * membrane_profile

    # Dark blobs lie inside cells but are as dark as membranes, so only their
    # shape tells them apart.
    in_blob, blob_level = _dark_blobs(edge_distance - 0.5 * thickness, cell_diameter, rng)
    image[in_blob] = blob_level[in_blob]
    if classes == 3:
        label[in_blob & interior] = 2

    image = ndimage.gaussian_filter(image, 1.0)
    image += rng.normal(0.0, 0.06, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), label, instances


def synthetic_em_set(
    count: int, size: int, seed: int, cell_diameter: float = 24.0
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Generate ``count`` synthetic EM slices.

    Image k is drawn from its own generator, the k-th child of
    ``np.random.SeedSequence(seed)``, so it does not depend on ``count``.

    Parameters
    ----------
    count : int
        Number of images.
    size : int
        Side length of each square image in pixels.
    seed : int
        Seed of the whole set.
    cell_diameter : float, optional
        Typical distance between neighbouring cell centres in pixels.

    Returns
    -------
    list of (image, label, instances)
        ``count`` tuples as returned by :func:`synthetic_em`.
    """
    children = np.random.SeedSequence(seed).spawn(count)
    return [synthetic_em(size, np.random.default_rng(child), cell_diameter) for child in children]


@dataclass(frozen=True)
class SyntheticSample:
    """Image ``index`` of the synthetic set of ``seed``, generated when read: the same image as
    ``synthetic_em_set(count, size, seed)[index]`` for any ``count``, with 2 or 3 ``classes``."""

    name: str
    seed: int
    index: int
    size: int
    classes: int = 2

    def identity(self) -> list:
        """What the pixels depend on (with the generator's code, which the cache hashes)."""
        return ["synthetic", self.seed, self.index, self.size, self.classes]

    def read(self, settings: MaskSettings) -> Sample:
        """Generate the image (``settings``, the mask settings of ``readers.FileSample.read``, do not apply)."""
        # the index-th child of SeedSequence(seed), as SeedSequence.spawn makes it
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.index,)))
        image, label, instances = synthetic_em(self.size, rng, classes=self.classes)
        return Sample(image, label, instances, self.name, "generated")


def touching_nuclei(size: int, rng: np.random.Generator, spacing: float = 17.0) -> tuple[np.ndarray, np.ndarray]:
    """A fluorescence-like image of nuclei that touch, with one id per nucleus.

    Ellipses (semi-axes 7 to 11 px, any orientation) sit on a jittered hexagonal lattice ``spacing``
    px apart, so that many overlap; each pixel belongs to the nucleus in whose ellipse it lies
    deepest (the smallest normalised radius), so overlapping nuclei meet along a line, as in the
    masks of the 2018 Data Science Bowl. Nuclei are bright with a dimmer rim (brightness falls by a
    third towards the rim), on a dark background, blurred (sigma 1 px) with Gaussian noise (std 0.04).

    Returns ``(image, ids)``: (size, size) float32 in [0, 1] and (size, size) uint16 object ids, 0 =
    background, 1..n in no particular order.
    """
    centres = [c for c in _jittered_hex_seeds(size, spacing, rng) if -4 <= c[0] < size + 4 and -4 <= c[1] < size + 4]
    depth = np.full((size, size), np.inf)
    ids = np.zeros((size, size), np.uint16)
    brightness = np.zeros((size, size))
    rows, cols = np.indices((size, size))
    for number, (row, col) in enumerate(centres, 1):
        a, b, angle = rng.uniform(7.0, 11.0), rng.uniform(7.0, 11.0), rng.uniform(0.0, np.pi)
        dy, dx = rows - row, cols - col
        radius = np.sqrt(
            ((dx * np.cos(angle) + dy * np.sin(angle)) / a) ** 2 + ((-dx * np.sin(angle) + dy * np.cos(angle)) / b) ** 2
        )
        deeper = (radius <= 1.0) & (radius < depth)
        depth[deeper], ids[deeper] = radius[deeper], number
        brightness[deeper] = rng.uniform(0.55, 0.85) * (1.0 - 0.35 * radius[deeper] ** 2)
    image = np.where(ids > 0, brightness, 0.12) + 0.03 * _smooth_noise(size, spacing, rng)
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0.0, 0.04, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), ids


def _ellipse_radius(points: np.ndarray, ellipse: np.ndarray) -> np.ndarray:
    """Normalised radius of ``points`` (..., 2) (row, col) px in ``ellipse`` (..., 5): 1 on its outline.

    ``ellipse`` holds (centre row, centre col, semi-axis a, semi-axis b, angle of a to the columns in
    radians); the two broadcast against each other. Returns float64 of the broadcast shape.
    """
    dy, dx = points[..., 0] - ellipse[..., 0], points[..., 1] - ellipse[..., 1]
    cos, sin = np.cos(ellipse[..., 4]), np.sin(ellipse[..., 4])
    return np.hypot((dx * cos + dy * sin) / ellipse[..., 2], (-dx * sin + dy * cos) / ellipse[..., 3])


def _drop_detached_pieces(ids: np.ndarray) -> None:
    """Set to 0, in place, every 4-connected piece of an id in ``ids`` (int) but its largest one."""
    pieces = measure.label(ids, connectivity=1)
    sizes = np.bincount(pieces.ravel())
    owner = np.zeros(sizes.size, ids.dtype)
    owner[pieces.ravel()] = ids.ravel()
    # Sorted by owner, then by size, the last piece of each owner is its largest (the background is
    # piece 0, the only one of owner 0).
    order = np.lexsort((sizes, owner))
    largest = order[np.append(owner[order][1:] != owner[order][:-1], True)]
    keep = np.zeros(sizes.size, bool)
    keep[largest] = True
    ids[~keep[pieces]] = 0


def clumped_nuclei(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A hard fluorescence-like image of clumped nuclei, with one id per nucleus.

    Harder than :func:`touching_nuclei` in five ways, all drawn from ``rng``:

    - Clumps: a Poisson number of clusters (mean: one per 5000 px^2 of canvas), each of 2 + Poisson(4)
      nuclei, every one placed next to an earlier one of its cluster so that the two overlap or touch,
      plus scattered nuclei at uniform positions (mean: one per 4500 px^2). A nucleus whose centre
      would lie deep inside another (normalised radius below 0.7) is left out. As in
      :func:`touching_nuclei`, each pixel belongs to the nucleus in whose ellipse it lies deepest (the
      smallest normalised radius), so overlapping nuclei meet along a line; a sliver of a nucleus cut
      off by another becomes background.
    - Sizes: equivalent diameters (twice the geometric mean of the semi-axes) log-uniform from 5 to
      40 px, so that small nuclei are common; any orientation, axis ratio uniform in [1, 2].
    - Focus: each nucleus's light is blurred on its own, Gaussian sigma 0.6 + 4 u^2 px (u uniform in
      [0, 1]: half of them below 1.6 px, some up to 4.6 px), and has its own brightness above the
      background, log-uniform in [0.03, 0.6] (the noise std is 0.02 to 0.04), so some are barely
      visible. ``ids`` keep the sharp outlines.
    - Background: a level of 0.08 to 0.2 plus smooth autofluorescence (std 0.02, correlation length
      48 px), all under an illumination that changes linearly by 20 to 50 % from the image centre to
      an edge (in a random direction) and falls by another 20 to 50 % towards the corners
      (vignetting); then Gaussian noise.
    - Crops: the nuclei are drawn on a canvas 24 px larger on every side, whose centre is the image,
      so the image border cuts nuclei, some down to a few pixels. A nucleus that the border cuts into
      separate pieces gives each piece its own id.

    Parameters
    ----------
    size : int
        Side length of the square image in pixels.
    rng : numpy.random.Generator
        Source of randomness; the output is a deterministic function of its state.

    Returns
    -------
    image : ndarray of float32, shape (size, size)
        Gray values in [0, 1]; nuclei are bright on a dark background.
    ids : ndarray of uint16, shape (size, size)
        0 = background, 1..n one per nucleus, consecutive, in no particular order; every id covers
        at least one pixel and is one 4-connected component.
    """
    # Wider than the major semi-axis of most nuclei (at most 20 * sqrt(2) px), so that nuclei centred
    # outside the image reach into it as they would in a crop of a larger field of view.
    margin = 24
    canvas = size + 2 * margin

    nuclei = _clustered_ellipses(canvas, rng)

    # Deepest-ellipse partition, computed in each nucleus's bounding box to keep the cost per nucleus
    # proportional to its area rather than to the canvas.
    depth = np.full((canvas, canvas), np.inf)
    ids = np.zeros((canvas, canvas), np.int64)
    for number, nucleus in enumerate(nuclei, 1):
        reach = nucleus[2]  # the major semi-axis bounds the ellipse in every direction
        top, left = np.maximum(np.floor(nucleus[:2] - reach).astype(int), 0)
        bottom, right = np.minimum(np.ceil(nucleus[:2] + reach).astype(int) + 1, canvas)
        if top >= bottom or left >= right:
            continue
        box = np.s_[top:bottom, left:right]
        normalised = _ellipse_radius(np.stack(np.mgrid[box], axis=-1), nucleus)
        deeper = (normalised <= 1.0) & (normalised < depth[box])
        depth[box][deeper] = normalised[deeper]
        ids[box][deeper] = number

    # A small nucleus pressed into a large one can cut off a sliver of it; slivers become background
    # (before the light is drawn, so the image agrees) so that every nucleus is one piece.
    _drop_detached_pieces(ids)

    # Out of focus: each nucleus's light is blurred with its own sigma, as nuclei at different depths
    # are; the ids keep the sharp outlines, which is what a segmentation should recover.
    texture = 1.0 + 0.15 * _smooth_noise(canvas, 4.0, rng)
    signal = np.zeros((canvas, canvas))
    for number, found in enumerate(ndimage.find_objects(ids), 1):
        if found is None:
            continue
        sigma = 0.6 + 4.0 * rng.uniform() ** 2
        level = float(np.exp(rng.uniform(np.log(0.03), np.log(0.6))))
        pad = int(np.ceil(3.0 * sigma))
        box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, canvas)) for s in found)
        own = ids[box] == number
        light = np.where(own, level * (1.0 - 0.35 * np.minimum(depth[box], 1.0) ** 2) * texture[box], 0.0)
        signal[box] += ndimage.gaussian_filter(light, sigma, mode="constant")

    # Illumination in coordinates that are -1 and 1 at the edges of the cropped image, so that the
    # drawn fall-off is what the image shows.
    y, x = (np.mgrid[0:canvas, 0:canvas] - (canvas - 1) / 2.0) / (size / 2.0)
    tilt, direction, vignetting = rng.uniform(0.2, 0.5), rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.2, 0.5)
    illumination = 1.0 + tilt * (x * np.cos(direction) + y * np.sin(direction)) - 0.5 * vignetting * (x**2 + y**2)
    background = rng.uniform(0.08, 0.2) + 0.02 * _smooth_noise(canvas, 48.0, rng)
    image = np.clip(illumination, 0.2, None) * (background + signal)
    image += rng.normal(0.0, rng.uniform(0.02, 0.04), size=image.shape)

    crop = np.s_[margin : margin + size, margin : margin + size]
    image, ids = image[crop], ids[crop]
    # Cutting can split a nucleus that is not convex (pressed by neighbours) in two; each piece is a
    # separate object in the image, so it gets its own id. Labelling equal-valued 4-connected regions
    # also numbers the ids 1..n without gaps.
    ids = measure.label(ids, connectivity=1).astype(np.uint16)
    return np.clip(image, 0.0, 1.0).astype(np.float32), ids


def _clustered_ellipses(canvas: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The nuclei of ``clumped_nuclei`` on a (canvas, canvas) px field: rows of (centre row, centre col,
    semi-axis a, semi-axis b, angle of a to the columns) in px and radians, drawn cluster by cluster."""
    area = canvas * canvas
    nuclei: list[np.ndarray] = []

    def shape() -> tuple[float, float, float]:
        # a * b is log-uniform, so the equivalent diameter 2 sqrt(a b) is log-uniform in [5, 40] px.
        mean, ratio = np.exp(rng.uniform(np.log(2.5), np.log(20.0))), rng.uniform(1.0, 2.0)
        return mean * np.sqrt(ratio), mean / np.sqrt(ratio), rng.uniform(0.0, np.pi)

    def fits(candidate: np.ndarray) -> bool:
        # Each centre must lie outside the other ellipse shrunk to 0.7: a nucleus placed deeper inside
        # another would leave it in pieces or hide it.
        if not nuclei:
            return True
        others = np.asarray(nuclei)
        return bool(
            np.all(_ellipse_radius(candidate[:2], others) >= 0.7)
            and np.all(_ellipse_radius(others[:, :2], candidate) >= 0.7)
        )

    for _cluster in range(rng.poisson(area / 5000.0)):
        seed = np.array([*rng.uniform(0.0, canvas, size=2), *shape()])
        if not fits(seed):
            continue
        nuclei.append(seed)
        members = [seed]
        for _member in range(1 + rng.poisson(4.0)):
            a, b, angle = shape()
            for _attempt in range(20):
                # Next to a random earlier member, 0.75 to 1 times the sum of the two ellipses' extents
                # along the line through their centres apart, so that the two overlap or touch.
                parent = members[rng.integers(len(members))]
                direction = rng.uniform(0.0, 2.0 * np.pi)
                unit = np.array([np.sin(direction), np.cos(direction)])
                candidate = np.array([0.0, 0.0, a, b, angle])
                extents = 1.0 / _ellipse_radius(parent[:2] + unit, parent) + 1.0 / _ellipse_radius(unit, candidate)
                candidate[:2] = parent[:2] + rng.uniform(0.75, 1.0) * extents * unit
                if fits(candidate):
                    members.append(candidate)
                    nuclei.append(candidate)
                    break
    for _isolated in range(rng.poisson(area / 4500.0)):
        candidate = np.array([*rng.uniform(0.0, canvas, size=2), *shape()])
        if fits(candidate):
            nuclei.append(candidate)
    return nuclei
