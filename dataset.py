"""Data sets for training: the configured images, split, as random overlap-tiles and as whole images.

The images of ``train.dataset_name`` are listed without reading them and split into training,
validation and test images; each is preprocessed once into the cache (``cache.py``) and read from
there lazily: training tiles one at a time, validation and test images one whole image at a time,
so memory does not grow with the number of images.

    python dataset.py download {pennfudan,isbi2012} [--to data/]   # get the public data sets
    python dataset.py check PATH                                    # a data set's fingerprint and config lines
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from segmentation.config import UserError
from segmentation.console import note as console_note
from segmentation.data.cache import BOUNDARY, PreparedImage, PreprocessingSettings, prepare_images
from segmentation.data.preprocess import mirrored_indices, take_window
from segmentation.data.readers import LISTED_VALUES, read_folder_pairs, read_isbi2012, read_pennfudan
from segmentation.data.synthetic import SyntheticSample
from segmentation.data.synthetic_volumes import SyntheticVolumeSample
from segmentation.data.weight_maps import add_class_weights
from segmentation.plan import Plan, class_totals, decide_plan
from segmentation.settings import DataSettings, PredictSettings, UNetSettings


class TileDataset(Dataset):
    """Random training tiles with their labels and weight maps (overlap-tile, paper Fig. 2), cut from
    the cached images.

    Item ``i`` is a tile of image ``i // samples_per_image`` at a random position. The sampler passes
    ``epoch * len(dataset) + i`` as the key, and each item's randomness comes from ``(seed, epoch, i)``
    alone, so an epoch is the same with any number of (persistent) loader workers and after a resume.

    Parameters
    ----------
    images : the training images' cache entries (``cache.PreparedImage``).
    class_weights : (K,) weights ``w_c`` added to each entry's border term, or None for all ones.
    tile_size : network input side in px; ``output_size`` : network output side in px for that input.
        For padding 0 the input tile reaches ``margin = (tile_size - output_size) / 2`` px beyond the
        labelled output tile on every side, mirrored where it leaves the image. Volumes: the sides per axis
        ``(depth, height, width)`` (an int: the same along every axis).
    samples_per_image : tiles per image per epoch.
    label_classes : the classes the network learns (``UNet.out_channels``): 2 folds the object borders that
        entries of object ids mark (``cache.BOUNDARY``) into their objects, 3 keeps them a class.

    Each item is ``(image (C, T, T) float32, label (T, T) int64, weight (T, T) float32)``, T =
    ``tile_size``: labels and weights cover the whole input tile (mirrored like the image), so that
    augmentation can move them with the image; the loss crops them to the output's centre; a volume's tiles
    have one more axis, (C, D, H, W) and (D, H, W). Only the tile's pixels are read from disk.
    """

    def __init__(
        self,
        images: Sequence[PreparedImage],
        class_weights: np.ndarray | None,
        tile_size: int | tuple[int, ...],
        output_size: int | tuple[int, ...],
        samples_per_image: int,
        seed: int,
        label_classes: int = 2,
    ):
        self.images, self.class_weights, self.label_classes = list(images), class_weights, label_classes
        self.margin = np.subtract(tile_size, output_size) // 2
        self.tile_size, self.output_size, self.samples_per_image, self.seed = (
            tile_size,
            output_size,
            samples_per_image,
            seed,
        )

    def __len__(self) -> int:
        return len(self.images) * self.samples_per_image

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self))
        rng = np.random.default_rng([self.seed, epoch, index])
        prepared = self.images[index // self.samples_per_image]
        corner = self.tile_position(prepared, rng)
        tiles, margins = self.per_axis(self.tile_size, prepared.dims), self.per_axis(self.margin, prepared.dims)
        indices = [
            mirrored_indices(start - margin, tile, side)
            for start, margin, tile, side in zip(corner, margins, tiles, prepared.shape)
        ]
        image, label, border = prepared.arrays()
        label_tile = folded(take_window(label, *indices), prepared, self.label_classes)
        border_tile = None if border is None else take_window(border, *indices)
        return (
            torch.from_numpy(take_window(image, *indices).astype(np.float32)),
            torch.from_numpy(label_tile.astype(np.int64)),
            torch.from_numpy(add_class_weights(label_tile, border_tile, self.class_weights)),
        )

    @staticmethod
    def per_axis(size: int | tuple[int, ...] | np.ndarray, dims: int) -> tuple[int, ...]:
        """A side given for every axis (an int) or per axis, as one int per axis of a ``dims``-D image."""
        return tuple(int(side) for side in np.broadcast_to(size, (dims,)))

    def tile_position(self, prepared: PreparedImage, rng: np.random.Generator) -> tuple[int, ...]:
        """Top left corner (px; (section, row, column) of a volume) of a random output tile inside the image
        (images smaller than it are mirrored up to its size; the input tile reaches ``margin`` px further,
        mirrored where it leaves the image). Of an image annotated in part, the tile holds an annotated pixel
        drawn at random (``PreparedImage.annotated_points``) at a random place: tiles are drawn where the
        annotations are."""
        outputs = self.per_axis(self.output_size, prepared.dims)
        last = [max(side, output) - output for side, output in zip(prepared.shape, outputs)]
        if not prepared.unannotated:
            return tuple(int(rng.integers(0, end + 1)) for end in last)
        points = prepared.annotated_points()
        point = points[int(rng.integers(0, len(points)))]
        same = len(set(outputs)) == 1  # one draw of all axes, as 2D runs have always drawn them
        offsets = rng.integers(0, outputs[0], size=len(outputs)) if same else [rng.integers(0, o) for o in outputs]
        return tuple(int(np.clip(at - offset, 0, end)) for at, offset, end in zip(point, offsets, last))


class WholeImageDataset(Dataset):
    """Whole images for validation and test, read from the cache one at a time:
    ``(image (C, H, W) float32, label (H, W) int64, weight (H, W) float32)``.

    Images of any size; ``infer.predict_probabilities`` mirrors and tiles them as the network needs.
    Labels are folded to ``label_classes`` as in ``TileDataset``.
    """

    def __init__(self, images: Sequence[PreparedImage], class_weights: np.ndarray | None, label_classes: int = 2):
        self.images, self.class_weights, self.label_classes = list(images), class_weights, label_classes
        self.names = [prepared.name for prepared in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image, label, border = self.images[index].arrays()
        label = folded(np.asarray(label), self.images[index], self.label_classes)
        weight = add_class_weights(label, None if border is None else np.array(border), self.class_weights)
        return (
            torch.from_numpy(np.array(image, dtype=np.float32)),
            torch.from_numpy(label.astype(np.int64)),
            torch.from_numpy(weight),
        )


def folded(label: np.ndarray, prepared: PreparedImage, label_classes: int) -> np.ndarray:
    """``label`` of an entry with the objects' borders (``cache.BOUNDARY``) folded into the objects for a
    network of two classes; other labels as they are (a copy: memory-mapped arrays stay unwritten)."""
    if prepared.has_boundary and label_classes == 2:
        return np.where(label == BOUNDARY, 1, label).astype(label.dtype)  # unannotated pixels stay unannotated
    return np.array(label)


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


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / validation split of ``count`` items; at least one of each."""
    if count < 2:
        raise UserError(f"need at least 2 images to hold one out for validation, found {count}")
    val_count = min(count - 1, max(1, round(count * val_fraction)))
    order = np.random.default_rng(seed).permutation(count).tolist()
    return sorted(order[val_count:]), sorted(order[:val_count])


def fold_indices(count: int, folds: int, fold: int, order: str, seed: int) -> list[int]:
    """The indices of fold ``fold`` of ``folds`` near-equal folds of ``count`` items (sizes differ by at
    most one): contiguous runs of indices for ``order`` contiguous, else a permutation drawn from ``seed``."""
    if count < folds:
        raise UserError(f"train.folds: {folds} folds need at least {folds} images, found {count}")
    # a stream of its own, so that the validation split (from the same seed) is not the same permutation
    indices = np.arange(count) if order == "contiguous" else np.random.default_rng([seed, folds]).permutation(count)
    return sorted(np.array_split(indices, folds)[fold].tolist())


def list_samples(
    data: DataSettings,
    num_classes: int,
    seed: int,
    image_channels: int = 1,
    note: Callable[[str], None] = console_note,
    dims: int = 2,
) -> tuple[list, list | None]:
    """``(training samples, validation samples or None)`` of the configured data set, not yet read
    (``readers.FileSample``, ``synthetic.SyntheticSample``; synthetic images drawn from ``seed``).

    Validation samples come from the data set's own split (Penn-Fudan's ``valid_*`` folders) or from
    ``train.val_data``; None means: split ``train.val_fraction`` off the training samples. A TIFF stack
    gives a sample per image, its pages read as ``unet.image_channels`` (``image_channels``) says
    (``images.tiff_image_pages``; how, where the user should know, goes to ``note``), and every file is
    refused from its header beyond ``train.max_image_pixels``. ``dims`` 3 (``unet.dims``): each TIFF stack is
    a volume (``readers.volume_samples``; ISBI 2012 one volume in blocks of sections), synthetic data are
    ``train.synthetic_images`` volumes (``synthetic_volumes``).
    """
    name, root = data.dataset_name, Path(data.data)
    reading = (image_channels, data.max_image_pixels, note, dims, data.spacing)
    if name == "synthetic":
        size, count = data.synthetic_size, data.synthetic_images
        samples = [SyntheticSample(f"synthetic {i}", seed, i, size, num_classes) for i in range(count)]
        if dims == 3:
            samples = [SyntheticVolumeSample(f"synthetic volume {i}", seed, i, size) for i in range(count)]
        val_samples = None
    else:
        if not root.exists():
            raise UserError(
                f"train.data: {root} not found; point it at the {name} data "
                f"(python dataset.py download {name} --to data/ helps get it)"
            )
        if name == "isbi2012":
            samples, val_samples = read_isbi2012(root, *reading), None
        elif name == "pennfudan":
            if dims == 3:
                raise UserError("unet.dims: 3 trains on volumes, and Penn-Fudan holds photographs: set unet.dims: 2")
            samples, val_samples = read_pennfudan(root, *reading[:3])
        else:
            samples, val_samples = read_folder_pairs(root / "images", root / "masks", "auto", *reading), None
    if data.val_data:
        val_root = Path(data.val_data)
        if name == "isbi2012":
            val_samples = read_isbi2012(val_root, *reading)
        else:
            val_samples = read_folder_pairs(val_root / "images", val_root / "masks", "auto", *reading)
    return samples, val_samples


def split_samples(
    data: DataSettings, count: int, own_validation: bool, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Indices of the training, validation and test images among ``count`` samples: test images from
    fold ``train.fold`` of ``train.folds`` or from ``train.test_images``, validation from
    ``train.val_images`` or a ``train.val_fraction`` of the rest drawn from the split seed
    (``train.split_seed``, else ``seed``; none where the data set brings its own validation images)."""
    split_seed = data.split_seed_or(seed)
    if data.folds:
        test_index = fold_indices(count, data.folds, data.fold, data.fold_order, split_seed)
    else:
        test_index = sorted(set(data.test_images or []))
    outside = [i for i in test_index if not 0 <= i < count]
    if outside:
        raise UserError(f"train.test_images: {outside} not among the {count} images (0..{count - 1})")
    pool = [i for i in range(count) if i not in test_index]
    if own_validation:
        train_index, val_index = pool, []
    elif data.val_images:
        val_index = sorted(set(data.val_images))
        outside = [i for i in val_index if not 0 <= i < count]
        if outside:
            raise UserError(f"train.val_images: {outside} not among the {count} images (0..{count - 1})")
        if set(val_index) & set(test_index):
            shared = sorted(set(val_index) & set(test_index))
            raise UserError(
                f"train.val_images and train.test_images share {shared}: an image is either validation or test"
            )
        train_index = [i for i in pool if i not in val_index]
    else:
        train_part, val_part = split_indices(len(pool), data.val_fraction, split_seed)
        train_index, val_index = [pool[i] for i in train_part], [pool[i] for i in val_part]
    if not train_index:
        raise UserError("train.val_images and train.test_images hold every image: leave some for training")
    return train_index, val_index, test_index


@dataclass
class PreparedData:
    """The configured images, split and in the preprocessing cache (``prepare_data``): the cache entries
    (``cache.PreparedImage``) of the ``train``, ``val`` and ``test`` images, from which a run's plan is
    decided (``plan.decide_plan``) and its datasets built (``build_datasets``)."""

    train: list[PreparedImage]
    val: list[PreparedImage]
    test: list[PreparedImage]


@dataclass
class DataSets:
    """What training needs from the data (``build_datasets``): ``train`` tiles, whole ``val`` and ``test``
    images (``test`` None without test images) and an ``example``: the normalised image (C, H, W), label
    (H, W) and weight map (H, W) of the first training image, for the weight-map figure."""

    train: TileDataset
    val: WholeImageDataset
    test: WholeImageDataset | None
    example: tuple[np.ndarray, np.ndarray, np.ndarray]


def prepare_data(
    data: DataSettings,
    image_channels: int,
    num_classes: int,
    seed: int,
    note: Callable[[str], None] = print,
    rank: int = 0,
    world_size: int = 1,
    dims: int = 2,
) -> PreparedData:
    """The configured images (``data``; ``unet.image_channels`` and ``num_classes``; ``train.seed`` draws
    the synthetic images and, without ``train.split_seed``, the split), split, preprocessed into the cache
    once (``cache.prepare_images``; under torchrun the processes ``rank`` of ``world_size`` share the work)
    and read lazily from there."""
    samples, val_samples = list_samples(data, num_classes, seed, image_channels, note, dims)
    split = split_samples(data, len(samples), own_validation=val_samples is not None, seed=seed)
    train_index, val_index, test_index = split
    val_samples = val_samples if val_samples is not None else [samples[i] for i in val_index]
    parts = [[samples[i] for i in train_index], val_samples, [samples[i] for i in test_index]]
    # training tiles come from rescaled images; validation and test images keep their size, and the
    # predictor rescales them on the way in and the probabilities on the way out
    scales = [data.image_scale] * len(parts[0]) + [1.0] * (len(parts[1]) + len(parts[2]))
    settings = PreprocessingSettings.from_settings(image_channels, num_classes, data)
    every = [sample for part in parts for sample in part]
    prepared = prepare_images(every, scales, settings, data.cache_dir, note, rank, world_size)
    if data.mask_type == "auto" and data.mask_values is None:
        prepared = one_mask_reading(every, prepared, scales, settings, data.cache_dir, note, rank, world_size)
    train_count, val_count = len(parts[0]), len(parts[1])
    result = PreparedData(
        prepared[:train_count], prepared[train_count : train_count + val_count], prepared[train_count + val_count :]
    )
    channels = sorted({image.source_channels for image in result.train + result.val})
    if channels != [image_channels]:
        found = " or ".join(map(str, channels))
        note(f"images have {found} channel(s) but unet.image_channels is {image_channels}: converting them")
    mapped = data.mask_values is not None or data.mask_colors is not None
    if data.mask_type == "auto" and not mapped and (data.dataset_name == "folder" or data.val_data):
        note(mask_decision(prepared))
    if data.ignore_value is not None or data.ignore_color is not None:
        result = annotated_only(result, note)
    return result


def annotated_only(prepared: PreparedData, note: Callable[[str], None]) -> PreparedData:
    """``prepared`` without the images that have no annotated pixel (one note names them), with a note where
    no mask holds the ignore value at all; a UserError where no training or validation image is left."""
    every = prepared.train + prepared.val + prepared.test
    if not any(image.unannotated for image in every):
        note("train.ignore_value (or ignore_color) is in no mask: every pixel is annotated")
    empty = [image.name for image in every if image.annotated == 0]
    if empty:
        named = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        note(f"{len(empty)} image(s) have no annotated pixel and are left out: {named}")
    kept = PreparedData(*([image for image in part if image.annotated] for part in vars(prepared).values()))
    for part in ("train", "val"):
        if not getattr(kept, part) and getattr(prepared, part):
            raise UserError(
                f"no {part} image has an annotated pixel (train.ignore_value marks every pixel of them): "
                "annotate some, or check train.ignore_value"
            )
    return kept


def build_datasets(
    prepared: PreparedData, plan: Plan, samples_per_image: int, seed: int, note: Callable[[str], None] = print
) -> DataSets:
    """The training tiles and whole validation and test images of ``prepared``, labelled, weighted and cut
    as the run's ``plan`` decided (its label classes, class weights and tile sizes), ``samples_per_image``
    random tiles per training image and epoch drawn from ``seed``; the data's summary line goes to ``note``."""
    classes = plan.label_classes
    note(data_summary(prepared.train, prepared.val, prepared.test, classes))
    weights = None if plan.class_weights is None else np.asarray(plan.class_weights, dtype=np.float32)
    tiles = TileDataset(prepared.train, weights, plan.tile_shape, plan.output_shape, samples_per_image, seed, classes)
    example = tuple(tensor.numpy() for tensor in WholeImageDataset(prepared.train[:1], weights, classes)[0])
    return DataSets(
        tiles,
        WholeImageDataset(prepared.val, weights, classes),
        WholeImageDataset(prepared.test, weights, classes) if prepared.test else None,
        example,
    )


def planned_datasets(
    unet: UNetSettings,
    data: DataSettings,
    predict: PredictSettings,
    seed: int,
    note: Callable[[str], None] = print,
) -> tuple[Plan, DataSets]:
    """A new run's data: the images prepared (``prepare_data``), the run's plan decided from them
    (``plan.decide_plan``) and the datasets it cuts (``build_datasets``)."""
    prepared = prepare_data(data, unet.image_channels, unet.num_classes, seed, note, dims=unet.dims)
    plan = decide_plan(unet, data, predict, prepared.train, note)
    return plan, build_datasets(prepared, plan, data.samples_per_image, seed, note)


def data_summary(
    train_images: Sequence[PreparedImage],
    val_images: Sequence[PreparedImage],
    test_images: Sequence[PreparedImage],
    classes: int = 2,
) -> str:
    """One line on the data a run trains on (``python dataset.py check`` says more): counts, sizes,
    channels and the class fractions of the training images, over the ``classes`` the network learns."""
    heights, widths = [image.shape[-2] for image in train_images], [image.shape[-1] for image in train_images]
    counts = class_totals(train_images, classes)
    channels = sorted({image.source_channels for image in train_images})
    fractions = ", ".join(f"{c}: {100 * count / counts.sum():.1f} %" for c, count in enumerate(counts))
    unannotated = sum(image.unannotated for image in train_images)
    kind, sections, axes = "images", "", "width x height"
    if train_images and train_images[0].dims == 3:
        depths = [image.shape[0] for image in train_images]
        kind, sections, axes = "volumes", f" x {min(depths)}-{max(depths)}", "width x height x sections"
    annotated = (
        f" of the {100 * (1 - unannotated / (unannotated + counts.sum())):.1f} % annotated" if unannotated else ""
    )
    return (
        f"data: {len(train_images)} training, {len(val_images)} validation, {len(test_images)} test images; "
        f"training {kind} {min(widths)}-{max(widths)} x {min(heights)}-{max(heights)}{sections} px ({axes}), "
        f"{'/'.join(map(str, channels))} channel(s), class fractions{annotated} {fractions}"
    )


def one_mask_reading(
    samples: Sequence,
    prepared: list[PreparedImage],
    scales: Sequence[float],
    settings: PreprocessingSettings,
    cache_dir: str,
    note: Callable[[str], None],
    rank: int,
    world_size: int,
) -> list[PreparedImage]:
    """``train.mask_type: auto`` reads each mask by its values; a data set is read one way. Where some
    masks hold object ids, masks of 0/1 are single objects: they are read (and cached) as ids too.
    Masks that read as classes otherwise (0/255, class indices) beside object ids are almost always a
    labelling error: a UserError names the odd masks, the values found in each, and the key to set."""
    ids = [index for index, entry in enumerate(prepared) if entry.mask_read_as == "instances"]
    classes = [index for index, entry in enumerate(prepared) if entry.mask_read_as == "classes"]
    single = [index for index in classes if set(prepared[index].mask_values) <= {0, 1}]
    mixed = [index for index in classes if index not in single]
    if ids and mixed:
        groups = [(ids, "hold object ids"), (mixed, "hold class values")]
        (odd, odd_kind), (usual, usual_kind) = sorted(groups, key=lambda group: len(group[0]))

        def described(index: int) -> str:
            return f"{prepared[index].name}: {shown_values(prepared[index].mask_values)}"

        named = "; ".join(described(index) for index in odd[:3]) + (f" and {len(odd) - 3} more" if len(odd) > 3 else "")
        raise UserError(
            f"train.mask_type auto: {len(odd)} of {len(prepared)} masks {odd_kind} ({named}) where {len(usual)} "
            f"{usual_kind} (e.g. {described(usual[0])}): a data set is read one way; fix the odd masks, or set "
            "train.mask_type: classes (values are classes) or instances (values are object ids)"
        )
    if not ids or not single:
        return prepared
    again = [dataclasses.replace(samples[index], mask_kind="instances") for index in single]
    rebuilt = prepare_images(again, [scales[index] for index in single], settings, cache_dir, note, rank, world_size)
    settled = list(prepared)
    for index, entry in zip(single, rebuilt):
        settled[index] = entry
    return settled


def shown_values(values: Sequence[float]) -> str:
    """A mask's first distinct values as text (``readers.LISTED_VALUES`` of them say there are more)."""
    shown = ", ".join(f"{value:g}" for value in values[: LISTED_VALUES - 1])
    return shown + (", ..." if len(values) >= LISTED_VALUES else "")


def mask_decision(prepared: Sequence[PreparedImage]) -> str:
    """The one line that says how ``train.mask_type: auto`` read the masks, and why."""
    instances = [image.name for image in prepared if image.mask_read_as == "instances"]
    classes = sum(image.mask_read_as == "classes" for image in prepared)
    if not instances:
        return (
            f"train.mask_type auto: read the {classes} masks as class indices (0/255 or values below "
            "unet.num_classes); set train.mask_type to decide yourself"
        )
    because = "two classes, and the masks hold other values than 0/1 or 0/255"
    and_classes = f", and {classes} as class indices" if classes else ""
    return (
        f"train.mask_type auto: read {len(instances)} of {len(prepared)} masks as one id per object, "
        f"foreground = id > 0, the ids feeding the border weights ({because}, e.g. {instances[0]}){and_classes}; "
        "set train.mask_type to decide yourself"
    )


def count_steps(tiles: int, batch_tiles: int, world_size: int) -> int:
    """Optimisation steps per epoch of ``tiles`` tiles, ``batch_tiles`` per step in each of ``world_size``
    processes; a UserError when an epoch has fewer tiles than one step needs."""
    steps = tiles // (batch_tiles * world_size)
    if steps == 0:
        raise UserError(
            f"an optimisation step needs {batch_tiles * world_size} tiles (train.batch_size x train.grad_accum_steps "
            f"x {world_size} processes) but an epoch has {tiles}: lower them or raise train.samples_per_image"
        )
    return steps


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["check"]:
        from segmentation.data.datacheck import check_main

        sys.exit(check_main(sys.argv[1:]))
    from segmentation.data.download import download_main

    sys.exit(download_main(sys.argv[1:]))
