"""Data: synthetic EM images, the paper's weight maps, overlap-tiles for training, whole images for validation.

The synthetic generator imitates ISBI 2012 electron-microscopy slices
(neuronal membranes) so that the training pipeline can be exercised without
the real data set. The weight map is eq. 2 of Ronneberger et al., "U-Net:
Convolutional Networks for Biomedical Image Segmentation" (MICCAI 2015).
Everything is computed once per image (weight maps included); training tiles
are then cut from the cached arrays.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure, morphology
from torch.utils.data import Dataset, Sampler

from config import UserError
from model import output_size, valid_input_sizes

# ---------------------------------------------------------------------------
# Synthetic EM images
# ---------------------------------------------------------------------------


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


def _dark_blobs(
    clearance: np.ndarray, cell_diameter: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
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
    size: int, rng: np.random.Generator, cell_diameter: float = 24.0
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

    Returns
    -------
    image : ndarray of float32, shape (size, size)
        Gray values in [0, 1]; membranes are dark.
    label : ndarray of uint8, shape (size, size)
        1 = cell interior, 0 = membrane (ISBI 2012 polarity, where the real
        labels store 255 for interior).
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


# ---------------------------------------------------------------------------
# U-Net weight map
# ---------------------------------------------------------------------------

# Relative size of the border term below which it is treated as zero.
_BORDER_TERM_TOLERANCE = 1e-6


def weight_map(
    label: np.ndarray,
    instances: np.ndarray,
    w_0: float = 10.0,
    sigma: float = 5.0,
    class_weights: np.ndarray | None = None,
) -> np.ndarray:
    """Pixel-wise loss weights of the U-Net paper (Ronneberger et al., eq. 2).

    ``w(x) = w_c(x) + w_0 * exp(-(d1(x) + d2(x))**2 / (2 * sigma**2))``, where
    d1 and d2 are the Euclidean distances (px) from x to the nearest and the
    second-nearest instance. The border term is added only to background
    (membrane) pixels, ``label == 0``, as in the paper, where it emphasises
    the thin gaps separating touching cells.

    Parameters
    ----------
    label : ndarray of int, shape (H, W)
        Class of each pixel, 0 = background / membrane.
    instances : ndarray of int, shape (H, W)
        Instance id of each pixel, 0 = no instance, ids > 0 are instances.
        Ids need not be consecutive.
    w_0 : float, optional
        Amplitude of the border term. 0 skips the distance computation.
    sigma : float, optional
        Width of the border term in pixels.
    class_weights : ndarray of float, shape (num_classes,), optional
        ``w_c`` indexed by class, e.g. from :func:`class_balance_weights`;
        all ones when None.

    Returns
    -------
    ndarray of float32, shape (H, W)
        The weight of every pixel. With fewer than two instances the border
        term is 0.

    Notes
    -----
    For speed each instance's distance transform is computed only inside its
    bounding box grown by ``R = sigma * sqrt(2 * ln(1e6))`` (about 5.3
    sigma); farther pixels treat that instance as infinitely far. This only
    changes the two smallest distances of a pixel whose true d2 exceeds R,
    and there both the exact and the computed border term lie in
    ``[0, w_0 * 1e-6)``, so the result differs from the exact map by less
    than ``1e-6 * w_0``.
    """
    label = np.asarray(label)
    instances = np.asarray(instances)
    if label.shape != instances.shape:
        raise ValueError(f"label {label.shape} and instances {instances.shape} differ in shape")
    if class_weights is None:
        weights = np.ones(label.shape, dtype=np.float64)
    else:
        weights = np.asarray(class_weights, dtype=np.float64)[label]

    # find_objects gives one slot per id up to the maximum, None for unused ids.
    boxes = ndimage.find_objects(np.where(instances > 0, instances, 0))
    present = [(index + 1, box) for index, box in enumerate(boxes) if box is not None]
    if w_0 == 0 or len(present) < 2:
        return weights.astype(np.float32)

    radius = math.ceil(sigma * math.sqrt(-2.0 * math.log(_BORDER_TERM_TOLERANCE)))
    height, width = instances.shape
    # Running two smallest distances per pixel: keeps memory at two images
    # instead of stacking one distance image per instance.
    nearest = np.full(instances.shape, np.inf)
    second = np.full(instances.shape, np.inf)
    for instance_id, (row_slice, col_slice) in present:
        window = (
            slice(max(row_slice.start - radius, 0), min(row_slice.stop + radius, height)),
            slice(max(col_slice.start - radius, 0), min(col_slice.stop + radius, width)),
        )
        # The window contains the whole instance, so distances inside it are exact.
        distance = ndimage.distance_transform_edt(instances[window] != instance_id)
        nearest_window = nearest[window]
        second[window] = np.minimum(second[window], np.maximum(nearest_window, distance))
        nearest[window] = np.minimum(nearest_window, distance)

    border = w_0 * np.exp(-((nearest + second) ** 2) / (2.0 * sigma**2))
    weights += np.where(label == 0, border, 0.0)
    return weights.astype(np.float32)


def class_balance_weights(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Class weights ``w_c`` that balance class frequencies.

    ``w_c`` is proportional to ``1 / freq_c``, the inverse frequency of class c
    over all pixels of all given label images, normalised so that the mean
    weight over those pixels is 1: ``sum_c freq_c * w_c == 1``. A class that
    never occurs gets weight 1.0 and is left out of the normalisation (its
    inverse frequency would be infinite).

    Parameters
    ----------
    labels : sequence of ndarray of int
        Label images of any shapes with values in ``[0, num_classes)``.
    num_classes : int
        Number of classes.

    Returns
    -------
    ndarray of float32, shape (num_classes,)
        The weight of each class.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    for image in labels:
        image = np.asarray(image)
        if image.size and (image.min() < 0 or image.max() >= num_classes):
            raise ValueError(f"label values must lie in [0, {num_classes})")
        counts += np.bincount(image.ravel(), minlength=num_classes)
    weights = np.ones(num_classes, dtype=np.float64)
    seen = counts > 0
    frequency = counts[seen] / counts.sum()
    # With w_c = a / freq_c, sum_c freq_c * w_c = a * (number of seen classes).
    weights[seen] = 1.0 / (seen.sum() * frequency)
    return weights.astype(np.float32)


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def save_weight_map_figure(
    path: str | os.PathLike,
    image: np.ndarray,
    label: np.ndarray,
    weight: np.ndarray,
    title: str = "",
) -> None:
    """Save a PNG with the image, its label and its weight map side by side.

    Parameters
    ----------
    path : str or os.PathLike
        Output PNG file.
    image : ndarray of float, shape (H, W)
        Gray-value image, shown in gray.
    label : ndarray of int, shape (H, W)
        Class label image.
    weight : ndarray of float, shape (H, W)
        Weight map, e.g. from :func:`weight_map`, shown with a colorbar.
    title : str, optional
        Figure title.
    """
    # matplotlib is imported here so that importing this module stays fast;
    # a bare Figure renders with Agg and is never registered with pyplot, so
    # it neither needs a GUI backend nor has to be closed.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 4.2), layout="constrained")
    image_axes, label_axes, weight_axes = figure.subplots(1, 3)
    image_axes.imshow(image, cmap="gray", interpolation="nearest")
    image_axes.set_title("image")
    label_axes.imshow(label, cmap="gray", interpolation="nearest")
    label_axes.set_title("label")
    weight_plot = weight_axes.imshow(weight, cmap="viridis", interpolation="nearest")
    weight_axes.set_title("weight map")
    figure.colorbar(weight_plot, ax=weight_axes, shrink=0.8)
    for axes in (image_axes, label_axes, weight_axes):
        axes.set_axis_off()
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


# ---------------------------------------------------------------------------------------------------
# From arrays to network inputs: normalisation, mirror padding, random training tiles, whole images
# ---------------------------------------------------------------------------------------------------


def normalize_image(image: np.ndarray, channels: int) -> np.ndarray:
    """The one preprocessing step shared by training and inference.

    Parameters
    ----------
    image : (H, W), (H, W, C) or (C, H, W) array of any numeric dtype (uint8 0..255, float ...).
        A trailing axis of size 1, 3 or 4 is read as channels-last.
    channels : 1 (grayscale) or 3 (RGB): what the network expects. RGB is averaged to gray and gray is
        repeated to RGB; an alpha channel is dropped.

    Returns
    -------
    (channels, H, W) float32 array with zero mean and unit standard deviation per image, so that
    images of different brightness and bit depth reach the network on one scale.
    """
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
        array = np.moveaxis(array, -1, 0)
    elif array.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {array.shape}")
    if array.shape[0] == 4:
        array = array[:3]
    if array.shape[0] != channels:
        array = array.mean(axis=0, keepdims=True) if channels == 1 else np.repeat(array.mean(axis=0, keepdims=True), channels, axis=0)
    std = array.std()
    return ((array - array.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def mirror_pad(array: np.ndarray, before: int, after_height: int, after_width: int) -> np.ndarray:
    """Mirror the last two axes outwards: ``before`` pixels on top and left, the given amounts after.

    The overlap-tile strategy of the paper: context missing at the image border is filled by mirroring.
    NumPy's ``reflect`` mode keeps mirroring for pads larger than the image.
    """
    pad = [(0, 0)] * (array.ndim - 2) + [(before, after_height), (before, after_width)]
    return np.pad(array, pad, mode="reflect") if any(p for pair in pad for p in pair) else array


def network_margin(depth: int, padding: int) -> int:
    """Pixels the network's output loses on each side of its input: 0 with padding 1, 92 for the paper's network."""
    smallest = valid_input_sizes(1, depth, padding)[1]
    return (smallest - output_size(smallest, depth, padding)) // 2


def pad_for_model(image: np.ndarray, depth: int, padding: int) -> np.ndarray:
    """Mirror-pad a whole ``(C, H, W)`` image to a valid network input whose output covers it.

    The output's pixel (i, j) then lies over the image's pixel (i, j): crop the output to
    ``[..., :H, :W]``. With padding 0 the image gets the network's context margin on every side.
    """
    height, width = image.shape[-2:]
    margin = network_margin(depth, padding)
    sizes = [valid_input_sizes(side + 2 * margin, depth, padding)[1] for side in (height, width)]
    return mirror_pad(image, margin, sizes[0] - height - margin, sizes[1] - width - margin)


class TileDataset(Dataset):
    """Random training tiles with their labels and weight maps (overlap-tile, paper Fig. 2).

    Item ``i`` is a tile of image ``i // samples_per_image`` at a random position. Each item's randomness
    comes from ``(seed, epoch, i)`` alone, so an epoch is the same with any number of loader workers and
    after a resume; call ``set_epoch`` before each epoch.

    Parameters
    ----------
    images : list of (C, H, W) float32 arrays (see ``normalize_image``).
    labels : list of (H, W) int arrays of class indices.
    weights : list of (H, W) float32 weight maps.
    tile_size : network input side in px; ``output_size`` : network output side in px for that input.
        For padding 0 the input tile reaches ``margin`` px beyond the labelled output tile on every
        side, mirrored where it leaves the image.
    samples_per_image : tiles per image per epoch. flip, rotate90 : random flips and 90-degree turns,
        applied to image, label and weight alike.

    Each item is ``(image (C, tile, tile) float32, label (out, out) int64, weight (out, out) float32)``.
    """

    def __init__(self, images, labels, weights, tile_size: int, output_size: int, samples_per_image: int, flip: bool, rotate90: bool, seed: int):
        margin = (tile_size - output_size) // 2
        self.tile_size, self.output_size, self.samples_per_image = tile_size, output_size, samples_per_image
        self.flip, self.rotate90, self.seed, self.epoch = flip, rotate90, seed, 0
        self.images, self.labels, self.weights = [], [], []
        for image, label, weight in zip(images, labels, weights):
            # images smaller than the output tile are mirrored up to its size, labels and weights alike
            extra_h = max(0, output_size - image.shape[-2])
            extra_w = max(0, output_size - image.shape[-1])
            self.images.append(mirror_pad(image, margin, margin + extra_h, margin + extra_w))
            self.labels.append(mirror_pad(label.astype(np.int64), 0, extra_h, extra_w))
            self.weights.append(mirror_pad(weight.astype(np.float32), 0, extra_h, extra_w))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) * self.samples_per_image

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image_index = index // self.samples_per_image
        label, weight = self.labels[image_index], self.weights[image_index]
        top = rng.integers(0, label.shape[0] - self.output_size + 1)
        left = rng.integers(0, label.shape[1] - self.output_size + 1)
        out = self.output_size
        tiles = [
            self.images[image_index][:, top : top + self.tile_size, left : left + self.tile_size],
            label[top : top + out, left : left + out],
            weight[top : top + out, left : left + out],
        ]
        # the output tile sits at the centre of the input tile, so turning and flipping both about
        # their centres keeps them aligned
        if self.rotate90:
            turns = int(rng.integers(4))
            tiles = [np.rot90(tile, turns, axes=(-2, -1)) for tile in tiles]
        if self.flip:
            for axis in (-1, -2):
                if rng.random() < 0.5:
                    tiles = [np.flip(tile, axis) for tile in tiles]
        image, label, weight = (torch.from_numpy(np.ascontiguousarray(tile)) for tile in tiles)
        return image, label, weight


class WholeImageDataset(Dataset):
    """Whole images for validation: ``(padded image (C, H', W'), label (H, W) int64, weight (H, W))``.

    The image is mirror-padded by ``pad_for_model``; crop the network's output to the label's size.
    """

    def __init__(self, images, labels, weights, depth: int, padding: int):
        self.images = [pad_for_model(image, depth, padding) for image in images]
        self.labels = [torch.from_numpy(label.astype(np.int64)) for label in labels]
        self.weights = [torch.from_numpy(weight.astype(np.float32)) for weight in weights]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return torch.from_numpy(self.images[index]), self.labels[index], self.weights[index]


class EpochSampler(Sampler):
    """A shuffled order of ``size`` items, fixed by ``(seed, epoch)``, optionally skipping the first ones.

    Skipping lets a run interrupted mid-epoch continue with exactly the batches it had not seen.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch, self.start = size, seed, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator)[self.start :].tolist())

    def __len__(self) -> int:
        return self.size - self.start


# ---------------------------------------------------------------------------------------------------
# Data sets named in the config
# ---------------------------------------------------------------------------------------------------


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / validation split of ``count`` items; at least one of each."""
    if count < 2:
        raise UserError(f"need at least 2 images to hold one out for validation, found {count}")
    val_count = min(count - 1, max(1, round(count * val_fraction)))
    order = np.random.default_rng(seed).permutation(count).tolist()
    return sorted(order[val_count:]), sorted(order[:val_count])


def load_images(config: dict, note: Callable[[str], None]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(image, label, instances)`` triples of the configured data set, images not yet normalised."""
    train = config["train"]
    name = train["dataset_name"]
    if name == "synthetic":
        return synthetic_em_set(train["synthetic_images"], train["synthetic_size"], train["seed"])
    raise UserError(f"train.dataset_name: {name!r} cannot be read yet; use synthetic")


def build_datasets(config: dict, note: Callable[[str], None] = print) -> dict:
    """Everything training needs from the data, computed once: tiles, whole validation images, weights.

    Returns a dict with ``train`` (TileDataset), ``val`` (WholeImageDataset), ``class_weights``
    ((K,) float32 array or None) and ``example`` (image, label, weight of the first training image,
    for the weight-map figure).
    """
    unet, train, augment = config["unet"], config["train"], config["augment"]
    depth = len(unet["input_channels"])
    try:
        out_size = output_size(train["tile_size"], depth, unet["padding"])
    except ValueError as error:
        raise UserError(f"train.tile_size: {error}") from None
    samples = load_images(config, note)
    num_classes = unet["num_classes"]
    for index, (_, label, _) in enumerate(samples):
        if label.max() >= num_classes:
            raise UserError(f"image {index}: mask value {int(label.max())} is not a class of unet.num_classes={num_classes}")
    train_index, val_index = split_indices(len(samples), train["val_fraction"], train["seed"])
    if train["class_weights"] == "balanced":
        class_weights = class_balance_weights([samples[i][1] for i in train_index], num_classes)
    elif train["class_weights"] == "none":
        class_weights = None
    else:
        class_weights = np.asarray(train["class_weights"], dtype=np.float32)
    images = [normalize_image(image, unet["image_channels"]) for image, _, _ in samples]
    labels = [label for _, label, _ in samples]
    weights = [weight_map(label, instances, train["w_0"], train["sigma"], class_weights) for _, label, instances in samples]

    def pick(items, indices):
        return [items[i] for i in indices]

    train_set = TileDataset(
        pick(images, train_index), pick(labels, train_index), pick(weights, train_index),
        train["tile_size"], out_size, train["samples_per_image"], augment["flip"], augment["rotate90"], train["seed"],
    )
    val_set = WholeImageDataset(pick(images, val_index), pick(labels, val_index), pick(weights, val_index), depth, unet["padding"])
    first = train_index[0]
    return {"train": train_set, "val": val_set, "class_weights": class_weights, "example": (samples[first][0], labels[first], weights[first])}
