"""The settings' schema: one frozen dataclass per part of config.yaml, each field with its default and check.

``unet``, ``predict``, ``augment`` and ``overfit_one_batch`` are one dataclass each. The ``train`` section
of the YAML, the longest, is three: ``DataSettings`` (the images, their masks and split: what the data
layer receives), ``TrainSettings`` (the optimisation) and ``RunSettings`` (run folders, checkpoints,
logs, validation and stopping). Its keys stay ``train.<key>`` in config files, overrides and the plain
data of checkpoints (``segmentation.config`` maps them); in code they are ``config.data.<key>``,
``config.train.<key>`` and ``config.run.<key>``. Each field declares its default and how it is
checked (``options.Option``); lists are held as tuples, so that resolved settings cannot change.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from segmentation.options import Option

DATASETS = ("synthetic", "isbi2012", "pennfudan", "folder")
DATASET_ALIASES = {"em": "isbi2012", "cells": "isbi2012", "pedestrian": "pennfudan"}
SCHEDULES = ("warmup-cosine", "cosine", "constant", "poly")
BEST_METRICS = ("val_loss", "val_pixel_error", "val_dice", "val_iou", "val_rand_error", "val_vi")
HIGHER_IS_BETTER = ("val_dice", "val_iou")
MODES = ("overfit", "hp_search", "lr_find")  # overfit_one_batch modes instead of training; at most one
DEFAULT_SEARCH_SPACE = {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "train.optim": ["adam", "adamw"]}


def frozen(value: Any) -> Any:
    """Lists as tuples, all the way down: a value that a frozen dataclass can hold unchanged."""
    return tuple(frozen(item) for item in value) if isinstance(value, (list, tuple)) else value


def plain(value: Any) -> Any:
    """Tuples as lists and mappings as dicts, all the way down: plain data for YAML and checkpoints."""
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    return value


def setting(default: Any, kind: str, help: str, **limits: Any) -> Any:
    """A settings field: its default and how ``resolve`` checks a value (an ``Option``). Lists are held as
    tuples, so that a resolved setting cannot change."""
    option = Option(default, kind, help, **limits)
    if isinstance(default, dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"option": option})
    return field(default=frozen(default), metadata={"option": option})


@dataclass(frozen=True)
class UNetSettings:
    """``unet``: the network (``model.UNet``'s constructor arguments)."""

    input_channels: tuple[int, ...] = setting(
        [16, 32, 64, 128],
        "int_list",
        "widths of the contracting path; the bottleneck has twice the last (paper: [64, 128, 256, 512])",
        minimum=1,
    )
    image_channels: int = setting(1, "int", "channels of the input images: 1 grayscale, 3 RGB", minimum=1)
    num_classes: int = setting(2, "int", "output classes; masks hold class indices 0..num_classes-1", minimum=2)
    padding: int = setting(
        0, "int", "0: the paper's valid 3x3 convolutions (output smaller than input); 1: same size", choices=(0, 1)
    )
    norm: str = setting(
        "batch",
        "str",
        "normalisation after each convolution (paper: none)",
        choices=("layer", "batch", "group", "instance", "none"),
    )
    upsample: str = setting(
        "transpose",
        "str",
        "transpose: the paper's 2x2 up-convolution; bilinear: upsampling + 1x1 convolution",
        choices=("transpose", "bilinear"),
    )
    dropout: float = setting(
        0.0, "float", "dropout at the end of the contracting path (paper: 0.5)", minimum=0.0, maximum=0.99
    )
    boundary_class: bool | str = setting(
        "auto", "bool_or_auto", "two classes: also learn object borders as a class; auto: for object-id masks"
    )
    dims: int = setting(
        2, "int", "2: images (a stack's pages one by one); 3: volumes (3D convolutions)", choices=(2, 3)
    )

    @property
    def depth(self) -> int:
        """The number of poolings."""
        return len(self.input_channels)


@dataclass(frozen=True)
class DataSettings:
    """``train`` (the data keys): the images, how their masks are read, their split, tiles and weight maps."""

    dataset_name: str = setting(
        "synthetic",
        "str",
        "synthetic (generated EM-like cells), isbi2012 (alias em, cells), pennfudan (alias pedestrian), folder",
        choices=DATASETS,
        aliases=DATASET_ALIASES,
    )
    data: str = setting("data", "str", "path to the data set (not used by synthetic)")
    mask_type: str = setting(
        "auto",
        "str",
        "how masks are read: classes (class indices, or 0/255 for two classes), instances (one integer id per "
        "object, two classes), auto (instances where a two-class mask holds other values than 0/1 or 0/255)",
        choices=("auto", "classes", "instances"),
    )
    mask_values: tuple[float, ...] | None = setting(
        None, "number_list", "gray values of the masks for classes 0, 1, ... (e.g. [0, 128, 255])", nullable=True
    )
    mask_colors: tuple[tuple[int, int, int], ...] | None = setting(
        None, "colour_list", "RGB colours of the masks for classes 0, 1, ...; null: gray masks", nullable=True
    )
    ignore_value: float | None = setting(
        None,
        "float",
        "mask value of pixels nobody annotated (scribbles, partial masks): they count nowhere",
        nullable=True,
    )
    ignore_color: tuple[int, ...] | None = setting(
        None,
        "int_list",
        "colour masks: the [r, g, b] of pixels nobody annotated",
        minimum=0,
        maximum=255,
        nullable=True,
    )
    cache_dir: str = setting("cache", "str", "each image is preprocessed once into this folder; safe to delete")
    synthetic_images: int = setting(30, "int", "number of synthetic images (like ISBI's 30 slices)", minimum=2)
    synthetic_size: int = setting(256, "int", "side of each synthetic image in pixels", minimum=32)
    val_fraction: float = setting(
        0.1, "float", "fraction of the images held out for validation", above=0.0, maximum=0.9
    )
    val_images: tuple[int, ...] | None = setting(
        None, "int_list", "indices of the images to hold out for validation instead", minimum=0, nullable=True
    )
    val_data: str | None = setting(None, "str", "a separate validation folder instead of a split", nullable=True)
    test_images: tuple[int, ...] | None = setting(
        None, "int_list", "indices of images held out of training and validation", minimum=0, nullable=True
    )
    folds: int | None = setting(
        None, "int", "cross-validation: hold out fold train.fold of this many", minimum=2, nullable=True
    )
    fold: int | str = setting(0, "int_or_all", "the fold held out for testing; all: every fold in turn", minimum=0)
    fold_order: str = setting(
        "random", "str", "random or contiguous (neighbouring images in one fold)", choices=("random", "contiguous")
    )
    split_seed: int | None = setting(
        None, "int", "seed of the folds and validation images (null: train.seed)", minimum=0, nullable=True
    )
    image_scale: float = setting(1.0, "float", "resize images by this factor", above=0.0, maximum=4.0)
    max_image_pixels: int = setting(
        2**30, "int", "refuse images (or stack pages) of more pixels than this, from their headers", minimum=1
    )
    tile_size: int = setting("auto", "int_or_auto", "side of the network's input tile in pixels", minimum=8)
    tile_depth: int | str = setting(
        "auto", "int_or_auto", "3D: sections of the input tile; auto: from the spacing and tile_size", minimum=1
    )
    spacing: tuple[float, ...] | None = setting(
        None,
        "float_list",
        "3D: voxel size [z, y, x] of every volume, over the files' (any unit)",
        above=0.0,
        nullable=True,
    )
    samples_per_image: int = setting(4, "int", "random tiles cut from each training image per epoch", minimum=1)
    class_weights: str | tuple[float, ...] = setting("balanced", "weights", "balanced, none or one weight per class")
    w_0: float = setting(10.0, "float", "weight of the border term (paper: 10; 0: off)", minimum=0.0)
    sigma: float = setting(5.0, "float", "width of the border term in pixels (paper: about 5)", above=0.0)

    def split_seed_or(self, seed: int) -> int:
        """The seed that draws the folds and the validation images: ``split_seed``, else ``seed`` (``train.seed``)."""
        return seed if self.split_seed is None else self.split_seed


@dataclass(frozen=True)
class TrainSettings:
    """``train`` (the optimisation keys): the step, its schedule, precision, device and seed."""

    batch_size: int = setting(4, "int", "tiles per forward pass in each process", minimum=1)
    grad_accum_steps: int = setting(1, "int", "forward passes per optimisation step", minimum=1)
    max_epochs: int = setting(40, "int", "number of epochs", minimum=1)
    optim: str = setting("adam", "str", "adamw, adam or sgd (with momentum)", choices=("adamw", "adam", "sgd"))
    lr: float = setting(1e-3, "float", "peak learning rate", above=0.0)
    min_lr: float = setting(0.0, "float", "learning rate at the end of the cosine and poly schedules", minimum=0.0)
    weight_decay: float = setting(0.0, "float", "weight decay (decoupled for adamw)", minimum=0.0)
    momentum: float = setting(0.99, "float", "SGD momentum (paper: 0.99)", minimum=0.0, maximum=0.999999)
    scheduler_type: str = setting("warmup-cosine", "str", "learning-rate schedule", choices=SCHEDULES)
    warmup_epochs: float = setting(1.0, "float", "linear warm-up length in epochs (0: none)", minimum=0.0)
    grad_clip: float = setting(1.0, "float", "clip the gradient norm to this value (0: off)", minimum=0.0)
    ema: float = setting(
        0.0, "float", "decay of a moving average of the weights (0: off)", minimum=0.0, maximum=0.999999
    )
    use_bitsandbytes: bool = setting(False, "bool", "bitsandbytes' 8-bit Adam/AdamW where it works")
    precision: str = setting("fp32", "str", "fp32, or bf16 / fp16 autocast", choices=("fp32", "bf16", "fp16"))
    channels_last: bool = setting(False, "bool", "keep activations channels-last (NHWC)")
    compile: bool = setting(False, "bool", "torch.compile the model")
    activation_checkpointing: bool = setting(False, "bool", "recompute activations in the backward pass")
    loss: str = setting("ce", "str", "ce, dice or ce+dice", choices=("ce", "dice", "ce+dice"))
    device: str = setting("auto", "str", "auto (CUDA when present), cpu, cuda or cuda:N")
    num_workers: int = setting(0, "int", "data loader worker processes", minimum=0)
    seed: int = setting(0, "int", "random seed of the weights, the split, the tiles and the augmentation", minimum=0)


@dataclass(frozen=True)
class RunSettings:
    """``train`` (the run keys): run folders, checkpoints, logs, validation and stopping."""

    save_path: str = setting("weights", "str", "checkpoints go to save_path/<run>/")
    log_path: str = setting("logs", "str", "each run logs to log_path/<run>/")
    run_name: str | None = setting(None, "str", "name of the run folder", nullable=True)
    eval_epoch: int = setting(1, "int", "validate every this many epochs", minimum=1)
    log_epoch: int = setting(1, "int", "write metrics.csv and curves.png every this many epochs", minimum=1)
    tensorboard: bool = setting(False, "bool", "also write TensorBoard events to the run's log folder")
    save_epoch: int = setting(1, "int", "save last.pt every this many epochs", minimum=1)
    save_minutes: float = setting(
        30.0, "float", "also save last.pt inside an epoch once this many minutes passed (0: off)", minimum=0.0
    )
    best_metric: str = setting("val_dice", "str", "what picks best.pt and drives early stopping", choices=BEST_METRICS)
    early_stopping: int = setting(0, "int", "stop after this many epochs without a better best_metric", minimum=0)
    max_minutes: float = setting(
        0.0,
        "float",
        "wall-time budget: epochs (max_epochs at most) and schedule planned to end by then (0: none)",
        minimum=0.0,
    )
    resume: str | None = setting(None, "str", "auto, or a checkpoint path", nullable=True)
    init_from: str | None = setting(None, "str", "start from this checkpoint's weights, all else fresh", nullable=True)


@dataclass(frozen=True)
class PredictSettings:
    """``predict``: how whole images are predicted and their pixels' classes decided."""

    tile_size: int | str | None = setting(
        "auto", "int_or_auto", "largest input tile side for whole images", minimum=8, nullable=True
    )
    overlap: float = setting(0.25, "float", "with padding 1: overlap of tiles", minimum=0.0, maximum=0.9)
    batch_size: int = setting(4, "int", "tiles per forward pass when predicting", minimum=1)
    tta: bool = setting(False, "bool", "average over the flips and turns that the augmentation covered")
    scales: tuple[float, ...] = setting(
        [1.0], "float_list", "test-time scales, multiples of train.image_scale", above=0.0, maximum=4.0
    )
    threshold: float | str = setting(
        0.5, "threshold", "two classes: class 1 at this probability; auto: calibrated", above=0.0, maximum=0.999
    )
    watershed_seeds: float | None = setting(
        None,
        "float",
        "two classes: seeds of the watershed cut (border class: of the objects)",
        above=0.0,
        maximum=0.999,
        nullable=True,
    )
    watershed_min_seed: int = setting(0, "int", "with watershed_seeds: smallest seed in pixels", minimum=0)
    min_object_size: int | str = setting(
        "auto", "int_or_auto", "two classes: objects below this many pixels are removed; auto: learnt", minimum=0
    )
    fill_holes: bool | str = setting("auto", "bool_or_auto", "two classes: fill holes in objects; auto: for ids")


@dataclass(frozen=True)
class AugmentSettings:
    """``augment``: the random transforms of the training tiles (``segmentation.data.augment``)."""

    flip: bool = setting(True, "bool", "random horizontal and vertical flips")
    vertical_flip: bool = setting(True, "bool", "with flip: also upside down")
    rotate90: bool = setting(True, "bool", "random rotations by multiples of 90 degrees")
    rotation: float = setting(0.0, "float", "random rotation up to this many degrees", minimum=0.0, maximum=180.0)
    scale: float = setting(0.1, "float", "random zoom by up to 1 +- this", minimum=0.0, maximum=0.9)
    shift: float = setting(0.0, "float", "random shift by up to this many pixels", minimum=0.0)
    elastic_std: float = setting(10.0, "float", "elastic deformation: std in pixels (paper: 10)", minimum=0.0)
    elastic_grid: int = setting(3, "int", "elastic deformation: grid nodes per side (paper: 3)", minimum=2)
    interpolation: str = setting("bilinear", "str", "image interpolation", choices=("bilinear", "bicubic"))
    brightness: float = setting(0.1, "float", "brightness offset in image standard deviations", minimum=0.0)
    contrast: float = setting(0.1, "float", "contrast factor 1 +- this", minimum=0.0, maximum=0.99)
    gamma: float = setting(0.0, "float", "gamma exp(+-log(1 + this))", minimum=0.0)
    noise: float = setting(0.0, "float", "Gaussian noise up to this std", minimum=0.0)
    blur: float = setting(0.0, "float", "Gaussian blur up to this sigma in pixels", minimum=0.0)
    probability: float = setting(1.0, "float", "fraction of the tiles augmented at all", minimum=0.0, maximum=1.0)

    @property
    def geometric(self) -> bool:
        """Whether any transform moves pixels (flips, turns, rotation, zoom, shift, elastic deformation)."""
        return bool(self.flip or self.rotate90 or self.rotation or self.scale or self.shift or self.elastic_std)


@dataclass(frozen=True)
class OverfitSettings:
    """``overfit_one_batch``: the checks of ``segmentation.engine.search`` that run instead of training."""

    overfit: bool = setting(False, "bool", "fit one fixed batch until its loss < tolerance")
    tolerance: float = setting(1e-2, "float", "a model has fitted the batch below this loss", above=0.0)
    max_steps: int = setting(250, "int", "steps at most per model", minimum=1)
    logging_steps: int = setting(10, "int", "print the loss every this many steps", minimum=1)
    hp_search: bool = setting(False, "bool", "overfit the same batch once per point of search_space")
    full_train: bool = setting(False, "bool", "after hp_search, train with best_config.yaml at once")
    search_space: dict = setting(DEFAULT_SEARCH_SPACE, "search_space", "section.key: choices or a range")
    search_method: str = setting("random", "str", "random or grid", choices=("random", "grid"))
    grid_points: int = setting(3, "int", "grid: values per range", minimum=2)
    trials: int = setting(6, "int", "random: number of trials", minimum=1)
    search_seed: int = setting(0, "int", "random: seed of the drawn points", minimum=0)
    lr_find: bool = setting(False, "bool", "learning-rate range test")
    lr_find_steps: int = setting(200, "int", "lr_find: steps at most", minimum=2)
    lr_find_min: float = setting(1e-7, "float", "lr_find: first learning rate", above=0.0)
    lr_find_max: float = setting(1.0, "float", "lr_find: last learning rate", above=0.0)

    @property
    def mode(self) -> str | None:
        """The check that runs instead of training (one of ``MODES``), or None."""
        return "overfit" if self.overfit else "hp_search" if self.hp_search else "lr_find" if self.lr_find else None


# Each dataclass section of ``Config`` and the section of config.yaml that holds its keys, in the YAML's order.
YAML_SECTIONS = {
    "unet": "unet",
    "data": "train",
    "train": "train",
    "run": "train",
    "predict": "predict",
    "augment": "augment",
    "overfit_one_batch": "overfit_one_batch",
}
