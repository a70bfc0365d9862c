"""Batched data augmentation in torch, on the training device, from the config's ``augment`` section.

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

Volumes (B, C, D, H, W), as in the 3D U-Net (Cicek et al. 2016) and nnU-Net, are often anisotropic: few
sections, thick in z. So flips also mirror z, but turns, rotation, zoom and shift act in-plane, the same
in every section of a tile (no resampling along z), and the elastic deformation is 3D with its z part
given in in-plane px and converted to sections by the voxel ``spacing``. Blur acts per section, the gray
values per tile. Parameters and fields are ordered (z, y, x) = (deeper, down, right); section k has its
centre at z = k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from losses import IGNORE_LABEL
from segmentation.settings import AugmentSettings

# Below this sigma (px) a Gaussian kernel is a delta to float precision at the centre tap anyway;
# using an exact delta keeps such samples bit-exact and avoids dividing by a vanishing sigma.
MIN_BLUR_SIGMA = 0.1

# The blur kernel is cut off at this many sigmas of the largest possible sigma (99.7 % of the mass).
BLUR_TRUNCATE = 3.0


def _symmetric_uniform(half_width: float, size: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """Float32 tensor of the given size, uniform in [-half_width, half_width]."""
    unit = torch.rand(size, generator=generator, device=generator.device)
    return (2.0 * unit - 1.0) * half_width


def random_parameters(
    shape: tuple[int, ...], settings: AugmentSettings, generator: torch.Generator
) -> dict[str, Tensor]:
    """Draw random per-sample augmentation parameters for a batch.

    Every per-sample parameter is drawn whether or not its transform is on (a disabled transform
    gets its identity value), so switching one transform off leaves the draws of the others alone.

    Parameters
    ----------
    shape : tuple of int
        Image batch shape (B, C, H, W), or (B, C, D, H, W) for volumes.
    settings : AugmentSettings
        The config's ``augment`` section.
    generator : torch.Generator
        Source of all randomness; the tensors are created on its device.

    Returns
    -------
    dict of str to Tensor
        On the generator's device, B = batch size, g = ``settings.elastic_grid``:

        - ``augmented``: (B,) bool, whether the sample is augmented at all.
        - ``flip_horizontal``, ``flip_vertical``: (B,) bool, mirror left-right / top-bottom.
        - ``quarter_turns``: (B,) int64 in 0..3, counter-clockwise turns by 90 degrees.
        - ``angle``: (B,) float32, further counter-clockwise rotation in degrees.
        - ``zoom``: (B,) float32, magnification (> 1 enlarges the content).
        - ``shift``: (B, 2) float32, translation of the content in px (down, right).
        - ``displacement``: (B, 2, g, g) float32, elastic displacements in px (down, right) at the
          coarse grid nodes; output pixel p shows the content found at p + displacement(p). Volumes:
          (B, 3, g, g, g), (deeper, down, right), all three in in-plane px.
        - ``brightness``: (B,) float32, additive offset in image units.
        - ``contrast``: (B,) float32, factor about the sample's mean.
        - ``gamma``: (B,) float32, exponent.
        - ``noise_std``: (B,) float32, noise standard deviation in image units.
        - ``blur_sigma``: (B,) float32, Gaussian blur sigma in px.
        - ``flip_depth``: (B,) bool, volumes only: mirror along z (drawn after the others, so that a
          volume's draws of the keys above are those of a 2D batch but for ``displacement``).
        - ``noise``: (B, C, H, W) or (B, C, D, H, W) float32 standard normal noise, only present when
          ``settings.noise > 0``.
    """
    batch, spatial = shape[0], len(shape) - 2
    grid = settings.elastic_grid
    device = generator.device

    def unit() -> Tensor:
        return torch.rand(batch, generator=generator, device=device)

    params = {
        "augmented": unit() < settings.probability,
        "flip_horizontal": (unit() < 0.5) & settings.flip,
        "flip_vertical": (unit() < 0.5) & (settings.flip and settings.vertical_flip),
        "quarter_turns": torch.randint(4, (batch,), generator=generator, device=device) * int(settings.rotate90),
        "angle": _symmetric_uniform(settings.rotation, (batch,), generator),
        "zoom": torch.exp(_symmetric_uniform(math.log1p(settings.scale), (batch,), generator)),
        "shift": _symmetric_uniform(settings.shift, (batch, 2), generator),
        "displacement": settings.elastic_std
        * torch.randn((batch, spatial, *(grid,) * spatial), generator=generator, device=device),
        "brightness": _symmetric_uniform(settings.brightness, (batch,), generator),
        "contrast": 1.0 + _symmetric_uniform(settings.contrast, (batch,), generator),
        "gamma": torch.exp(_symmetric_uniform(math.log1p(settings.gamma), (batch,), generator)),
        "noise_std": settings.noise * unit(),
        "blur_sigma": settings.blur * unit(),
    }
    if spatial == 3:
        params["flip_depth"] = (unit() < 0.5) & settings.flip
    if settings.noise > 0:
        # Drawn last: the per-sample draws above do not depend on whether noise is on.
        params["noise"] = torch.randn(tuple(shape), generator=generator, device=device)
    return params


def sampling_grid(
    params: dict[str, Tensor], size: tuple[int, ...], elastic: bool, spacing: Sequence[float] | None = None
) -> Tensor:
    """Sampling grid of the geometric parameters, for ``F.grid_sample(..., align_corners=False)``.

    The content is flipped, turned by ``90 * quarter_turns + angle`` degrees counter-clockwise and
    zoomed, all about the tile centre, then shifted, then deformed elastically. The grid holds the
    inverse map: for each output pixel p the source point
    ``q = c + A^-1 (p + displacement(p) - shift - c)``, c = tile centre, A = zoom * rotation * flip.
    In a volume A and the shift act in-plane, the same in every section, and along z A is the z flip
    alone; the z displacement, in in-plane px, is divided by ``spacing_z / spacing_y`` to give sections.

    Parameters
    ----------
    params : dict of str to Tensor
        As returned by :func:`random_parameters`; uses ``flip_horizontal``, ``flip_vertical``,
        ``quarter_turns``, ``angle``, ``zoom``, ``shift``, for volumes ``flip_depth`` and, if
        ``elastic``, ``displacement``.
    size : tuple of int
        Tile size (H, W) in px, or (D, H, W) in sections and px.
    elastic : bool
        Whether to add the elastic displacement field.
    spacing : sequence of float, optional
        Volumes: voxel size (z, y, x) in any one unit; None: isotropic. Ignored for 2D tiles.

    Returns
    -------
    Tensor
        (B, H, W, 2) or (B, D, H, W, 3) float32, source points in normalised (x, y) or (x, y, z)
        coordinates: -1 and 1 are the outer edges of the tile, not the centres of its edge pixels.
    """
    height, width = size[-2:]
    # Trigonometry in float64 so that multiples of 90 degrees give exact 0 and +-1 after the cast:
    # flips and quarter turns then move pixel centres exactly onto pixel centres.
    turn = torch.deg2rad(params["angle"].double() + 90.0 * params["quarter_turns"])
    cos, sin = torch.cos(turn), torch.sin(turn)
    mirror_x = 1.0 - 2.0 * params["flip_horizontal"].double()
    mirror_y = 1.0 - 2.0 * params["flip_vertical"].double()
    # Inverse of "rotate counter-clockwise by phi" in (x, y) with y pointing down is
    # (x, y) -> (x cos - y sin, x sin + y cos); the flip is its own inverse and comes last.
    inverse = (
        torch.stack(
            [
                torch.stack([mirror_x * cos, -mirror_x * sin], dim=-1),
                torch.stack([mirror_y * sin, mirror_y * cos], dim=-1),
            ],
            dim=-2,
        )
        / params["zoom"].double()[:, None, None]
    )
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
    planes = [grid_x, grid_y]
    if len(size) == 3:
        # Every section gets the in-plane map; z is only mirrored: 2 (k - c) / D, times -1 if flipped.
        depth = size[0]
        to_depth = ((1.0 - 2.0 * params["flip_depth"].double()) * (2.0 / depth)).float()  # (B,)
        offset_z = torch.arange(depth, dtype=torch.float32, device=matrix.device)[:, None, None] - (depth - 1) / 2.0
        planes = [grid_x[:, None], grid_y[:, None], to_depth[:, None, None, None] * offset_z]  # (B, D, 1, 1) in z
    if elastic:
        # The map is linear, so the matrix can act on the few coarse displacement vectors before
        # they are upsampled rather than on every pixel's vector.
        displacement = params["displacement"].float()
        in_plane = displacement[:, -2:].flip(1)  # (x, y); a volume's (B, 2, g, g, g) acts as (B, 2, g, g * g)
        coarse = torch.einsum("bij,bjkl->bikl", matrix, in_plane.flatten(3)).reshape(in_plane.shape)
        if len(size) == 3:
            sections_per_px = 1.0 if spacing is None else spacing[1] / spacing[0]
            to_sections = (to_depth * sections_per_px)[:, None, None, None, None]
            coarse = torch.cat([coarse, displacement[:, :1] * to_sections], dim=1)
        field = upsample_bicubic(coarse, size)
        planes = [plane + field[:, axis] for axis, plane in enumerate(planes)]
    return torch.stack(torch.broadcast_tensors(*planes), dim=-1)


def upsample_bicubic(coarse: Tensor, size: tuple[int, ...]) -> Tensor:
    """Bicubic upsampling of a coarse grid of values, e.g. displacements, to every pixel.

    Parameters
    ----------
    coarse : Tensor
        (B, K, m, n) float, values at the nodes of an m x n grid whose outer nodes lie on the
        centres of the tile's corner pixels (``align_corners=True``); volumes: (B, K, l, m, n).
    size : tuple of int
        Tile size (H, W) in px, or (D, H, W).

    Returns
    -------
    Tensor
        (B, K, H, W), the same as ``F.interpolate(coarse, (H, W), mode="bicubic", align_corners=True)``;
        volumes: (B, K, D, H, W), the same interpolation along each of the three axes in turn.
    """

    # Bicubic interpolation is separable and linear in the node values: interpolating each node's
    # unit impulse along one axis gives (H, m) and (W, n) weight matrices, and the result is
    # rows @ coarse @ cols^T: a few multiply-adds per pixel instead of 16 taps, much faster on a CPU.
    def weights(nodes: int, length: int) -> Tensor:
        impulses = torch.eye(nodes, dtype=coarse.dtype, device=coarse.device)[None, :, :, None]
        return F.interpolate(impulses, size=(length, 1), mode="bicubic", align_corners=True)[0, :, :, 0].T

    field = weights(coarse.shape[-2], size[-2]) @ coarse @ weights(coarse.shape[-1], size[-1]).T
    if len(size) == 3:
        # Along z last, on (l, H * W) planes: the in-plane pass then ran on l sections instead of D.
        field = (weights(coarse.shape[-3], size[0]) @ field.flatten(-2)).unflatten(-1, size[-2:])
    return field


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


def adjust_intensity(image: Tensor, params: dict[str, Tensor], settings: AugmentSettings) -> Tensor:
    """Apply blur, gamma, contrast, brightness and noise, in this order, per sample.

    Blur comes first as the optics would; noise comes last, as the sensor adds it after everything
    else. Transforms whose magnitude in ``settings`` is 0 are skipped. In a volume each section is
    blurred in-plane (a section is imaged, or cut, as a whole: thick sections set the z resolution
    anyway), and the gray-value changes take the whole tile as one sample.

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) or (B, C, D, H, W) float.
    params : dict of str to Tensor
        As returned by :func:`random_parameters`.
    settings : AugmentSettings
        The config's ``augment`` section.

    Returns
    -------
    Tensor
        The shape and dtype of ``image``.
    """
    per_sample = (-1,) + (1,) * (image.ndim - 1)
    dims = tuple(range(1, image.ndim))
    # Each step is written in as few full-size passes as possible (addcmul, in-place on fresh
    # intermediates): on a CPU these element-wise passes, not the arithmetic, take the time.
    if settings.blur > 0:
        radius = max(1, math.ceil(BLUR_TRUNCATE * settings.blur))
        # A volume's sections are the planes of a (B, C * D, H, W) batch: blurred with their sample's sigma.
        image = gaussian_blur(image.flatten(1, -3), params["blur_sigma"], radius).reshape(image.shape)
    if settings.gamma > 0:
        low = image.amin(dim=dims, keepdim=True)
        span = (image.amax(dim=dims, keepdim=True) - low).clamp_min(torch.finfo(image.dtype).tiny)
        # The clamp only absorbs rounding just outside [0, 1], where a fractional power is undefined.
        unit = ((image - low) / span).clamp_(0.0, 1.0)
        image = torch.addcmul(low, unit.pow_(params["gamma"].reshape(per_sample)), span)
    if settings.contrast > 0 or settings.brightness > 0:
        # mean + (x - mean) * factor + brightness, as one affine map x * factor + offset; a disabled
        # part has its identity value (factor 1, brightness 0).
        factor = params["contrast"].reshape(per_sample)
        offset = image.mean(dim=dims, keepdim=True) * (1.0 - factor) + params["brightness"].reshape(per_sample)
        image = torch.addcmul(offset, image, factor)
    if settings.noise > 0:
        image = torch.addcmul(image, params["noise_std"].reshape(per_sample), params["noise"])
    return image


def apply_parameters(
    image: Tensor,
    label: Tensor,
    weight: Tensor,
    params: dict[str, Tensor],
    settings: AugmentSettings,
    sparse: bool = False,
    spacing: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Augment a batch of tiles or volumes with given per-sample parameters.

    Geometry: one sampling grid per sample (see :func:`sampling_grid`) and one ``F.grid_sample``
    call per tensor, mirroring at the tile edges: the image with ``settings.interpolation``, the
    label with nearest neighbour (so it keeps its class values), the weight bilinearly (trilinearly
    in volumes, which ``grid_sample`` cannot resample bicubically). When all geometric transforms are
    off, no resampling happens. Then the image's intensity is changed (:func:`adjust_intensity`).
    Samples with ``params["augmented"]`` false are returned unchanged.

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) float32, or (B, C, D, H, W) for volumes.
    label : Tensor
        (B, H, W) or (B, D, H, W) int64 class indices.
    weight : Tensor
        (B, H, W) or (B, D, H, W) float32 per-pixel loss weights.
    params : dict of str to Tensor
        As returned by :func:`random_parameters`, on the tensors' device.
    settings : AugmentSettings
        The config's ``augment`` section; it decides which transforms run.
    sparse : bool
        Labels annotated in part (``losses.IGNORE_LABEL`` where not): the weights are resampled from the
        annotated pixels alone (their bilinear mean over the annotated neighbours), so that an annotated
        pixel beside unannotated ones keeps its weight instead of being blended with theirs.
    spacing : sequence of float, optional
        Volumes: voxel size (z, y, x), which converts the elastic z displacement from in-plane px to
        sections (see :func:`sampling_grid`); None: isotropic. Ignored for 2D tiles.

    Returns
    -------
    image, label, weight : Tensor
        Same shapes, dtypes and device as the inputs.
    """
    check_batch(image, label, weight, settings, spacing)
    new_image, new_label, new_weight = image, label, weight
    if settings.geometric:
        grid = sampling_grid(params, tuple(image.shape[2:]), elastic=settings.elastic_std > 0, spacing=spacing)
        resample = {"padding_mode": "reflection", "align_corners": False}
        new_image = F.grid_sample(image, grid, mode=settings.interpolation, **resample)
        # Class indices are exact in float32 (below 2**24), and nearest sampling only copies them.
        label_plane = label[:, None].to(image.dtype)
        new_label = F.grid_sample(label_plane, grid, mode="nearest", **resample)[:, 0].to(label.dtype)
        new_weight = warped_weight(weight, label, grid, resample) if sparse else None
        if new_weight is None:
            new_weight = F.grid_sample(weight[:, None], grid, mode="bilinear", **resample)[:, 0]
    new_image = adjust_intensity(new_image, params, settings)
    if settings.probability == 1.0:
        return new_image, new_label, new_weight
    # Selecting per sample (rather than resampling with an identity grid) keeps skipped samples
    # bit-exact and needs no host round trip to know which samples those are.
    keep = ~params["augmented"]
    per_voxel = keep.reshape((-1,) + (1,) * (label.ndim - 1))
    return (
        torch.where(per_voxel[:, None], image, new_image),
        torch.where(per_voxel, label, new_label),
        torch.where(per_voxel, weight, new_weight),
    )


def check_batch(
    image: Tensor, label: Tensor, weight: Tensor, settings: AugmentSettings, spacing: Sequence[float] | None
) -> None:
    """Raise ValueError unless image, label and weight are a batch of tiles or volumes that the settings and
    ``spacing`` can augment."""
    if image.ndim not in (4, 5) or label.shape != (image.shape[0], *image.shape[2:]) or weight.shape != label.shape:
        raise ValueError(
            "expected image (B, C, H, W) with label and weight (B, H, W), or image (B, C, D, H, W) with label and "
            f"weight (B, D, H, W), got image {tuple(image.shape)}, label {tuple(label.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if image.ndim == 5 and settings.geometric and settings.interpolation == "bicubic":
        raise ValueError("augment.interpolation: bicubic resamples 2D tiles only; use bilinear (trilinear) for volumes")
    if image.ndim == 5 and spacing is not None and (len(spacing) != 3 or min(spacing) <= 0):
        raise ValueError(f"spacing: expected three positive voxel sizes (z, y, x), got {tuple(spacing)}")


def warped_weight(weight: Tensor, label: Tensor, grid: Tensor, resample: dict) -> Tensor:
    """(B, H, W) or (B, D, H, W) ``weight`` resampled on ``grid`` from the annotated pixels of ``label`` alone:
    the bilinear sum of weight x annotated over that of annotated (normalised convolution); 0 where no annotated
    pixel reaches, where the label is unannotated anyway."""
    given = (label != IGNORE_LABEL).to(weight.dtype)[:, None]
    total = F.grid_sample(weight[:, None] * given, grid, mode="bilinear", **resample)[:, 0]
    share = F.grid_sample(given, grid, mode="bilinear", **resample)[:, 0]
    return torch.where(share > 0, total / share.clamp_min(1e-12), torch.zeros_like(total))


def augment_batch(
    image: Tensor,
    label: Tensor,
    weight: Tensor,
    settings: AugmentSettings,
    generator: torch.Generator,
    sparse: bool = False,
    spacing: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Randomly augment a batch of training tiles or volumes on their device (U-Net paper, sec. 3.1).

    Parameters
    ----------
    image : Tensor
        (B, C, H, W) float32, or (B, C, D, H, W) for volumes, each image normalised to zero mean and unit std.
    label : Tensor
        (B, H, W) or (B, D, H, W) int64 class indices.
    weight : Tensor
        (B, H, W) or (B, D, H, W) float32 per-pixel loss weights.
    settings : AugmentSettings
        The config's ``augment`` section.
    generator : torch.Generator
        Source of all randomness, on the same device type as the tensors.
    sparse : bool
        Labels annotated in part: see :func:`apply_parameters`.
    spacing : sequence of float, optional
        Volumes: voxel size (z, y, x), see :func:`apply_parameters`; None: isotropic. Ignored for 2D tiles.

    Returns
    -------
    image, label, weight : Tensor
        Augmented, same shapes, dtypes and device as the inputs.
    """
    if generator.device.type != image.device.type:
        raise ValueError(f"generator is on {generator.device}, the batch on {image.device}: use one device")
    params = random_parameters(tuple(image.shape), settings, generator)
    return apply_parameters(image, label, weight, params, settings, sparse, spacing)


def augment_on_device(
    batch,
    settings: AugmentSettings,
    seed: int,
    step: int,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    sparse: bool = False,
    spacing: Sequence[float] | None = None,
) -> list[torch.Tensor]:
    """Move ``(image, label, weight)`` to the device and augment them there, with randomness fixed by
    ``(seed, step, rank)`` so that a resumed run sees the same augmentation and the processes of a
    distributed run draw different augmentations; ``sparse``: labels annotated in part; ``spacing``:
    a volume's voxel size (z, y, x), None for isotropic voxels and for 2D tiles."""
    batch = [tensor.to(device, non_blocking=True) for tensor in batch]
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * world_size + rank + 1)
    return list(augment_batch(*batch, settings, generator, sparse, spacing))
