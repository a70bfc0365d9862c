"""Data: the data sets (synthetic EM, ISBI 2012, Penn-Fudan, a folder of images and masks), the
paper's weight maps, overlap-tiles for training, whole images for validation.

    python dataset.py download {pennfudan,isbi2012} [--to data/]   # get the public data sets

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.io
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.spatial import cKDTree
from skimage import measure, morphology
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from config import UserError, default_config, resolve
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


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """``(height, width)`` times ``scale``, rounded, at least 1 px."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(C, H, W) float image resized to ``size`` bilinearly, anti-aliased when shrinking: how training
    and prediction both rescale images for ``train.image_scale``."""
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) integer mask (classes or instance ids) resized to ``size`` by nearest neighbour."""
    resized = F.interpolate(torch.from_numpy(mask.astype(np.float64))[None, None], size=size, mode="nearest-exact")
    return resized[0, 0].numpy().astype(mask.dtype)


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

    Item ``i`` is a tile of image ``i // samples_per_image`` at a random position. The sampler passes
    ``epoch * len(dataset) + i`` as the key, and each item's randomness comes from ``(seed, epoch, i)``
    alone, so an epoch is the same with any number of (persistent) loader workers and after a resume.

    Parameters
    ----------
    images : list of (C, H, W) float32 arrays (see ``normalize_image``).
    labels : list of (H, W) int arrays of class indices.
    weights : list of (H, W) float32 weight maps.
    tile_size : network input side in px; ``output_size`` : network output side in px for that input.
        For padding 0 the input tile reaches ``margin = (tile_size - output_size) / 2`` px beyond the
        labelled output tile on every side, mirrored where it leaves the image.
    samples_per_image : tiles per image per epoch.

    Each item is ``(image (C, T, T) float32, label (T, T) int64, weight (T, T) float32)``, T =
    ``tile_size``: labels and weights cover the whole input tile (mirrored like the image), so that
    augmentation can move them with the image; the loss crops them to the output's centre.
    """

    def __init__(self, images, labels, weights, tile_size: int, output_size: int, samples_per_image: int, seed: int):
        self.margin = (tile_size - output_size) // 2
        self.tile_size, self.output_size, self.samples_per_image, self.seed = tile_size, output_size, samples_per_image, seed
        self.images, self.labels, self.weights = [], [], []
        for image, label, weight in zip(images, labels, weights):
            # images smaller than the output tile are mirrored up to its size
            after_h = self.margin + max(0, output_size - image.shape[-2])
            after_w = self.margin + max(0, output_size - image.shape[-1])
            self.images.append(mirror_pad(image, self.margin, after_h, after_w))
            self.labels.append(mirror_pad(label.astype(np.int64), self.margin, after_h, after_w))
            self.weights.append(mirror_pad(weight.astype(np.float32), self.margin, after_h, after_w))

    def __len__(self) -> int:
        return len(self.images) * self.samples_per_image

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self))
        rng = np.random.default_rng([self.seed, epoch, index])
        image_index = index // self.samples_per_image
        label = self.labels[image_index]
        # the output tile's top-left corner, in image coordinates, is where the input tile starts
        # in the padded arrays
        top = int(rng.integers(0, label.shape[0] - 2 * self.margin - self.output_size + 1))
        left = int(rng.integers(0, label.shape[1] - 2 * self.margin - self.output_size + 1))
        window = (slice(top, top + self.tile_size), slice(left, left + self.tile_size))
        image = self.images[image_index][(slice(None), *window)]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(label[window].copy()), torch.from_numpy(self.weights[image_index][window].copy())


class WholeImageDataset(Dataset):
    """Whole images for validation: ``(image (C, H, W) float32, label (H, W) int64, weight (H, W) float32)``.

    Images of any size; ``infer.predict_probabilities`` mirrors and tiles them as the network needs.
    """

    def __init__(self, images, labels, weights, names: Sequence[str] | None = None):
        self.names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
        self.images = [torch.from_numpy(image) for image in images]
        self.labels = [torch.from_numpy(label.astype(np.int64)) for label in labels]
        self.weights = [torch.from_numpy(weight.astype(np.float32)) for weight in weights]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index], self.weights[index]


class EpochSampler(Sampler):
    """A shuffled order of ``size`` items, fixed by ``(seed, epoch)``, optionally skipping the first ones.

    It yields ``epoch * size + i`` so that ``TileDataset`` knows the epoch even in persistent workers.
    Skipping lets a run interrupted mid-epoch continue with exactly the batches it had not seen.
    With ``world_size`` processes (DistributedDataParallel) each takes every ``world_size``-th item of
    the same order from its ``rank`` on, so the shards are disjoint and equally long (a remainder of
    fewer than ``world_size`` items is left out), as in torch's ``DistributedSampler``.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.rank, self.world_size, self.epoch, self.start = size, seed, rank, world_size, 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Start ``epoch``, skipping the first ``start`` items of this process's shard."""
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator) + self.epoch * self.size
        shard = order[self.rank : self.size // self.world_size * self.world_size : self.world_size]
        return iter(shard[self.start :].tolist())

    def __len__(self) -> int:
        return self.size // self.world_size - self.start


# ---------------------------------------------------------------------------------------------------
# Augmentation, batched in torch on the training device
# ---------------------------------------------------------------------------------------------------
"""Batched data augmentation in torch, on the training device.

The U-Net paper (Ronneberger et al. 2015, sec. 3.1) trains on few images and relies on strong
augmentation: shifts, rotations, gray-value variations and, above all, smooth elastic deformations
from random displacement vectors on a coarse 3 x 3 grid (10 px standard deviation), interpolated
bicubically to per-pixel displacements. Here every sample of a batch gets its own random geometry,
combined into one sampling grid, so that each tensor is resampled once (one interpolation, one
blur of detail); the intensity changes then act on the image alone. All randomness comes from one
``torch.Generator`` on the tensors' device, drawn in batched calls: the same seed gives the same
batch, and nothing waits for the host on a GPU.

The work is split so that it can be checked: :func:`random_parameters` draws explicit per-sample
parameters, :func:`apply_parameters` applies given parameters, and :func:`augment_batch` does both.

Conventions: pixel (row i, column j) has its centre at coordinate (y, x) = (i, j) px, the tile spans
[-0.5, H - 0.5] x [-0.5, W - 0.5] (``align_corners=False``) and turns happen about its centre
((H - 1) / 2, (W - 1) / 2). Vectors in parameters are (row, column) = (down, right) in px. Outside
the tile, content is mirrored about the tile's edges (``padding_mode="reflection"``: the edge pixel
is repeated, d c b a | a b c d, unlike NumPy's "reflect" padding).
"""

AUGMENT_DEFAULTS = default_config()["augment"]

# Below this sigma (px) a Gaussian kernel is a delta to float precision at the centre tap anyway;
# using an exact delta keeps such samples bit-exact and avoids dividing by a vanishing sigma.
MIN_BLUR_SIGMA = 0.1

# The blur kernel is cut off at this many sigmas of the largest possible sigma (99.7 % of the mass).
BLUR_TRUNCATE = 3.0

_GEOMETRIC_KEYS = ("flip", "rotate90", "rotation", "scale", "shift", "elastic_std")


def resolve_settings(settings: dict) -> dict:
    """``settings`` (any subset of the config's ``augment`` keys) completed with the defaults and
    checked like the config; a ConfigError names an unknown key or a value out of range."""
    return resolve({"augment": settings})["augment"]


def _symmetric_uniform(half_width: float, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Float32 tensor of the given size, uniform in [-half_width, half_width]."""
    unit = torch.rand(size, generator=generator, device=generator.device)
    return (2.0 * unit - 1.0) * half_width


def random_parameters(
    shape: tuple[int, int, int, int], settings: dict, generator: torch.Generator
) -> dict[str, Tensor]:
    """Draw random per-sample augmentation parameters for a batch.

    Every per-sample parameter is drawn whether or not its transform is on (a disabled transform
    gets its identity value), so switching one transform off leaves the draws of the others alone.

    Parameters
    ----------
    shape : tuple of int
        Image batch shape (B, C, H, W).
    settings : dict
        Augmentation settings, see the config's ``augment`` section.
    generator : torch.Generator
        Source of all randomness; the tensors are created on its device.

    Returns
    -------
    dict of str to Tensor
        On the generator's device, B = batch size, g = ``settings["elastic_grid"]``:

        - ``augmented``: (B,) bool, whether the sample is augmented at all.
        - ``flip_horizontal``, ``flip_vertical``: (B,) bool, mirror left-right / top-bottom.
        - ``quarter_turns``: (B,) int64 in 0..3, counter-clockwise turns by 90 degrees.
        - ``angle``: (B,) float32, further counter-clockwise rotation in degrees.
        - ``zoom``: (B,) float32, magnification (> 1 enlarges the content).
        - ``shift``: (B, 2) float32, translation of the content in px (down, right).
        - ``displacement``: (B, 2, g, g) float32, elastic displacements in px (down, right) at the
          coarse grid nodes; output pixel p shows the content found at p + displacement(p).
        - ``brightness``: (B,) float32, additive offset in image units.
        - ``contrast``: (B,) float32, factor about the sample's mean.
        - ``gamma``: (B,) float32, exponent.
        - ``noise_std``: (B,) float32, noise standard deviation in image units.
        - ``blur_sigma``: (B,) float32, Gaussian blur sigma in px.
        - ``noise``: (B, C, H, W) float32 standard normal noise, only present when
          ``settings["noise"] > 0``.
    """
    settings = resolve_settings(settings)
    batch, channels, height, width = shape
    grid = settings["elastic_grid"]
    device = generator.device

    def unit() -> Tensor:
        return torch.rand(batch, generator=generator, device=device)

    params = {
        "augmented": unit() < settings["probability"],
        "flip_horizontal": (unit() < 0.5) & settings["flip"],
        "flip_vertical": (unit() < 0.5) & (settings["flip"] and settings["vertical_flip"]),
        "quarter_turns": torch.randint(4, (batch,), generator=generator, device=device) * int(settings["rotate90"]),
        "angle": _symmetric_uniform(settings["rotation"], (batch,), generator),
        "zoom": torch.exp(_symmetric_uniform(math.log1p(settings["scale"]), (batch,), generator)),
        "shift": _symmetric_uniform(settings["shift"], (batch, 2), generator),
        "displacement": settings["elastic_std"]
        * torch.randn((batch, 2, grid, grid), generator=generator, device=device),
        "brightness": _symmetric_uniform(settings["brightness"], (batch,), generator),
        "contrast": 1.0 + _symmetric_uniform(settings["contrast"], (batch,), generator),
        "gamma": torch.exp(_symmetric_uniform(math.log1p(settings["gamma"]), (batch,), generator)),
        "noise_std": settings["noise"] * unit(),
        "blur_sigma": settings["blur"] * unit(),
    }
    if settings["noise"] > 0:
        # Drawn last: the per-sample draws above do not depend on whether noise is on.
        params["noise"] = torch.randn((batch, channels, height, width), generator=generator, device=device)
    return params


def sampling_grid(params: dict[str, Tensor], height: int, width: int, elastic: bool) -> Tensor:
    """Sampling grid of the geometric parameters, for ``F.grid_sample(..., align_corners=False)``.

    The content is flipped, turned by ``90 * quarter_turns + angle`` degrees counter-clockwise and
    zoomed, all about the tile centre, then shifted, then deformed elastically. The grid holds the
    inverse map: for each output pixel p the source point
    ``q = c + A^-1 (p + displacement(p) - shift - c)``, c = tile centre, A = zoom * rotation * flip.

    Parameters
    ----------
    params : dict of str to Tensor
        As returned by :func:`random_parameters`; uses ``flip_horizontal``, ``flip_vertical``,
        ``quarter_turns``, ``angle``, ``zoom``, ``shift`` and, if ``elastic``, ``displacement``.
    height, width : int
        Tile size in px.
    elastic : bool
        Whether to add the elastic displacement field.

    Returns
    -------
    Tensor
        (B, H, W, 2) float32, source points in normalised (x, y) coordinates: -1 and 1 are the
        outer edges of the tile, not the centres of its edge pixels.
    """
    # Trigonometry in float64 so that multiples of 90 degrees give exact 0 and +-1 after the cast:
    # flips and quarter turns then move pixel centres exactly onto pixel centres.
    turn = torch.deg2rad(params["angle"].double() + 90.0 * params["quarter_turns"])
    cos, sin = torch.cos(turn), torch.sin(turn)
    mirror_x = 1.0 - 2.0 * params["flip_horizontal"].double()
    mirror_y = 1.0 - 2.0 * params["flip_vertical"].double()
    # Inverse of "rotate counter-clockwise by phi" in (x, y) with y pointing down is
    # (x, y) -> (x cos - y sin, x sin + y cos); the flip is its own inverse and comes last.
    inverse = torch.stack(
        [torch.stack([mirror_x * cos, -mirror_x * sin], dim=-1), torch.stack([mirror_y * sin, mirror_y * cos], dim=-1)],
        dim=-2,
    ) / params["zoom"].double()[:, None, None]
    # A pixel coordinate u (centres at 0..W-1) is 2 (u - c) / W in normalised coordinates; since
    # the map is linear about the centre, the scaling folds into the matrix.
    to_normalised = torch.tensor([2.0 / width, 2.0 / height], dtype=torch.float64, device=inverse.device)
    matrix = (to_normalised[:, None] * inverse).float()  # (B, 2, 2), acts on (x, y)

    # Offsets (x, y) of each output pixel from the tile centre, minus the shift: (B, 1, W), (B, H, 1).
    shift = params["shift"].float()
    offset_x = torch.arange(width, dtype=torch.float32, device=matrix.device) - (width - 1) / 2.0
    offset_y = torch.arange(height, dtype=torch.float32, device=matrix.device)[:, None] - (height - 1) / 2.0
    offset_x = offset_x - shift[:, 1, None, None]
    offset_y = offset_y - shift[:, 0, None, None]
    entry = matrix[:, :, :, None, None]
    grid_x = entry[:, 0, 0] * offset_x + entry[:, 0, 1] * offset_y  # (B, H, W)
    grid_y = entry[:, 1, 0] * offset_x + entry[:, 1, 1] * offset_y
    if elastic:
        # The map is linear, so the matrix can act on the few coarse displacement vectors before
        # they are upsampled rather than on every pixel's vector.
        coarse = torch.einsum("bij,bjkl->bikl", matrix, params["displacement"].float().flip(1))
        field = upsample_bicubic(coarse, height, width)
        grid_x = grid_x + field[:, 0]
        grid_y = grid_y + field[:, 1]
    return torch.stack([grid_x, grid_y], dim=-1)


def upsample_bicubic(coarse: Tensor, height: int, width: int) -> Tensor:
    """Bicubic upsampling of a coarse grid of values, e.g. displacements, to every pixel.

    Parameters
    ----------
    coarse : Tensor
        (B, K, m, n) float, values at the nodes of an m x n grid whose outer nodes lie on the
        centres of the tile's corner pixels (``align_corners=True``).
    height, width : int
        Tile size in px.

    Returns
    -------
    Tensor
        (B, K, H, W), the same as ``F.interpolate(coarse, (H, W), mode="bicubic", align_corners=True)``.
    """
    # Bicubic interpolation is separable and linear in the node values: interpolating each node's
    # unit impulse along one axis gives (H, m) and (W, n) weight matrices, and the result is
    # rows @ coarse @ cols^T: a few multiply-adds per pixel instead of 16 taps, much faster on a CPU.
    def weights(nodes: int, size: int) -> Tensor:
        impulses = torch.eye(nodes, dtype=coarse.dtype, device=coarse.device)[None, :, :, None]
        return F.interpolate(impulses, size=(size, 1), mode="bicubic", align_corners=True)[0, :, :, 0].T

    return weights(coarse.shape[-2], height) @ coarse @ weights(coarse.shape[-1], width).T


def gaussian_blur(image: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Blur each sample with its own Gaussian, in one grouped convolution with reflect padding.

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) float.
    sigma : Tensor
        (B,) float, standard deviation in px per sample; below :data:`MIN_BLUR_SIGMA` the sample is
        returned unchanged.
    radius : int
        Kernel radius in px, the same for all samples (kernel side 2 * radius + 1); smaller than H
        and W.

    Returns
    -------
    Tensor
        (B, C, H, W), same dtype. Beyond the border the image is mirrored without repeating the edge
        pixel (PyTorch ``reflect`` = scipy.ndimage ``mirror``).
    """
    batch, channels, height, width = image.shape
    taps = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    sigma = sigma.to(image.dtype).repeat_interleave(channels)[:, None]  # one kernel per (sample, channel)
    kernel = torch.exp(-0.5 * (taps / sigma.clamp_min(MIN_BLUR_SIGMA)) ** 2)
    kernel = torch.where(sigma < MIN_BLUR_SIGMA, (taps == 0).to(image.dtype), kernel)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel_2d = kernel[:, None, :, None] * kernel[:, None, None, :]  # (B*C, 1, k, k), separable Gaussian
    planes = F.pad(image.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    return F.conv2d(planes, kernel_2d, groups=batch * channels).reshape(image.shape)


def adjust_intensity(image: Tensor, params: dict[str, Tensor], settings: dict) -> Tensor:
    """Apply blur, gamma, contrast, brightness and noise, in this order, per sample.

    Blur comes first as the optics would; noise comes last, as the sensor adds it after everything
    else. Transforms whose magnitude in ``settings`` is 0 are skipped.

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) float.
    params : dict of str to Tensor
        As returned by :func:`random_parameters`.
    settings : dict
        Augmentation settings, see the config's ``augment`` section.

    Returns
    -------
    Tensor
        (B, C, H, W), same dtype.
    """
    settings = resolve_settings(settings)
    per_sample = (-1, 1, 1, 1)
    dims = (1, 2, 3)
    # Each step is written in as few full-size passes as possible (addcmul, in-place on fresh
    # intermediates): on a CPU these element-wise passes, not the arithmetic, take the time.
    if settings["blur"] > 0:
        radius = max(1, math.ceil(BLUR_TRUNCATE * settings["blur"]))
        image = gaussian_blur(image, params["blur_sigma"], radius)
    if settings["gamma"] > 0:
        low = image.amin(dim=dims, keepdim=True)
        span = (image.amax(dim=dims, keepdim=True) - low).clamp_min(torch.finfo(image.dtype).tiny)
        # The clamp only absorbs rounding just outside [0, 1], where a fractional power is undefined.
        unit = ((image - low) / span).clamp_(0.0, 1.0)
        image = torch.addcmul(low, unit.pow_(params["gamma"].reshape(per_sample)), span)
    if settings["contrast"] > 0 or settings["brightness"] > 0:
        # mean + (x - mean) * factor + brightness, as one affine map x * factor + offset; a disabled
        # part has its identity value (factor 1, brightness 0).
        factor = params["contrast"].reshape(per_sample)
        offset = image.mean(dim=dims, keepdim=True) * (1.0 - factor) + params["brightness"].reshape(per_sample)
        image = torch.addcmul(offset, image, factor)
    if settings["noise"] > 0:
        image = torch.addcmul(image, params["noise_std"].reshape(per_sample), params["noise"])
    return image


def apply_parameters(
    image: Tensor, label: Tensor, weight: Tensor, params: dict[str, Tensor], settings: dict
) -> tuple[Tensor, Tensor, Tensor]:
    """Augment a batch with given per-sample parameters.

    Geometry: one sampling grid per sample (see :func:`sampling_grid`) and one ``F.grid_sample``
    call per tensor, mirroring at the tile edges: the image with ``settings["interpolation"]``, the
    label with nearest neighbour (so it keeps its class values), the weight bilinearly. When all
    geometric transforms are off, no resampling happens. Then the image's intensity is changed
    (:func:`adjust_intensity`). Samples with ``params["augmented"]`` false are returned unchanged.

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) float32.
    label : Tensor
        (B, H, W) int64 class indices.
    weight : Tensor
        (B, H, W) float32 per-pixel loss weights.
    params : dict of str to Tensor
        As returned by :func:`random_parameters`, on the tensors' device.
    settings : dict
        Augmentation settings, see the config's ``augment`` section; they decide which transforms run.

    Returns
    -------
    image, label, weight : Tensor
        Same shapes, dtypes and device as the inputs.
    """
    settings = resolve_settings(settings)
    if image.ndim != 4 or label.shape != (image.shape[0], *image.shape[2:]) or weight.shape != label.shape:
        raise ValueError(
            f"expected image (B, C, H, W) with label and weight (B, H, W), got image {tuple(image.shape)}, "
            f"label {tuple(label.shape)}, weight {tuple(weight.shape)}"
        )
    height, width = image.shape[-2:]
    new_image, new_label, new_weight = image, label, weight
    if any(settings[key] for key in _GEOMETRIC_KEYS):
        grid = sampling_grid(params, height, width, elastic=settings["elastic_std"] > 0)
        resample = {"padding_mode": "reflection", "align_corners": False}
        new_image = F.grid_sample(image, grid, mode=settings["interpolation"], **resample)
        # Class indices are exact in float32 (below 2**24), and nearest sampling only copies them.
        label_plane = label[:, None].to(image.dtype)
        new_label = F.grid_sample(label_plane, grid, mode="nearest", **resample)[:, 0].to(label.dtype)
        new_weight = F.grid_sample(weight[:, None], grid, mode="bilinear", **resample)[:, 0]
    new_image = adjust_intensity(new_image, params, settings)
    if settings["probability"] == 1.0:
        return new_image, new_label, new_weight
    # Selecting per sample (rather than resampling with an identity grid) keeps skipped samples
    # bit-exact and needs no host round trip to know which samples those are.
    keep = ~params["augmented"]
    return (
        torch.where(keep[:, None, None, None], image, new_image),
        torch.where(keep[:, None, None], label, new_label),
        torch.where(keep[:, None, None], weight, new_weight),
    )


def augment_batch(
    image: Tensor, label: Tensor, weight: Tensor, settings: dict, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomly augment a batch of training tiles on their device (U-Net paper, sec. 3.1).

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) float32, each image normalised to zero mean and unit std.
    label : Tensor
        (B, H, W) int64 class indices.
    weight : Tensor
        (B, H, W) float32 per-pixel loss weights.
    settings : dict
        Augmentation settings, any subset of the config's ``augment`` section.
    generator : torch.Generator
        Source of all randomness, on the same device type as the tensors.

    Returns
    -------
    image, label, weight : Tensor
        Augmented, same shapes, dtypes and device as the inputs.
    """
    if generator.device.type != image.device.type:
        raise ValueError(f"generator is on {generator.device}, the batch on {image.device}: use one device")
    params = random_parameters(tuple(image.shape), settings, generator)
    return apply_parameters(image, label, weight, params, settings)


def save_samples_figure(
    path: str | os.PathLike,
    image: Tensor,
    label: Tensor,
    weight: Tensor,
    count: int = 4,
    title: str = "",
) -> None:
    """Save a PNG of samples to check by eye: one row per sample, columns image, label and weight map.

    Used for the weight map of a whole training image and for augmented training tiles.

    Parameters
    ----------
    path : str or os.PathLike
        Output PNG file.
    image : Tensor
        (B, C, H, W) float; one channel is shown in gray, three as RGB (each sample stretched to
        [0, 1]), otherwise the first channel.
    label : Tensor
        (B, H, W) int class indices.
    weight : Tensor
        (B, H, W) float weight maps, on one colour scale for all rows.
    count : int, optional
        Number of samples shown, the first ones of the batch (fewer if the batch is smaller).
    title : str, optional
        Figure title.
    """
    # matplotlib is imported here so that importing this module stays fast; a bare Figure renders
    # with Agg and is never registered with pyplot, so it needs no GUI backend and no closing.
    from matplotlib.figure import Figure

    rows = min(count, image.shape[0])
    images = image[:rows].detach().float().cpu().numpy()
    labels = label[:rows].detach().cpu().numpy()
    weights = weight[:rows].detach().float().cpu().numpy()
    weight_range = {"vmin": float(weights.min()), "vmax": float(weights.max())}

    figure = Figure(figsize=(9, 3 * rows + 0.5), layout="constrained")
    axes = figure.subplots(rows, 3, squeeze=False)
    for row in range(rows):
        if images.shape[1] == 3:
            rgb = np.moveaxis(images[row], 0, -1)
            rgb = (rgb - rgb.min()) / max(float(np.ptp(rgb)), 1e-12)
            axes[row, 0].imshow(rgb, interpolation="nearest")
        else:
            axes[row, 0].imshow(images[row, 0], cmap="gray", interpolation="nearest")
        axes[row, 1].imshow(labels[row], cmap="gray", interpolation="nearest")
        weight_plot = axes[row, 2].imshow(weights[row], cmap="viridis", interpolation="nearest", **weight_range)
        for column in range(3):
            axes[row, column].set_axis_off()
    for column, name in enumerate(("image", "label", "weight")):
        axes[0, column].set_title(name)
    figure.colorbar(weight_plot, ax=axes[:, 2], shrink=0.6)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)


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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class Sample:
    """One annotated image as read from disk: ``image`` (H, W) or (H, W, C) of the file's dtype,
    ``label`` (H, W) uint8 class indices, ``instances`` (H, W) int32 object ids (0 = none) for the
    weight map, and ``name`` (file or slice) for messages."""

    image: np.ndarray
    label: np.ndarray
    instances: np.ndarray
    name: str


def read_image(path: Path) -> np.ndarray:
    """Pixels of an image file (PNG, JPEG, TIFF, BMP), as stored; a UserError names an unreadable file."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return tifffile.imread(path)
        return skimage.io.imread(path)
    except Exception as error:  # the readers raise many types for broken files
        raise UserError(f"{path}: cannot read this image ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None


def image_files(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name; a UserError if there is none."""
    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found")
    files = sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."))
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    return files


def pair_by_stem(image_folder: Path, mask_folder: Path) -> list[tuple[Path, Path]]:
    """Each image with its mask: the mask file of the same stem, or of the stem plus ``_mask``."""
    masks: dict[str, list[Path]] = {}
    for path in image_files(mask_folder):
        stem = path.stem[: -len("_mask")] if path.stem.endswith("_mask") else path.stem
        masks.setdefault(stem, []).append(path)
    pairs = []
    for image in image_files(image_folder):
        found = masks.get(image.stem, [])
        if not found:
            raise UserError(f"{image}: no mask named {image.stem}.* or {image.stem}_mask.* in {mask_folder}")
        if len(found) > 1:
            raise UserError(f"{image}: several masks match ({', '.join(p.name for p in found)}); keep one")
        pairs.append((image, found[0]))
    return pairs


def label_from_mask(mask: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """Class indices (H, W) uint8 from a mask file's pixels: 0/255 binary masks become 0/1.

    Masks must hold one channel (gray or identical RGB channels) of class indices 0..num_classes-1,
    or 0 and 255 only when there are two classes.
    """
    if mask.ndim == 3:
        if mask.shape[-1] in (3, 4) and np.array_equal(mask[..., 0], mask[..., 1]) and np.array_equal(mask[..., 0], mask[..., 2]):
            mask = mask[..., 0]
        else:
            raise UserError(f"{name}: mask is a colour image; save masks with one channel of class indices (0..{num_classes - 1}) or 0/255")
    values = np.unique(mask)
    if num_classes == 2 and set(values.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    if values.min() < 0 or values.max() >= num_classes or not np.array_equal(values, np.round(values)):
        bad = values[(values < 0) | (values >= num_classes) | (values != np.round(values))][0]
        raise UserError(f"{name}: mask value {bad:g} is not a class of unet.num_classes={num_classes} (expected 0..{num_classes - 1}, or 0/255 for two classes)")
    return mask.astype(np.uint8)


def object_instances(label: np.ndarray) -> np.ndarray:
    """(H, W) int32 ids of the 4-connected components of every foreground class (0 on background)."""
    instances = np.zeros(label.shape, dtype=np.int32)
    for value in np.unique(label[label > 0]):
        components, count = measure.label(label == value, connectivity=1, return_num=True)
        instances[components > 0] = components[components > 0] + instances.max()
    return instances


def read_folder_pairs(image_folder: Path, mask_folder: Path, num_classes: int) -> list[Sample]:
    """Images and masks paired by stem, masks checked and converted by ``label_from_mask``."""
    samples = []
    for image_path, mask_path in pair_by_stem(image_folder, mask_folder):
        image, mask = read_image(image_path), read_image(mask_path)
        if image.shape[:2] != mask.shape[:2]:
            raise UserError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image {image_path.name} is {image.shape[1]}x{image.shape[0]}")
        label = label_from_mask(mask, num_classes, str(mask_path))
        samples.append(Sample(image, label, object_instances(label), image_path.name))
    return samples


def read_isbi2012(root: Path) -> list[Sample]:
    """The ISBI 2012 training slices: the challenge's TIFF stacks, or ``images/`` + ``labels/`` folders.

    Labels: 255 = cell interior -> class 1, 0 = membrane -> class 0; cells are the 4-connected
    components of class 1.
    """
    volume, labels = root / "train-volume.tif", root / "train-labels.tif"
    if volume.is_file():
        if not labels.is_file():
            raise UserError(f"{labels}: not found next to {volume.name}; ISBI 2012 needs both stacks")
        images, masks = read_image(volume), read_image(labels)
        if images.ndim == 2:
            images, masks = images[None], masks[None]
        if images.shape != masks.shape:
            raise UserError(f"{labels}: shape {masks.shape} differs from {volume.name}'s {images.shape}")
        samples = []
        for index, (image, mask) in enumerate(zip(images, masks)):
            label = label_from_mask(mask, 2, f"{labels} slice {index}")
            samples.append(Sample(image, label, object_instances(label), f"{volume.name} slice {index}"))
        return samples
    for folder in (root, root / "train"):
        if (folder / "images").is_dir() and (folder / "labels").is_dir():
            return read_folder_pairs(folder / "images", folder / "labels", 2)
    raise UserError(f"{root}: no ISBI 2012 data: expected train-volume.tif and train-labels.tif, or images/ and labels/ (see python dataset.py download isbi2012)")


def read_pennfudan(root: Path) -> tuple[list[Sample], list[Sample] | None]:
    """Penn-Fudan pedestrians: ``(training samples, validation samples or None)``.

    Reads the official layout (``PNGImages/``, ``PedMasks/``) or the common mirror's layout
    (``train_images/``, ``train_masks/``, ``valid_images/``, ``valid_masks/``, whose split is kept).
    Masks hold instance ids; every id > 0 is class 1 (person), and the ids are the instances.
    """
    if not (root / "PNGImages").is_dir() and (root / "PennFudanPed").is_dir():
        root = root / "PennFudanPed"

    def read(image_folder: Path, mask_folder: Path) -> list[Sample]:
        samples = []
        for image_path, mask_path in pair_by_stem(image_folder, mask_folder):
            image, mask = read_image(image_path), read_image(mask_path)
            if mask.ndim == 3:
                mask = mask[..., 0]
            if image.shape[:2] != mask.shape[:2]:
                raise UserError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} px but its image {image_path.name} is {image.shape[1]}x{image.shape[0]}")
            samples.append(Sample(image, (mask > 0).astype(np.uint8), mask.astype(np.int32), image_path.name))
        return samples

    if (root / "PNGImages").is_dir():
        return read(root / "PNGImages", root / "PedMasks"), None
    if (root / "train_images").is_dir():
        return read(root / "train_images", root / "train_masks"), read(root / "valid_images", root / "valid_masks")
    raise UserError(f"{root}: no Penn-Fudan data: expected PNGImages/ and PedMasks/, or train_images/, train_masks/, valid_images/, valid_masks/ (python dataset.py download pennfudan)")


def load_samples(config: dict) -> tuple[list[Sample], list[Sample] | None]:
    """``(training samples, validation samples or None)`` of the configured data set.

    Validation samples come from the data set's own split (Penn-Fudan's ``valid_*`` folders) or from
    ``train.val_data``; None means: split ``train.val_fraction`` off the training samples.
    """
    train, num_classes = config["train"], config["unet"]["num_classes"]
    name, root = train["dataset_name"], Path(train["data"])
    if name == "synthetic":
        generated = synthetic_em_set(train["synthetic_images"], train["synthetic_size"], train["seed"])
        samples, val_samples = [Sample(image, label, instances, f"synthetic {i}") for i, (image, label, instances) in enumerate(generated)], None
    else:
        if not root.exists():
            raise UserError(f"train.data: {root} not found; point it at the {name} data (python dataset.py download {name} --to data/ helps get it)")
        if name == "isbi2012":
            samples, val_samples = read_isbi2012(root), None
        elif name == "pennfudan":
            samples, val_samples = read_pennfudan(root)
        else:
            samples, val_samples = read_folder_pairs(root / "images", root / "masks", num_classes), None
    if train["val_data"]:
        val_root = Path(train["val_data"])
        val_samples = read_isbi2012(val_root) if name == "isbi2012" else read_folder_pairs(val_root / "images", val_root / "masks", num_classes)
    return samples, val_samples


def build_datasets(config: dict, note: Callable[[str], None] = print) -> dict:
    """Everything training needs from the data, computed once: tiles, whole validation images, weights.

    Returns a dict with ``train`` (TileDataset), ``val`` and ``test`` (WholeImageDataset; ``test`` is
    None without ``train.test_images``), ``class_weights``
    ((K,) float32 array or None) and ``example``: the normalised image (C, H, W), label and weight map
    of the first training image, for the weight-map figure.
    """
    unet, train = config["unet"], config["train"]
    depth, num_classes = len(unet["input_channels"]), unet["num_classes"]
    try:
        out_size = output_size(train["tile_size"], depth, unet["padding"])
    except ValueError as error:
        raise UserError(f"train.tile_size: {error}") from None
    samples, val_samples = load_samples(config)
    test_index = sorted(set(train["test_images"] or []))
    outside = [i for i in test_index if not 0 <= i < len(samples)]
    if outside:
        raise UserError(f"train.test_images: {outside} not among the {len(samples)} images (0..{len(samples) - 1})")
    pool = [i for i in range(len(samples)) if i not in test_index]
    if val_samples is not None:
        train_index = pool
    elif train["val_images"]:
        val_index = sorted(set(train["val_images"]))
        outside = [i for i in val_index if not 0 <= i < len(samples)]
        if outside:
            raise UserError(f"train.val_images: {outside} not among the {len(samples)} images (0..{len(samples) - 1})")
        if set(val_index) & set(test_index):
            raise UserError(f"train.val_images and train.test_images share {sorted(set(val_index) & set(test_index))}: an image is either validation or test")
        train_index = [i for i in pool if i not in val_index]
    else:
        train_part, val_part = split_indices(len(pool), train["val_fraction"], train["seed"])
        train_index, val_index = [pool[i] for i in train_part], [pool[i] for i in val_part]
    if not train_index:
        raise UserError("train.val_images and train.test_images hold every image: leave some for training")
    test_samples = [samples[i] for i in test_index]
    if val_samples is None:
        val_samples = [samples[i] for i in val_index]
    samples = [samples[i] for i in train_index]
    channels = sorted({1 if s.image.ndim == 2 else s.image.shape[-1] for s in samples + val_samples})
    if channels != [unet["image_channels"]]:
        note(f"images have {' or '.join(map(str, channels))} channel(s) but unet.image_channels is {unet['image_channels']}: converting them")
    if train["class_weights"] == "balanced":
        class_weights = class_balance_weights([s.label for s in samples], num_classes)
    elif train["class_weights"] == "none":
        class_weights = None
    else:
        class_weights = np.asarray(train["class_weights"], dtype=np.float32)

    def prepare(part: list[Sample], scale: float = 1.0) -> tuple[list, list, list]:
        """Normalised images, labels and weight maps, resized by ``scale`` (``resize_image`` for the
        images, nearest neighbour for labels and instances) before the weight maps are computed."""
        images, labels, weights = [], [], []
        for sample in part:
            image, label, instances = normalize_image(sample.image, unet["image_channels"]), sample.label, sample.instances
            if scale != 1:
                size = scaled_size(*label.shape, scale)
                image = resize_image(torch.from_numpy(image), size).numpy()
                label, instances = resize_mask(label, size), resize_mask(instances, size)
            images.append(image)
            labels.append(label)
            weights.append(weight_map(label, instances, train["w_0"], train["sigma"], class_weights))
        return images, labels, weights

    # training tiles come from rescaled images; validation and test images keep their size, and the
    # predictor rescales them on the way in and the probabilities on the way out
    images, labels, weights = prepare(samples, train["image_scale"])
    train_set = TileDataset(images, labels, weights, train["tile_size"], out_size, train["samples_per_image"], train["seed"])
    val_set = WholeImageDataset(*prepare(val_samples), names=[s.name for s in val_samples])
    test_set = WholeImageDataset(*prepare(test_samples), names=[s.name for s in test_samples]) if test_samples else None
    return {"train": train_set, "val": val_set, "test": test_set, "class_weights": class_weights, "example": (images[0], labels[0], weights[0])}


if __name__ == "__main__":
    import sys

    from download import download_main

    sys.exit(download_main(sys.argv[1:]))
