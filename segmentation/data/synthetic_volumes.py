"""Synthetic serial-section EM volumes: anisotropic cells through thick sections, some sections damaged.

Serial-section EM cuts neurites across: a cell continues from one section to the next, while the sections are
several times thicker than a pixel is wide, and a section may be blurred, folded or noisy. A 2D network segments
such a section blind; a 3D network can take the membranes from the sections around it. These volumes make that
case measurable without downloads: their labels are exact in every section, damaged or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from segmentation.data.readers import MaskSettings, Sample

Z_RATIO = 5.0  # section thickness over pixel width, as in serial-section EM (ISBI 2012: 50 nm / 4 nm = 12.5)
ELONGATION = 3.0  # cells run this much longer along z than across: neurites cross many sections
SECTIONS = 16  # sections of a synthetic volume (train.synthetic_images volumes of train.synthetic_size px)
DAMAGED_FRACTION = 0.2  # of the sections, damaged at random: strong blur, noise and low contrast


def synthetic_em_volume(
    sections: int,
    size: int,
    rng: np.random.Generator,
    z_ratio: float = Z_RATIO,
    cell_diameter: float = 24.0,
    damaged_fraction: float = DAMAGED_FRACTION,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """An EM-like volume of ``sections`` sections of ``size`` x ``size`` px, each section ``z_ratio`` px thick.

    Cells are the Voronoi regions of random centres, measured with z shrunk by ``ELONGATION`` (cells run along
    z); membranes are 2 px wide where a cell meets another in its section. Cells are light gray with a texture
    of their own, membranes dark; every section is blurred (sigma 1 px) with noise (std 0.05), and a
    ``damaged_fraction`` of them (never the first or last) far more: blur sigma 2.5 px, noise std 0.12, half the
    contrast.

    Returns ``(image, label, instances, damaged)``: (D, H, W) float32 in about [0, 1], (D, H, W) uint8 labels
    (1 cell, 0 membrane), (D, H, W) int32 cell ids (0 on membranes) and the (K,) int64 indices of the damaged
    sections.
    """
    depth_extent = sections * z_ratio / ELONGATION  # in the metric in which cells are round
    count = max(2, round(depth_extent * size * size / cell_diameter**3 * 1.9))
    centres = rng.uniform(0, 1, (count, 3)) * (depth_extent, size, size)
    grid = np.stack(np.meshgrid(*(np.arange(n, dtype=np.float32) + 0.5 for n in (sections, size, size)), indexing="ij"))
    points = grid.reshape(3, -1).T * np.float32([z_ratio / ELONGATION, 1, 1])
    ids = (cKDTree(centres).query(points)[1] + 1).reshape(sections, size, size).astype(np.int32)
    membrane = np.zeros(ids.shape, bool)
    for axis in (1, 2):
        differs = np.diff(ids, axis=axis) != 0
        membrane[(slice(None), *[slice(1, None) if a == axis else slice(None) for a in (1, 2)])] |= differs
    membrane = ndimage.binary_dilation(membrane, structure=np.ones((1, 2, 2), bool))
    label = (~membrane).astype(np.uint8)
    instances = np.where(membrane, 0, ids).astype(np.int32)

    brightness = rng.uniform(0.55, 0.8, count + 1).astype(np.float32)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, ids.shape).astype(np.float32), (0.5, 2, 2)) * 0.6
    image = np.where(membrane, np.float32(0.15), brightness[ids] + 0.08 * texture)
    damaged = np.sort(rng.choice(np.arange(1, sections - 1), round(damaged_fraction * sections), replace=False))
    for index in range(sections):
        sigma, noise, contrast = (2.5, 0.12, 0.5) if index in damaged else (1.0, 0.05, 1.0)
        section = ndimage.gaussian_filter(image[index], sigma)
        section = 0.5 + contrast * (section - 0.5) + rng.normal(0, noise, section.shape).astype(np.float32)
        image[index] = section
    return image.astype(np.float32), label, instances, damaged.astype(np.int64)


@dataclass(frozen=True)
class SyntheticVolumeSample:
    """Volume ``index`` of the synthetic volumes of ``seed`` (``synthetic_em_volume``), generated when read."""

    name: str
    seed: int
    index: int
    size: int
    sections: int = SECTIONS

    def identity(self) -> list:
        """What the voxels depend on (with the generator's code, which the cache hashes)."""
        return ["synthetic volume", self.seed, self.index, self.size, self.sections]

    def read(self, settings: MaskSettings) -> Sample:
        """Generate the volume, its voxel spacing ``(Z_RATIO, 1, 1)`` (``settings`` do not apply)."""
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.index,)))
        image, label, instances, _ = synthetic_em_volume(self.sections, self.size, rng)
        return Sample(image, label, instances, self.name, "generated", (), (Z_RATIO, 1.0, 1.0))
