"""Data sets for training: the configured images, split, as random overlap-tiles and as whole images.

The images of ``train.dataset_name`` are split into training, validation and test images; training
images become random tiles with their labels and weight maps, validation and test images stay whole.

    python dataset.py download {pennfudan,isbi2012} [--to data/]   # get the public data sets

Everything is computed once per image (normalisation, weight maps); training tiles are then cut from
the prepared arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from config import UserError
from model import output_size
from preprocess import mirror_pad, normalize_image, resize_image, resize_mask, scaled_size
from readers import Sample, read_folder_pairs, read_isbi2012, read_pennfudan
from synthetic import synthetic_em_set
from weight_maps import class_balance_weights, weight_map


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


def split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic train / validation split of ``count`` items; at least one of each."""
    if count < 2:
        raise UserError(f"need at least 2 images to hold one out for validation, found {count}")
    val_count = min(count - 1, max(1, round(count * val_fraction)))
    order = np.random.default_rng(seed).permutation(count).tolist()
    return sorted(order[val_count:]), sorted(order[:val_count])


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
