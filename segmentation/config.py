"""Settings: config.yaml's schema, the file and its key=value overrides validated and resolved into frozen dataclasses.

One frozen dataclass per section (``UNetSettings``, ``TrainSettings``, ``PredictSettings``,
``AugmentSettings``, ``OverfitSettings``), gathered in ``Config``; each field declares its default and how
it is checked (``options.Option``). ``load_config`` is all the entry points need: defaults, then the YAML
file, then the overrides, checked key by key and across keys, ``auto`` values resolved, or a
``ConfigError`` with one line per problem. The library below the entry points receives a section or a
few values, never the whole config, and reads them as attributes. ``Config.to_dict`` gives the plain
data that run folders and checkpoints store; ``resolve`` reads it back.

This is the one module that knows the schema by its keys.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from model import nearest_valid_input_size
from segmentation.options import Option, check_value, suggest


class UserError(Exception):
    """A problem with the user's config, data or files: printed as one line, without a traceback."""


class ConfigError(UserError):
    """One or more config problems, one per line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"  # the shipped config, beside the scripts
AUTO_TILE_SIDE = 256  # train.tile_size: auto aims here: a few cells of EM, a good part of a photo at half size
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

    @property
    def depth(self) -> int:
        """The number of poolings."""
        return len(self.input_channels)


@dataclass(frozen=True)
class TrainSettings:
    """``train``: the data, its split, the optimisation, precision, checkpoints and logs."""

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
    image_scale: float = setting(1.0, "float", "resize images by this factor", above=0.0, maximum=4.0)
    tile_size: int = setting("auto", "int_or_auto", "side of the network's input tile in pixels", minimum=8)
    samples_per_image: int = setting(4, "int", "random tiles cut from each training image per epoch", minimum=1)
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
    class_weights: str | tuple[float, ...] = setting("balanced", "weights", "balanced, none or one weight per class")
    w_0: float = setting(10.0, "float", "weight of the border term (paper: 10; 0: off)", minimum=0.0)
    sigma: float = setting(5.0, "float", "width of the border term in pixels (paper: about 5)", above=0.0)
    device: str = setting("auto", "str", "auto (CUDA when present), cpu, cuda or cuda:N")
    num_workers: int = setting(0, "int", "data loader worker processes", minimum=0)
    seed: int = setting(0, "int", "random seed of the weights, the split, the tiles and the augmentation", minimum=0)
    split_seed: int | None = setting(
        None, "int", "seed of the folds and validation images (null: train.seed)", minimum=0, nullable=True
    )
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
    resume: str | None = setting(None, "str", "auto, or a checkpoint path", nullable=True)
    init_from: str | None = setting(None, "str", "start from this checkpoint's weights, all else fresh", nullable=True)

    @property
    def effective_split_seed(self) -> int:
        """The seed that draws the folds and the validation images: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed


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
        None, "float", "two classes: seeds of the watershed cut", above=0.0, maximum=0.999, nullable=True
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


@dataclass(frozen=True)
class Config:
    """The resolved settings of a run, one frozen section each."""

    unet: UNetSettings = field(default_factory=UNetSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    overfit_one_batch: OverfitSettings = field(default_factory=OverfitSettings)

    def to_dict(self) -> dict:
        """The settings as plain data (``{section: {key: value}}``, lists for tuples), in schema order:
        what run folders write as YAML and checkpoints store."""
        return {section.name: plain(dataclasses.asdict(getattr(self, section.name))) for section in fields(self)}

    def with_values(self, values: dict[str, Any]) -> Config:
        """These settings with ``{section.key: value}`` set, resolved and checked again."""
        data = self.to_dict()
        for name, value in values.items():
            section, _, key = name.partition(".")
            data[section][key] = copy.deepcopy(value)
        return resolve(data)


SECTIONS: dict[str, type] = {section.name: section.default_factory for section in fields(Config)}
SCHEMA: dict[str, dict[str, Option]] = {
    name: {item.name: item.metadata["option"] for item in fields(section)} for name, section in SECTIONS.items()
}
LEGACY = {  # keys of the seed repository, read and translated by resolve
    "unet": {
        "use_ln": Option(None, "bool", "legacy: true means norm: layer, false means norm: none", nullable=True),
        "input_shape": Option(None, "int_list", "legacy: its first value sets train.tile_size: auto", nullable=True),
    }
}
SPLIT_KEYS = ("dataset_name", "folds", "fold", "fold_order", "test_images", "val_images", "val_fraction", "val_data")
ARCHITECTURE_KEYS = ("input_channels", "image_channels", "num_classes", "padding", "norm", "upsample", "boundary_class")


def default_config() -> dict:
    """A complete config holding every key's default value, as plain data."""
    return {
        section: {key: copy.deepcopy(option.default) for key, option in options.items()}
        for section, options in SCHEMA.items()
    }


def parse_overrides(overrides: Sequence[str]) -> dict:
    """Turn ``["train.lr=3e-4", "unet.input_channels=[16,32]"]`` into a nested dict; values are YAML."""
    nested: dict = {}
    problems = []
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot or not section or not key:
            problems.append(f"{item!r}: overrides are written section.key=value, for example train.lr=3e-4")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            problems.append(f"{name}: cannot read the value {text!r} as YAML ({error.problem})")
            continue
        nested.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError(problems)
    return nested


def read_yaml(path: str | Path) -> dict:
    """Read a config file (``yaml.safe_load`` only); an empty file is an empty config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError([f"{path}: not valid YAML: {str(error).splitlines()[0]}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{path}: a config is a mapping of sections (unet:, train:, augment:), not {kind}"])
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), notices: list | None = None) -> Config:
    """Defaults, then the file at ``path`` (if any), then ``section.key=value`` overrides; validated.

    Legacy seed keys are translated: ``unet.use_ln`` to ``unet.norm`` and ``train.dataset_name`` aliases
    to their canonical names; ``unet.input_shape`` is ignored. One line per such translation is appended
    to ``notices`` so that the caller can print it.
    """
    user = read_yaml(path) if path is not None else {}
    return resolve(merge_overrides(user, overrides), notices)


def merge_overrides(user: dict, overrides: Sequence[str]) -> dict:
    """A copy of the (partial) config ``user`` with ``section.key=value`` overrides applied."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in user.items()}
    for section, values in parse_overrides(overrides).items():
        if isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def resolve(user: dict, notices: list | None = None) -> Config:
    """Merge a user's (partial) config (plain data, as YAML or a checkpoint holds it) over the defaults,
    validate it and resolve its ``auto`` values; see ``load_config``."""
    notices = [] if notices is None else notices
    config = default_config()
    legacy: dict = {}
    problems = []
    searchable = {
        f"{s}.{k}": option for s, options in SCHEMA.items() if s != "overfit_one_batch" for k, option in options.items()
    }
    for section, values in user.items():
        if section not in SCHEMA:
            known = ", ".join(SCHEMA)
            problems.append(f"{section}: unknown section{suggest(str(section), SCHEMA)}; known sections: {known}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of keys, got {values!r}")
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            option = SCHEMA[section].get(key) or LEGACY.get(section, {}).get(key)
            if option is None:
                problems.append(f"{name}: unknown key{suggest(name, [*searchable, *_keys('overfit_one_batch')])}")
                continue
            try:
                checked = check_value(name, option, value, searchable)
            except ValueError as error:
                problems.append(str(error))
                continue
            (config[section] if key in SCHEMA[section] else legacy)[key] = checked
    if problems:
        raise ConfigError(problems)
    _apply_legacy(config["unet"], legacy, "norm" in (user.get("unet") or {}), notices)
    try:
        _resolve_tile_size(config["train"], config["unet"], (legacy.get("input_shape") or [None])[0], notices)
    except ValueError as error:
        problems.append(f"train.tile_size: auto: {error}")
    problems += _cross_key_problems(config)
    if problems:
        raise ConfigError(problems)
    return Config(
        **{name: SECTIONS[name](**{k: frozen(v) for k, v in values.items()}) for name, values in config.items()}
    )


def _keys(section: str) -> list[str]:
    return [f"{section}.{key}" for key in SCHEMA[section]]


def _cross_key_problems(config: dict) -> list[str]:
    """What contradicts itself across keys, one line each."""
    unet, train, modes = config["unet"], config["train"], config["overfit_one_batch"]
    classes = unet["num_classes"]
    problems = []
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", train["device"]):
        problems.append(f"train.device: {train['device']!r} is not one of auto, cpu, cuda, cuda:N, mps")
    boundary = unet["boundary_class"] is True
    if isinstance(train["class_weights"], list) and len(train["class_weights"]) not in (classes, classes + boundary):
        given = len(train["class_weights"])
        problems.append(f"train.class_weights: {given} weights given but unet.num_classes is {classes}")
    if boundary and classes != 2:
        problems.append(f"unet.boundary_class: true learns the borders of objects of two classes, not of {classes}")
    for key in ("mask_values", "mask_colors"):
        if train[key] is not None and len(train[key]) != classes:
            problems.append(f"train.{key}: {len(train[key])} given but unet.num_classes is {classes}: one per class")
    if train["best_metric"] in ("val_rand_error", "val_vi") and classes != 2:
        problems.append(
            f"train.best_metric: {train['best_metric']} is measured on the cells of a two-class task, "
            f"but unet.num_classes is {classes}"
        )
    if train["dataset_name"] == "synthetic" and classes not in (2, 3):
        problems.append(
            "unet.num_classes: the synthetic images have 2 classes (membrane, cell) or 3 (and organelles), "
            f"not {classes}"
        )
    if train["mask_type"] == "instances" and classes != 2:
        problems.append(
            f"train.mask_type: instances (one id per object) gives two classes, but unet.num_classes is {classes}"
        )
    problems += _fold_problems(train)
    if train["fold"] == "all" and any(modes[mode] for mode in MODES):
        problems.append(
            "train.fold: all trains every fold; the overfit_one_batch checks run on one fold: set train.fold=0"
        )
    if train["min_lr"] > train["lr"]:
        problems.append(f"train.min_lr ({train['min_lr']}) is above train.lr ({train['lr']})")
    chosen = [mode for mode in MODES if modes[mode]]
    if len(chosen) > 1:
        problems.append(
            f"overfit_one_batch: {' and '.join(chosen)} are true together; set at most one of {', '.join(MODES)}"
        )
    if modes["lr_find_min"] >= modes["lr_find_max"]:
        problems.append(
            f"overfit_one_batch.lr_find_min ({modes['lr_find_min']}) must be below lr_find_max ({modes['lr_find_max']})"
        )
    return problems


def _fold_problems(train: dict) -> list[str]:
    """What contradicts itself among the cross-validation keys ``train.folds``, ``fold`` and the fixed splits."""
    folds, fold = train["folds"], train["fold"]
    if folds is None:
        return [] if fold == 0 else [f"train.fold: {fold} needs train.folds (the number of folds), which is null"]
    problems = [
        f"train.{key}: train.folds chooses the test images of each fold; set train.{key}=null"
        for key in ("test_images", "val_images")
        if train[key]
    ]
    if fold == "all" and train["resume"] not in (None, "auto"):
        problems.append("train.resume: with train.fold=all each fold continues its own run; use train.resume=auto")
    if fold != "all" and fold >= folds:
        problems.append(f"train.fold: {fold} is not among the {folds} folds (0..{folds - 1}, or all)")
    return problems


def _apply_legacy(unet: dict, legacy: dict, norm_given: bool, notices: list) -> None:
    """The seed's ``unet.use_ln`` as ``unet.norm``; a notice for each legacy key."""
    if legacy.get("use_ln") is not None:
        legacy_norm = "layer" if legacy["use_ln"] else "none"
        if norm_given and unet["norm"] != legacy_norm:
            contradiction = f"unet.use_ln: {legacy['use_ln']} contradicts unet.norm: {unet['norm']}"
            raise ConfigError([f"{contradiction}; remove unet.use_ln (a legacy key)"])
        unet["norm"] = legacy_norm
        notices.append(f"unet.use_ln: {legacy['use_ln']} is a legacy key: using unet.norm: {legacy_norm}")
    if legacy.get("input_shape") is not None:
        notices.append(
            "unet.input_shape is a legacy key: the model works at every valid input size "
            "(its first value sets train.tile_size: auto)"
        )


def _resolve_tile_size(train: dict, unet: dict, legacy_side: int | None, notices: list) -> None:
    """``train.tile_size: auto``: the valid input size nearest ``AUTO_TILE_SIDE`` (or the seed's
    ``unet.input_shape[0]``) for the configured depth and padding, with a notice saying which."""
    if train["tile_size"] != "auto":
        return
    depth, padding = len(unet["input_channels"]), unet["padding"]
    target = legacy_side or AUTO_TILE_SIDE
    train["tile_size"] = nearest_valid_input_size(target, depth, padding)
    source = "unet.input_shape[0]" if legacy_side else "a sensible side"
    notices.append(
        f"train.tile_size auto: {train['tile_size']} px, the valid input nearest {target} px ({source}) "
        f"for depth {depth} and padding {padding}"
    )


def config_to_yaml(config: Config) -> str:
    """The settings as YAML text, sections and keys in schema order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


def split_differences(saved: dict, current: TrainSettings) -> list[str]:
    """The ``train.*`` keys that choose the training, validation and test images, where a checkpoint's
    stored config ``saved`` (plain data) and ``current`` differ (a key that ``saved`` lacks, from a
    version before it, counts as its default)."""
    before = {key: saved["train"].get(key, SCHEMA["train"][key].default) for key in SPLIT_KEYS}
    now = plain(dataclasses.asdict(current))
    differences = [
        f"train.{key}: checkpoint {before[key]!r}, config {now[key]!r}" for key in SPLIT_KEYS if before[key] != now[key]
    ]
    saved_seed = saved["train"]["seed"] if saved["train"].get("split_seed") is None else saved["train"]["split_seed"]
    if saved_seed != current.effective_split_seed:
        differences.append(
            f"train.split_seed (else train.seed): checkpoint {saved_seed}, config {current.effective_split_seed}"
        )
    return differences


def stored_boundary_class(saved: dict) -> bool:
    """Whether the network of a checkpoint's stored config ``saved`` (plain data) has the boundary class
    (``unet.boundary_class`` as its run decided it; checkpoints from before the key have none)."""
    return saved["unet"].get("boundary_class", False) is True


def architecture_differences(saved: dict, current: UNetSettings, keys: Sequence[str] = ARCHITECTURE_KEYS) -> list[str]:
    """The ``unet.*`` keys among ``keys`` (default: all that change the weights' shapes or meaning) where a
    checkpoint's stored config ``saved`` (plain data) and ``current`` differ."""
    now = plain(dataclasses.asdict(current))
    stored = {"boundary_class": False, **saved["unet"]}  # checkpoints from before the key had none
    return [
        f"unet.{key}: checkpoint {stored.get(key)!r}, config {now[key]!r}"
        for key in keys
        if stored.get(key) != now[key] and not (key == "boundary_class" and now[key] == "auto")
    ]
