"""Whole-image inference by tiles, for images of any size.

``predict_probabilities`` runs a U-Net over an image of any height and width in tiles, a few at a
time, so that device memory is bounded by ``batch_size`` tiles whatever the image size.

- ``padding=0`` (the paper's valid convolutions): the overlap-tile strategy of Ronneberger et al.
  (2015, Fig. 2). The image is mirrored at its borders by the network's context margin and output
  tiles are laid side by side. Every output pixel sees its full context, so the tiles join without
  seams: the result equals one pass over the whole mirrored image (``preprocess.pad_for_model``).
- ``padding=1`` (same-size convolutions): tiles overlap and their class probabilities are blended
  with a Gaussian importance map (sigma = tile side / 8, as in nnU-Net and MONAI), because pixels
  near a tile's edge see zero padding instead of the image.

Tiles start at multiples of ``2**depth`` px in the mirrored image, so every pooling sees the same
2x2 windows as in a whole-image pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from skimage import measure, segmentation
from torch import Tensor, nn

from model import UNet, output_size, valid_input_sizes
from segmentation.config import UserError
from segmentation.console import note
from segmentation.data.preprocess import (
    mirrored_indices,
    network_margin,
    resize_image,
    scaled_size,
    take_window,
)
from segmentation.data.readers import object_instances
from segmentation.device import bf16_supported, memory_description, release_cached_memory
from segmentation.inference.objects import ObjectRules, cleaned_objects, objects_from_boundary_probabilities
from segmentation.metrics import image_scores, pool_scores
from segmentation.plan import DEFAULT_PREDICT_TILE, Plan
from segmentation.settings import AugmentSettings, PredictSettings

CANDIDATE_THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)  # what predict.threshold: auto tries
DIHEDRAL = [(turns, flip) for flip in (False, True) for turns in range(4)]  # (quarter turns, left-right flip)


def predict_probabilities(
    model: UNet,
    image: Tensor,
    tile_size: int | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    tta: bool | Sequence[tuple[int, bool]] = False,
    amp: bool = True,
    image_scale: float = 1.0,
) -> Tensor:
    """Class probabilities of a whole image of any size, predicted tile by tile.

    Parameters
    ----------
    model : UNet
        The network (or any module with the attributes ``image_channels``, ``num_classes``,
        ``depth`` and ``padding`` of ``UNet`` that returns (B, num_classes, h, w) logits). It runs
        on the device of its parameters, in eval mode; its train/eval mode is restored afterwards.
    image : torch.Tensor
        (C, H, W) float image, normalised as for training (``preprocess.normalize_image``),
        C = ``model.image_channels``, any H, W >= 1, on any device.
    tile_size : int, optional
        Side of the network's input tiles in px, rounded up to a valid input size (see
        ``model.valid_input_sizes``): the largest tile, which bounds memory. Default 572 for
        padding 0 (388 px output tiles at depth 4) and 512 for padding 1. Along each axis the
        tiles then shrink to the smallest valid size that covers the image with as few tiles, so
        an image smaller than a tile takes one tile of its own (mirror-padded) size.
    overlap : float, optional
        Fraction of a tile shared with its neighbour, in [0, 1), for padding 1; the stride is
        rounded down to a multiple of ``2**depth`` px. Ignored for padding 0, where output tiles
        need no overlap.
    batch_size : int, optional
        Tiles per forward pass.
    tta : bool or sequence of (int, bool), optional
        Test-time augmentation: average the probabilities over transforms of each tile. True: the 8
        rotations and reflections; or the ``(quarter turns, left-right flip)`` pairs to use, such as
        ``tta_transforms(augment)``, the ones the model was trained to handle.
    amp : bool, optional
        On CUDA, run the network under autocast in bfloat16 (float16 where the GPU lacks
        bfloat16). Softmax and blending are always float32; no autocast on other devices.
    image_scale : float, optional
        ``train.image_scale`` of a model trained on rescaled images: the image is resized by this
        factor first (``preprocess.resize_image``), and the probabilities are resized back
        (bilinearly) to (H, W).

    Returns
    -------
    torch.Tensor
        (num_classes, H, W) float32 softmax probabilities on the CPU, summing to 1 over classes.
        The CPU keeps device memory independent of the image size.

    Raises
    ------
    ValueError
        If ``image`` is not (C, H, W) with C = ``model.image_channels``, or an argument is out of
        range.

    Notes
    -----
    With padding 0 and a per-pixel normalisation ("layer", "batch", "none") the result equals,
    up to float rounding, the softmax of one forward pass over ``preprocess.pad_for_model(image)``
    cropped to (H, W), whatever the tile size: the tile size trades memory for the work spent on
    the context margins of the tiles. "group" and "instance" normalise over each tile instead.
    """
    if image.ndim != 3 or min(image.shape[-2:]) < 1:
        raise ValueError(f"image must be a (C, H, W) tensor with H, W >= 1, got shape {tuple(image.shape)}")
    if image.shape[0] != model.image_channels:
        raise ValueError(
            f"image has {image.shape[0]} channels but the model expects {model.image_channels} (unet.image_channels)"
        )
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if image_scale != 1:
        resized = resize_image(image.float(), scaled_size(*image.shape[-2:], image_scale))
        probabilities = predict_probabilities(model, resized, tile_size, overlap, batch_size, tta, amp)
        return F.interpolate(probabilities[None], size=tuple(image.shape[-2:]), mode="bilinear", align_corners=False)[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")

    depth, padding = model.depth, model.padding
    period = 2**depth
    margin = network_margin(depth, padding)
    height, width = image.shape[-2:]
    # The output frame over the mirrored input of ``pad_for_model``: pixel (i, j) of the network's
    # output lies over image pixel (i, j), for any tile that starts at a multiple of the period. Tiles
    # are cut from the image with mirrored indices, so the mirrored copy is never made.
    source = image.detach().float().cpu().numpy()
    frame = tuple(valid_input_sizes(side + 2 * margin, depth, padding)[1] - 2 * margin for side in (height, width))

    # The largest tile's output must reach at least one period so that tiles can move.
    requested = DEFAULT_PREDICT_TILE[padding] if tile_size is None else tile_size
    largest = output_size(valid_input_sizes(max(requested, period + 2 * margin), depth, padding)[1], depth, padding)
    smallest = output_size(valid_input_sizes(1, depth, padding)[1], depth, padding)
    (tile_height, tops), (tile_width, lefts) = (
        _axis_tiles(side, largest, smallest, period, 1.0 if padding == 0 else 1 - overlap) for side in frame
    )
    positions = [(top, left) for top in tops for left in lefts]
    weight = gaussian_importance_map(tile_height, tile_width) if padding else None

    device = next(model.parameters()).device
    total = torch.zeros(getattr(model, "out_channels", model.num_classes), *frame)
    # padding 0: output tiles meet or overlap with equal values, so each is written, not blended
    weight_sum = torch.zeros(frame) if padding else None
    with evaluating(model), torch.inference_mode():
        for first in range(0, len(positions), batch_size):
            batch = positions[first : first + batch_size]
            tiles = torch.stack(
                [
                    torch.from_numpy(
                        take_window(
                            source,
                            mirrored_indices(top - margin, tile_height + 2 * margin, height),
                            mirrored_indices(left - margin, tile_width + 2 * margin, width),
                        )
                    )
                    for top, left in batch
                ]
            )
            probabilities = _predict_tiles(model, tiles.to(device), tta, amp).cpu()
            for (top, left), tile_probabilities in zip(batch, probabilities):
                if weight_sum is None:
                    total[:, top : top + tile_height, left : left + tile_width] = tile_probabilities
                else:
                    total[:, top : top + tile_height, left : left + tile_width] += tile_probabilities * weight
                    weight_sum[top : top + tile_height, left : left + tile_width] += weight
    if weight_sum is not None:
        total /= weight_sum  # in place: the result is the size of the image, not a second copy of it
    return total[:, :height, :width]


class Predictor:
    """A U-Net predicting whole images as its run's plan and the ``predict`` settings say, and deciding
    their pixels' classes.

    Parameters
    ----------
    model : UNet
        The network, on its device.
    plan : Plan
        The run's plan (``segmentation.plan``), with the ``predict`` settings in force on top
        (``Plan.for_prediction``): the largest input tile, the decision threshold of two classes, and the
        rules that clean objects (while they are active, or the network has the boundary class, the mask
        of class 1 is that of the objects).
    settings : PredictSettings
        The config's ``predict`` section: overlap, batch size, test-time scales, the watershed cut.
    image_scale : float, optional
        ``train.image_scale`` of the model: images are predicted at ``image_scale`` times each of
        ``settings.scales``, and the probabilities averaged.
    transforms : bool or sequence of (int, bool), optional
        Test-time augmentation, as ``predict_probabilities`` takes it (``tta_transforms``).

    The predictor keeps its own ``batch_size`` (from ``settings.batch_size``): when the device runs out
    of memory it is halved, down to 1 with a note, and the image predicted again; the smaller batch
    stays for the next images, and the settings stay as they were resolved.
    """

    def __init__(
        self,
        model: UNet,
        plan: Plan,
        settings: PredictSettings,
        image_scale: float = 1.0,
        transforms: bool | Sequence[tuple[int, bool]] = False,
    ):
        self.model, self.plan, self.settings, self.image_scale, self.transforms = (
            model,
            plan,
            settings,
            image_scale,
            transforms,
        )
        self.rules = ObjectRules(plan.min_object_size, plan.fill_holes)
        self.threshold = plan.threshold
        self.batch_size = settings.batch_size

    @classmethod
    def from_plan(
        cls,
        model: UNet,
        plan: Plan,
        predict: PredictSettings,
        augment: AugmentSettings,
        image_scale: float = 1.0,
        tta: bool = False,
    ) -> Predictor:
        """The predictor of a run's ``plan`` with the values that ``predict`` sets on top, and test-time
        augmentation where ``predict.tta`` or ``tta`` asks for it, over the transforms that the ``augment``
        section trained the model for (``tta_transforms``)."""
        transforms = tta_transforms(augment) if tta or predict.tta else False
        return cls(model, plan.for_prediction(predict), predict, image_scale, transforms)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def probabilities(self, image: Tensor) -> Tensor:
        """(K, H, W) float32 probabilities of the network's outputs on the CPU (K = ``model.out_channels``:
        the classes, then the boundary where the network has it) of a (C, H, W) normalised image (on any
        device): ``predict_probabilities`` at each test-time scale, averaged."""
        scales, tile_size = self.settings.scales, self.plan.predict_tile_size
        while True:
            try:
                # summed in place: an image's probabilities can be large, and one scale (the default) adds no copy
                total = None
                for factor in scales:
                    probabilities = predict_probabilities(
                        self.model,
                        image,
                        tile_size,
                        self.settings.overlap,
                        self.batch_size,
                        self.transforms,
                        image_scale=self.image_scale * factor,
                    )
                    total = probabilities if total is None else total.add_(probabilities)
                return total.div_(len(scales))
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise UserError(self.memory_advice(tile_size)) from None
                release_cached_memory(self.device)
                self.batch_size //= 2
                note(
                    f"out of memory predicting on {self.device}: predict.batch_size is now {self.batch_size} "
                    "(tiles per forward pass), retrying"
                )

    def class_probabilities(self, probabilities: Tensor) -> Tensor:
        """(num_classes, H, W) probabilities of the user's classes: the boundary's joins class 1, the objects."""
        if probabilities.shape[0] == self.model.num_classes:
            return probabilities
        return torch.stack([probabilities[0], probabilities[1:].sum(0)])

    @property
    def decides_by_objects(self) -> bool:
        """Whether the mask of two classes is that of the objects (cleaned, or grown from the boundary's seeds)."""
        return self.model.num_classes == 2 and (self.rules.active or self.model.boundary_class)

    def classes(self, probabilities: Tensor, objects: np.ndarray | None = None) -> Tensor:
        """(H, W) int64 class indices of the network's (K, H, W) probabilities: class 1 where ``objects``
        (``self.objects`` of the same probabilities, where the caller has them) are, or where the predictor
        decides by objects; else as ``predicted_classes`` decides them at the predictor's threshold and with
        the watershed cut (whose class 1 the uncleaned objects cover exactly)."""
        if objects is None and self.decides_by_objects:
            objects = self.objects(probabilities)
        if objects is not None:
            return torch.from_numpy(objects > 0).long()
        settings, probabilities = self.settings, self.class_probabilities(probabilities)
        return predicted_classes(probabilities, self.threshold, settings.watershed_seeds, settings.watershed_min_seed)

    def objects(self, probabilities: Tensor) -> np.ndarray:
        """(H, W) int32 object ids (0 = none) of two classes' (K, H, W) probabilities: grown from the
        insides where the network has the boundary class, else the 4-connected components of class 1
        (after the watershed cut), then cleaned by the predictor's ``rules``."""
        settings = self.settings
        if self.model.boundary_class:
            ids = objects_from_boundary_probabilities(
                probabilities.numpy(), self.threshold, settings.watershed_min_seed
            )
        else:
            classes = predicted_classes(
                probabilities, self.threshold, settings.watershed_seeds, settings.watershed_min_seed
            ).numpy()
            ids = object_instances(classes)
        return cleaned_objects(ids, self.rules) if self.rules.active else ids

    def memory_advice(self, tile_size: int) -> str:
        """The one line for running out of memory with a batch of one tile."""
        smaller = self.model.valid_input_size(max(tile_size // 2, 1))
        return (
            f"out of memory while predicting on {memory_description(self.device)} with predict.batch_size=1, "
            f"predict.tile_size={tile_size}: lower predict.tile_size (e.g. {smaller}), "
            "or predict on the CPU with train.device=cpu"
        )


def predicted_classes(
    probabilities: Tensor, threshold: float = 0.5, watershed_seeds: float | None = None, min_seed_area: int = 0
) -> Tensor:
    """(H, W) int64 class indices from (K, H, W) probabilities on the CPU.

    For two classes, class 1 where its probability >= ``threshold``; with ``watershed_seeds``, regions
    of class 1 that touch through thin gaps are then cut apart (``separate_cells``, from seeds of at
    least ``min_seed_area`` pixels). For more classes, the most probable class.
    """
    if probabilities.shape[0] != 2:
        return probabilities.argmax(0)
    cells = probabilities[1].numpy() >= threshold
    if watershed_seeds is not None:
        cells = separate_cells(cells, probabilities[1].numpy(), watershed_seeds, min_seed_area)
    return torch.from_numpy(cells).long()


def uniform_prediction_note(names: list[str], total: int, where: str) -> str:
    """The one line for predictions that are a single class everywhere (``names``: those images, of
    ``total`` in ``where``), naming the likely causes and what to check."""
    which = f"all {total}" if len(names) == total else f"{len(names)} of {total} (e.g. {names[0]})"
    return (
        f"{which} {where} are predicted as a single class everywhere: check how the masks were read (python "
        "dataset.py check DATA; "
        "train.mask_type, mask_values, mask_colors), the class balance (train.class_weights: balanced), and "
        "predict.threshold; early in training it can pass"
    )


def separate_cells(
    cells: np.ndarray, cell_probability: np.ndarray, seed_threshold: float, min_seed_area: int = 0
) -> np.ndarray:
    """Cut touching cells apart with 1-px lines of class 0, by a seeded watershed.

    A gap of a few pixels in a predicted membrane merges two cells into one connected component,
    which the ISBI Rand error punishes hard. Seeds are the 4-connected components where the cell
    probability >= ``seed_threshold`` (cell centres, which the network is sure of) that cover at
    least ``min_seed_area`` pixels: the textured inside of a cell (organelles, vesicles) leaves small
    islands of high probability, and each would cut a piece off its cell. Each seed floods the
    predicted cells downhill in probability, and where two floods meet, the line between them
    becomes class 0. A component of ``cells`` without a seed is kept whole. Returns a boolean (H, W)
    mask, a subset of ``cells``.
    """
    seeds = measure.label(cells & (cell_probability >= seed_threshold), connectivity=1)
    too_small = np.bincount(seeds.ravel()) < min_seed_area
    too_small[0] = False
    seeds[too_small[seeds]] = 0
    components = measure.label(cells, connectivity=1)
    unseeded = np.setdiff1d(np.unique(components[cells]), np.unique(components[seeds > 0]))
    extra = np.isin(components, unseeded)
    seeds[extra] = components[extra] + seeds.max()
    regions = segmentation.watershed(-cell_probability, seeds, mask=cells, connectivity=1, watershed_line=True)
    return regions > 0


def calibrate_threshold(
    cell_probabilities: list[np.ndarray],
    labels: list[np.ndarray],
    metric: str,
    watershed_seeds: float | None = None,
    min_seed_area: int = 0,
    thresholds: np.ndarray = CANDIDATE_THRESHOLDS,
) -> tuple[float, list[dict[str, float]]]:
    """The threshold on the class-1 probability that gives the best ``metric`` on the given images.

    Parameters
    ----------
    cell_probabilities : (H, W) float arrays, the class-1 probabilities of each image.
    labels : (H, W) int arrays of 0/1, the true classes (``losses.IGNORE_LABEL`` where not annotated: not scored).
    metric : ``pixel_error``, ``dice``, ``iou``, ``rand_error`` or ``vi``, pooled as in ``pool_scores``.
    watershed_seeds, min_seed_area : as in ``predicted_classes``.
    thresholds : the candidates.

    Returns
    -------
    The best threshold (the one nearest 0.5 among equals) and, per candidate, ``{"threshold", ...scores}``.
    """
    images = [
        (torch.from_numpy(np.stack([1 - probability, probability])), torch.from_numpy(np.asarray(label)))
        for probability, label in zip(cell_probabilities, labels)
    ]
    table = []
    for threshold in thresholds:
        confusion = torch.zeros(2, 2, dtype=torch.int64)
        cells = []
        for two_class, label in images:
            classes = predicted_classes(two_class, float(threshold), watershed_seeds, min_seed_area)
            image_confusion, image_cells = image_scores(classes, label, 2)
            confusion += image_confusion
            cells.append(image_cells)
        table.append({"threshold": float(threshold), **pool_scores(confusion, cells)})
    sign = -1 if metric in ("dice", "iou") else 1
    best = min(table, key=lambda row: (sign * row[metric], abs(row["threshold"] - 0.5)))
    return best["threshold"], table


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block, then restore every submodule's own flag.

    Restoring per submodule rather than calling ``model.train(was_training)`` keeps a deliberately
    mixed state intact, e.g. a network trained with frozen (eval-mode) BatchNorm layers.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def gaussian_importance_map(height: int, width: int) -> Tensor:
    """(height, width) float32 blending weights: a Gaussian centred on the tile, sigma = side / 8 per axis.

    The peak is 1; the smallest weight, at a corner, is about exp(-16) = 1e-7, far above float32's
    underflow, so a pixel that only a tile's corner reaches still gets that tile's prediction. Unlike
    MONAI we set no floor (nnU-Net does not either): one as large as 1e-3 would give the corners of
    tiles along the image border as much weight as the inner parts of their neighbours there.
    """
    axes = [
        torch.exp(-0.5 * ((torch.arange(side, dtype=torch.float32) - (side - 1) / 2) / (side / 8)) ** 2)
        for side in (height, width)
    ]
    return torch.outer(*axes)


def _axis_tiles(
    frame_side: int, largest: int, smallest: int, period: int, stride_fraction: float
) -> tuple[int, list[int]]:
    """Output side of the tiles along one axis of the output frame, and where they start.

    Tile output sides are valid ones, ``smallest + k * period`` px up to ``largest``; strides are
    ``stride_fraction`` of a tile rounded down to a multiple of ``period``, and the last tile ends
    at the frame's border. We take the smallest tiles that still cover the frame with as few tiles
    as the largest need: a 516 px frame takes two 260 px tiles rather than two of 388 px that
    overlap by 260 px, and a frame smaller than a tile takes one tile of its own size.
    """

    def stride(side: int) -> int:
        return max(period, int(side * stride_fraction) // period * period)

    def starts(side: int) -> list[int]:
        return [*range(0, frame_side - side, stride(side)), frame_side - side]

    count = len(starts(largest))
    side = smallest
    # Frame sides are valid output sides too, so a single tile stops exactly at the frame's size.
    while side < frame_side and (side < period or (count - 1) * stride(side) + side < frame_side):
        side += period
    return side, starts(side)


def tta_transforms(augment: AugmentSettings) -> list[tuple[int, bool]]:
    """The ``(quarter turns, left-right flip)`` pairs of test-time augmentation that the training
    augmentation (a config's ``augment`` section) covered: all 8 with 90-degree turns (or rotations of
    90 degrees and more), the 4 flips and half turn with both flips, identity and the left-right flip
    with left-right flips only (upright scenes such as pedestrians), else the identity alone."""
    if augment.rotate90 or augment.rotation >= 90:
        return DIHEDRAL
    if augment.flip and augment.vertical_flip:
        return [(0, False), (0, True), (2, False), (2, True)]  # (2, True) is the upside-down flip
    if augment.flip:
        return [(0, False), (0, True)]
    return [(0, False)]


def _predict_tiles(model: UNet, tiles: Tensor, tta: bool | Sequence[tuple[int, bool]], amp: bool) -> Tensor:
    """Float32 softmax of the model on a (B, C, h, w) batch, averaged over the ``tta`` transforms."""
    transforms = (DIHEDRAL if tta is True else list(tta)) if tta else [(0, False)]
    total = 0
    for turns, flip in transforms:
        transformed = (tiles.flip(-1) if flip else tiles).rot90(turns, (-2, -1))
        with _autocast(tiles.device, amp):
            logits = model(transformed)
        probabilities = logits.float().softmax(1).rot90(-turns, (-2, -1))
        total = total + (probabilities.flip(-1) if flip else probabilities)
    return total / len(transforms)


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast (float16 before Ampere) on CUDA when ``amp``; nothing otherwise."""
    if not (amp and device.type == "cuda"):
        return contextlib.nullcontext()
    # Older GPUs only emulate bfloat16, slowly (torch.cuda.is_bf16_supported() counts that as support).
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if bf16_supported(device) else torch.float16)
