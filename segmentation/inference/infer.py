"""Whole-image and whole-volume inference by tiles, for images and volumes of any size.

``predict_probabilities`` runs a U-Net over a (C, H, W) image, or a (C, D, H, W) volume for a 3D network, in
tiles, a few at a time, so that device memory is bounded by ``batch_size`` tiles whatever the image size;
``predict_slabs`` does it for a volume larger than memory (a memory-mapped stack), slab by slab along z.

- ``padding=0`` (the paper's valid convolutions): the overlap-tile strategy of Ronneberger et al.
  (2015, Fig. 2). The image is mirrored at its borders by the network's context margin and output
  tiles are laid side by side. Every output pixel sees its full context, so the tiles join without
  seams: the result equals one pass over the whole mirrored image (``preprocess.pad_for_model``).
- ``padding=1`` (same-size convolutions): tiles overlap and their class probabilities are blended
  with a Gaussian importance map (sigma = tile side / 8 per axis, as in nnU-Net and MONAI), because
  pixels near a tile's edge see zero padding instead of the image.

Along each axis tiles start at multiples of the product of its pooling factors (``2**depth`` px for the paper's
network) in the mirrored image, so every pooling sees the same windows as in a whole-image pass; margins, periods
and valid sizes are those of the axis (``UNet.axis``), which differ along z in anisotropic 3D networks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F
from skimage import measure, segmentation
from torch import Tensor, nn

from model import UNet
from segmentation.config import UserError
from segmentation.console import note
from segmentation.data.preprocess import resize_image, scaled_size, take_window
from segmentation.data.readers import object_instances
from segmentation.device import bf16_supported, memory_description, release_cached_memory
from segmentation.inference.objects import ObjectRules, cleaned_objects, objects_from_boundary_probabilities
from segmentation.inference.tiles import SlabAccumulator, TileGrid, tile_grid
from segmentation.metrics import image_scores, pool_scores
from segmentation.plan import Plan
from segmentation.settings import AugmentSettings, PredictSettings

CANDIDATE_THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)  # what predict.threshold: auto tries
DIHEDRAL = [(turns, flip) for flip in (False, True) for turns in range(4)]  # (quarter turns, left-right flip)


def predict_probabilities(
    model: UNet,
    image: Tensor,
    tile_size: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    tta: bool | Sequence[tuple[int, bool]] = False,
    amp: bool = True,
    image_scale: float = 1.0,
) -> Tensor:
    """Class probabilities of a whole image or volume of any size, predicted tile by tile.

    Parameters
    ----------
    model : UNet
        The network (or any module with the attributes ``image_channels``, ``num_classes``,
        ``depth`` and ``padding`` of ``UNet`` that returns (B, num_classes, h, w) logits; ``dims``
        and ``axis`` where it is not a 2D network of the paper's kernel and pooling sizes). It runs
        on the device of its parameters, in eval mode; its train/eval mode is restored afterwards.
    image : torch.Tensor
        (C, H, W) float image, or (C, D, H, W) volume for a model of ``dims`` 3, normalised as for
        training (``preprocess.normalize_image``), C = ``model.image_channels``, every spatial side
        >= 1, on any device.
    tile_size : int or sequence of int, optional
        Side of the network's input tiles in px, one for every axis or one per spatial axis, rounded
        up to a valid input size along the axis (see ``model.valid_input_sizes``): the largest tile,
        which bounds memory. Default for images 572 for padding 0 (388 px output tiles at depth 4)
        and 512 for padding 1; for volumes 96 per axis for padding 1 and, for padding 0, the valid
        size at or above 116 (``tiles.DEFAULT_VOLUME_TILE``). Along each axis the tiles then shrink to
        the smallest valid size that covers the image with as few tiles, so an image smaller than a
        tile takes one tile of its own (mirror-padded) size.
    overlap : float, optional
        Fraction of a tile shared with its neighbour, in [0, 1), for padding 1; the stride is
        rounded down to a multiple of the axis' pooling period (``2**depth`` px). Ignored for
        padding 0, where output tiles need no overlap.
    batch_size : int, optional
        Tiles per forward pass.
    tta : bool or sequence of (int, bool), optional
        Test-time augmentation: average the probabilities over transforms of each tile. True: the 8
        rotations and reflections; or the ``(quarter turns, left-right flip)`` pairs to use, such as
        ``tta_transforms(augment)``, the ones the model was trained to handle. They act on the last
        two axes (H, W); volumes are never flipped along z, which training does not augment either.
    amp : bool, optional
        On CUDA, run the network under autocast in bfloat16 (float16 where the GPU lacks
        bfloat16). Softmax and blending are always float32; no autocast on other devices.
    image_scale : float, optional
        ``train.image_scale`` of a model trained on rescaled images: the image (each z-plane of a
        volume; D is not scaled) is resized by this factor first (``preprocess.resize_image``), and
        the probabilities are resized back to (H, W) bilinearly, or to (D, H, W) trilinearly.

    Returns
    -------
    torch.Tensor
        (num_classes, H, W) or (num_classes, D, H, W) float32 softmax probabilities on the CPU,
        summing to 1 over classes. The CPU keeps device memory independent of the image size.

    Raises
    ------
    ValueError
        If ``image`` is not (C, H, W), or (C, D, H, W) for a 3D model, with C =
        ``model.image_channels``, or an argument is out of range.

    Notes
    -----
    With padding 0 and a per-pixel normalisation ("layer", "batch", "none") the result equals,
    up to float rounding, the softmax of one forward pass over ``preprocess.pad_for_model(image)``
    cropped to (H, W), whatever the tile size: the tile size trades memory for the work spent on
    the context margins of the tiles. "group" and "instance" normalise over each tile instead.
    The probabilities are ``predict_slabs``' slabs put together.
    """
    _check_image(tuple(image.shape), model, "tensor")
    if image_scale != 1:
        return _predict_rescaled(model, image, image_scale, tile_size, overlap, batch_size, tta, amp)
    source = image.detach().float().cpu().numpy()
    probabilities = torch.empty(getattr(model, "out_channels", model.num_classes), *source.shape[1:])
    for start, slab in predict_slabs(model, source, None, tile_size, overlap, batch_size, tta, amp):
        probabilities[:, start : start + slab.shape[1]] = slab
    return probabilities


def predict_slabs(
    model: UNet,
    source: np.ndarray,
    normalize: Callable[[np.ndarray], np.ndarray] | None = None,
    tile_size: int | Sequence[int] | None = None,
    overlap: float = 0.25,
    batch_size: int = 4,
    tta: bool | Sequence[tuple[int, bool]] = False,
    amp: bool = True,
) -> Iterator[tuple[int, Tensor]]:
    """Class probabilities of a volume that may be larger than memory, slab by slab along z as the tiles finish.

    Parameters
    ----------
    model : UNet
        The network, as ``predict_probabilities`` takes it.
    source : array_like
        (C, D, H, W) raw volume of any numeric dtype (a NumPy array, or an ``np.memmap`` such as
        ``tifffile.memmap`` of a stack on disk), or a (C, H, W) image for a 2D model, whose slabs are
        then bands of rows. Only the block each tile spans is read.
    normalize : callable, optional
        Applied to each tile's input window, a (C, d, h, w) float32 array cut from ``source`` with
        its mirrored context, returning the same shape: the training normalisation with statistics
        of the whole volume, e.g. ``lambda window: (window - mean) / std`` with the mean and std of
        ``preprocess.volume_statistics``. None: ``source`` is already normalised.
    tile_size, overlap, batch_size, tta, amp
        As in ``predict_probabilities``.

    Yields
    ------
    z_start : int
        The first plane of the slab.
    probabilities : torch.Tensor
        (num_classes, slab_depth, H, W) float32 softmax probabilities on the CPU. Slabs come in order
        of z and cover 0 .. D - 1 exactly once; each is yielded as soon as no later tile reaches it.

    Notes
    -----
    Tiles are predicted in z order. Besides ``batch_size`` tiles, memory holds the sums of the tiles
    along one tile depth of the volume (num_classes + 1 float32 values per voxel of a (tile depth,
    H, W) block), never the whole volume.
    """
    _check_image(tuple(source.shape), model, "array")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
    transforms, grid = _tta_pairs(model, tta), tile_grid(model, source.shape[1:], tile_size, overlap)
    slabs = SlabAccumulator(getattr(model, "out_channels", model.num_classes), grid, blend=model.padding == 1)
    positions, device = list(product(*grid.starts)), next(model.parameters()).device
    for first in range(0, len(positions), batch_size):
        batch = positions[first : first + batch_size]
        tiles = torch.stack([torch.from_numpy(_window(source, grid, position, normalize)) for position in batch])
        # inside the with block only: a generator's caller must not run in inference mode while it waits
        with evaluating(model), torch.inference_mode():
            probabilities = _predict_tiles(model, tiles.to(device), transforms, amp).cpu()
        for position, tile_probabilities in zip(batch, probabilities):
            yield from slabs.release(position[0])  # no later tile starts before this one along z
            slabs.add(position, tile_probabilities)
    yield from slabs.release(grid.frame[0])


def _window(
    source: np.ndarray, grid: TileGrid, position: tuple[int, ...], normalize: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray:
    """(C, *input tile) float32 input of the tile at ``position``, cut from ``source`` and normalised."""
    window = take_window(source, *grid.window(position)).astype(np.float32, copy=False)
    return window if normalize is None else np.asarray(normalize(window), dtype=np.float32)


def _check_image(shape: tuple[int, ...], model: UNet, kind: str) -> None:
    """Raise a ValueError unless ``shape`` is (C, H, W) for a 2D model or (C, D, H, W) for a 3D one, C its channels."""
    dims = getattr(model, "dims", 2)
    axes = "H, W" if dims == 2 else "D, H, W"
    if len(shape) != dims + 1 or min(shape[1:]) < 1:
        raise ValueError(
            f"image must be a (C, {axes}) {kind} with {axes} >= 1 for a {dims}D model (unet.dims: {dims}), "
            f"got shape {shape}"
        )
    if shape[0] != model.image_channels:
        raise ValueError(
            f"image has {shape[0]} channels but the model expects {model.image_channels} (unet.image_channels)"
        )


def _predict_rescaled(model: UNet, image: Tensor, image_scale: float, *settings) -> Tensor:
    """``predict_probabilities`` (with its ``settings`` from ``tile_size`` on) of ``image`` resized by
    ``image_scale`` in H and W (each z-plane of a volume), resized back bilinearly (trilinearly for volumes)."""
    size = scaled_size(*image.shape[-2:], image_scale)
    if image.ndim == 3:
        resized = resize_image(image.float(), size)
    else:
        resized = torch.stack([resize_image(image[:, plane].float(), size) for plane in range(image.shape[1])], 1)
    probabilities = predict_probabilities(model, resized, *settings)
    mode = "bilinear" if image.ndim == 3 else "trilinear"
    return F.interpolate(probabilities[None], size=tuple(image.shape[1:]), mode=mode, align_corners=False)[0]


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
        scales, tile_size = self.settings.scales, self.plan.predict_tile
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
                probabilities.numpy(), self.threshold, settings.watershed_min_seed, settings.watershed_seeds
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


def _tta_pairs(model: UNet, tta: bool | Sequence[tuple[int, bool]]) -> list[tuple[int, bool]]:
    """The ``(quarter turns, left-right flip)`` pairs that ``tta`` asks for; odd turns swap H and W, so they need
    the same kernel and pooling sizes along both."""
    transforms = (DIHEDRAL if tta is True else list(tta)) if tta else [(0, False)]
    if any(turns % 2 for turns, _ in transforms) and hasattr(model, "axis") and model.axis(-2) != model.axis(-1):
        raise ValueError(
            "tta with quarter turns swaps H and W, whose kernel or pooling sizes differ in this model: "
            "use pairs of 0 or 2 turns"
        )
    return transforms


def _predict_tiles(model: UNet, tiles: Tensor, transforms: Sequence[tuple[int, bool]], amp: bool) -> Tensor:
    """Float32 softmax of the model on a (B, C, h, w) or (B, C, d, h, w) batch, averaged over the ``transforms``
    in the last two axes."""
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
