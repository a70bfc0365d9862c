"""Configuration: the known keys with their defaults, loading a YAML file, key=value overrides, validation.

A config is a plain nested dict ``{"unet": {...}, "train": {...}, "augment": {...}}`` of plain values
(numbers, strings, lists), so it can be written to YAML and stored inside checkpoints as it is.
``load_config`` is the only entry point the scripts need; it returns a complete, validated config or
raises ``ConfigError`` with one line per problem.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from model import nearest_valid_input_size


class UserError(Exception):
    """A problem with the user's config, data or files: printed as one line, without a traceback."""


class ConfigError(UserError):
    """One or more config problems, one per line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Option:
    """One config key: its default, its type and the values it accepts."""

    default: Any
    kind: str  # int | float | bool | str | int_list | float_list | weights | search_space | threshold | number_list | colour_list | int_or_auto | int_or_all
    help: str
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    above: float | None = None  # exclusive lower bound
    nullable: bool = False
    aliases: dict = field(default_factory=dict)  # legacy value -> canonical value


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"  # the shipped config, beside the scripts
AUTO_TILE_SIDE = 256  # train.tile_size: auto aims here: a few cells of EM, a good part of a photo at half size
DATASETS = ("synthetic", "isbi2012", "pennfudan", "folder")
DATASET_ALIASES = {"em": "isbi2012", "cells": "isbi2012", "pedestrian": "pennfudan"}
SCHEDULES = ("warmup-cosine", "cosine", "constant", "poly")
BEST_METRICS = ("val_loss", "val_pixel_error", "val_dice", "val_iou", "val_rand_error", "val_vi")
HIGHER_IS_BETTER = ("val_dice", "val_iou")
MODES = ("overfit", "hp_search", "lr_find")  # overfit_one_batch modes instead of training; at most one
SEARCH_RANGES = ("log_uniform", "uniform")
DEFAULT_SEARCH_SPACE = {"train.lr": {"log_uniform": [1e-4, 1e-2]}, "train.optim": ["adam", "adamw"]}

SCHEMA: dict[str, dict[str, Option]] = {
    "unet": {
        "input_channels": Option(
            [16, 32, 64, 128],
            "int_list",
            "widths of the contracting path; the bottleneck has twice the last (paper: [64, 128, 256, 512])",
            minimum=1,
        ),
        "image_channels": Option(1, "int", "channels of the input images: 1 grayscale, 3 RGB", minimum=1),
        "num_classes": Option(2, "int", "output classes; masks hold class indices 0..num_classes-1", minimum=2),
        "padding": Option(
            0,
            "int",
            "0: the paper's valid 3x3 convolutions (output smaller than input); 1: same-size output",
            choices=(0, 1),
        ),
        "norm": Option(
            "batch",
            "str",
            "normalisation after each convolution (paper: none)",
            choices=("layer", "batch", "group", "instance", "none"),
        ),
        "upsample": Option(
            "transpose",
            "str",
            "transpose: the paper's 2x2 up-convolution; bilinear: upsampling + 1x1 convolution",
            choices=("transpose", "bilinear"),
        ),
        "dropout": Option(
            0.0,
            "float",
            "dropout probability at the end of the contracting path (paper: 0.5)",
            minimum=0.0,
            maximum=0.99,
        ),
        "use_ln": Option(
            None, "bool", "legacy seed key: true means norm: layer, false means norm: none", nullable=True
        ),
        "input_shape": Option(
            None, "int_list", "legacy seed key, ignored: the model works at every valid input size", nullable=True
        ),
    },
    "train": {
        "dataset_name": Option(
            "synthetic",
            "str",
            "synthetic (generated EM-like cells), isbi2012 (alias em, cells), pennfudan (alias pedestrian), folder",
            choices=DATASETS,
            aliases=DATASET_ALIASES,
        ),
        "data": Option("data", "str", "path to the data set (not used by synthetic)"),
        "mask_type": Option(
            "auto",
            "str",
            "how masks are read: classes (class indices, or 0/255 for two classes), instances (one integer id per object, two classes), auto (instances where a two-class mask holds other values than 0/1 or 0/255)",
            choices=("auto", "classes", "instances"),
        ),
        "mask_values": Option(
            None,
            "number_list",
            "gray values of the masks for classes 0, 1, ... (e.g. [0, 128, 255]); null: the values are the classes",
            nullable=True,
        ),
        "mask_colors": Option(
            None,
            "colour_list",
            "RGB colours of the masks for classes 0, 1, ... (e.g. [[0, 0, 0], [255, 0, 0], [0, 255, 0]]); null: masks are gray",
            nullable=True,
        ),
        "cache_dir": Option(
            "cache",
            "str",
            "each image is preprocessed once (normalised, resized, weight map) into this folder and read from there; safe to delete",
        ),
        "synthetic_images": Option(30, "int", "number of synthetic images (like ISBI's 30 slices)", minimum=2),
        "synthetic_size": Option(256, "int", "side of each synthetic image in pixels", minimum=32),
        "val_fraction": Option(
            0.1,
            "float",
            "fraction of the images held out for validation, drawn from train.split_seed (else train.seed)",
            above=0.0,
            maximum=0.9,
        ),
        "val_images": Option(
            None,
            "int_list",
            "indices of the images to hold out for validation instead (e.g. [24, 25, 26, 27, 28, 29])",
            minimum=0,
            nullable=True,
        ),
        "val_data": Option(
            None,
            "str",
            "a separate validation folder (images/ + masks/, or the data set's layout) instead of a split",
            nullable=True,
        ),
        "test_images": Option(
            None,
            "int_list",
            "indices of images held out of training and validation, scored by test.py (ISBI: [24, 25, 26, 27, 28, 29])",
            minimum=0,
            nullable=True,
        ),
        "folds": Option(
            None,
            "int",
            "cross-validation: split the images into this many folds and hold out fold train.fold as the test images (instead of train.test_images)",
            minimum=2,
            nullable=True,
        ),
        "fold": Option(
            0,
            "int_or_all",
            "the fold held out for testing, 0..folds-1; all: train every fold in turn, one run each (names end in -fold0, -fold1, ...)",
            minimum=0,
        ),
        "fold_order": Option(
            "random",
            "str",
            "random: folds drawn from train.split_seed (else train.seed); contiguous: neighbouring images stay in one fold (slices of a stack, frames of a video are near copies of their neighbours)",
            choices=("random", "contiguous"),
        ),
        "image_scale": Option(
            1.0,
            "float",
            "resize images by this factor for the network (0.5: half the side, a quarter of the work, twice the context); scores and masks stay at full size",
            above=0.0,
            maximum=4.0,
        ),
        "tile_size": Option(
            "auto",
            "int_or_auto",
            "side of the network's input tile in pixels; auto: the valid size nearest 256 px (or the legacy unet.input_shape[0]) for the depth and padding; with padding 0 the labelled output tile is smaller",
            minimum=8,
        ),
        "samples_per_image": Option(4, "int", "random tiles cut from each training image per epoch", minimum=1),
        "batch_size": Option(
            4,
            "int",
            "tiles per forward pass in each process; an optimisation step sees batch_size x grad_accum_steps x processes tiles",
            minimum=1,
        ),
        "grad_accum_steps": Option(
            1,
            "int",
            "gradient accumulation: forward passes per optimisation step (a larger batch without the memory)",
            minimum=1,
        ),
        "max_epochs": Option(40, "int", "number of epochs", minimum=1),
        "optim": Option(
            "adam", "str", "optimizer: adamw, adam or sgd (with momentum)", choices=("adamw", "adam", "sgd")
        ),
        "lr": Option(1e-3, "float", "peak learning rate", above=0.0),
        "min_lr": Option(0.0, "float", "learning rate at the end of the cosine and poly schedules", minimum=0.0),
        "weight_decay": Option(0.0, "float", "weight decay (decoupled for adamw)", minimum=0.0),
        "momentum": Option(0.99, "float", "SGD momentum (paper: 0.99)", minimum=0.0, maximum=0.999999),
        "scheduler_type": Option(
            "warmup-cosine",
            "str",
            "learning-rate schedule, stepped every batch: warmup-cosine, cosine, constant, poly (nnU-Net)",
            choices=SCHEDULES,
        ),
        "warmup_epochs": Option(
            1.0, "float", "linear warm-up length in epochs, for any schedule (0: none)", minimum=0.0
        ),
        "grad_clip": Option(1.0, "float", "clip the gradient norm to this value (0: off)", minimum=0.0),
        "ema": Option(
            0.0,
            "float",
            "validate, save and predict with an exponential moving average of the weights, updated every step with this decay (0.999: about the last 1000 steps; 0: off)",
            minimum=0.0,
            maximum=0.999999,
        ),
        "use_bitsandbytes": Option(
            False, "bool", "use bitsandbytes' 8-bit Adam/AdamW when it works on the device, else torch's"
        ),
        "precision": Option(
            "fp32",
            "str",
            "fp32; bf16 or fp16: mixed precision by autocast (fp16 adds loss scaling); bf16 is about 2x faster on recent GPUs",
            choices=("fp32", "bf16", "fp16"),
        ),
        "channels_last": Option(
            False,
            "bool",
            "keep activations channels-last (NHWC), the layout tensor cores prefer: faster on GPUs with bf16/fp16, often slower on CPUs",
        ),
        "compile": Option(
            False,
            "bool",
            "torch.compile the model: a minute of compiling, then faster steps; falls back to eager with a notice if it fails",
        ),
        "activation_checkpointing": Option(
            False,
            "bool",
            "recompute each block's activations in the backward pass: less memory for large tiles, about a third slower",
        ),
        "loss": Option(
            "ce",
            "str",
            "ce: the paper's weighted cross-entropy; dice: soft Dice; ce+dice: their sum",
            choices=("ce", "dice", "ce+dice"),
        ),
        "class_weights": Option(
            "balanced", "weights", "balanced: the paper's w_c from class frequencies; none; or one weight per class"
        ),
        "w_0": Option(
            10.0, "float", "weight of the border term separating touching cells (paper: 10; 0: off)", minimum=0.0
        ),
        "sigma": Option(5.0, "float", "width of the border term in pixels (paper: about 5)", above=0.0),
        "device": Option("auto", "str", "auto (CUDA when present), cpu, cuda or cuda:N"),
        "num_workers": Option(0, "int", "data loader worker processes (0: load in the training process)", minimum=0),
        "seed": Option(0, "int", "random seed for the weights, the split, the tiles and the augmentation", minimum=0),
        "split_seed": Option(
            None,
            "int",
            "seed of the folds and the validation images instead of train.seed, so that runs of several seeds hold out the same images (null: train.seed)",
            minimum=0,
            nullable=True,
        ),
        "save_path": Option("weights", "str", "checkpoints go to save_path/<run>/last.pt and best.pt"),
        "log_path": Option("logs", "str", "each run writes its config, metrics.csv and curves.png to log_path/<run>/"),
        "run_name": Option(None, "str", "name of the run folder (default: date, time and data set)", nullable=True),
        "eval_epoch": Option(1, "int", "validate every this many epochs", minimum=1),
        "log_epoch": Option(1, "int", "write metrics.csv and curves.png every this many epochs", minimum=1),
        "save_epoch": Option(1, "int", "save the last checkpoint every this many epochs", minimum=1),
        "best_metric": Option(
            "val_dice",
            "str",
            "what picks best.pt and drives early stopping: val_loss, val_pixel_error, val_dice, val_iou, val_rand_error, val_vi",
            choices=BEST_METRICS,
        ),
        "early_stopping": Option(
            0, "int", "stop after this many epochs without a better train.best_metric (0: never)", minimum=0
        ),
        "resume": Option(
            None, "str", "auto: continue the newest run in save_path; or a checkpoint path", nullable=True
        ),
    },
    "predict": {
        "tile_size": Option(
            "auto",
            "int_or_auto",
            "largest input tile side for whole-image prediction (validation, test.py), rounded up to a valid size; auto: 572 px with padding 0, 512 with padding 1 (smaller images take one tile of their own size)",
            minimum=8,
            nullable=True,
        ),
        "overlap": Option(
            0.25,
            "float",
            "with padding 1: overlap of neighbouring tiles, blended with Gaussian weights",
            minimum=0.0,
            maximum=0.9,
        ),
        "batch_size": Option(4, "int", "tiles per forward pass when predicting", minimum=1),
        "tta": Option(
            False,
            "bool",
            "average predictions over the flips and turns that the training augmentation covered (up to 8x slower)",
        ),
        "scales": Option(
            [1.0],
            "float_list",
            "test-time scales: average the predictions at these multiples of train.image_scale (Penn-Fudan: [0.85, 1.0, 1.2], 3x the work); [1.0]: one scale",
            above=0.0,
            maximum=4.0,
        ),
        "threshold": Option(
            0.5,
            "threshold",
            "two classes: a pixel is class 1 where its probability >= this; auto: calibrated on the validation images after training",
            above=0.0,
            maximum=0.999,
        ),
        "watershed_seeds": Option(
            None,
            "float",
            "two classes: cut class-1 regions that touch through thin gaps apart, by a watershed from seeds of probability >= this (ISBI: 0.95); null: off",
            above=0.0,
            maximum=0.999,
            nullable=True,
        ),
        "watershed_min_seed": Option(
            0,
            "int",
            "with watershed_seeds: seeds of fewer pixels are dropped, so that small islands of high probability inside a cell do not cut it into pieces (ISBI: 100); 0: every seed",
            minimum=0,
        ),
    },
    "augment": {
        "flip": Option(True, "bool", "random horizontal and vertical flips"),
        "vertical_flip": Option(
            True, "bool", "with flip: also upside down (false for upright scenes such as pedestrians)"
        ),
        "rotate90": Option(True, "bool", "random rotations by multiples of 90 degrees"),
        "rotation": Option(
            0.0,
            "float",
            "random rotation by up to this many degrees (180: any angle; 0: off)",
            minimum=0.0,
            maximum=180.0,
        ),
        "scale": Option(0.1, "float", "random zoom by a factor up to 1 +- this (0: off)", minimum=0.0, maximum=0.9),
        "shift": Option(0.0, "float", "random shift by up to this many pixels (0: off)", minimum=0.0),
        "elastic_std": Option(
            10.0,
            "float",
            "elastic deformation: std in pixels of the random displacements (paper: 10; 0: off)",
            minimum=0.0,
        ),
        "elastic_grid": Option(
            3, "int", "elastic deformation: displacements on a grid of this many nodes per side (paper: 3)", minimum=2
        ),
        "interpolation": Option(
            "bilinear",
            "str",
            "image interpolation (masks: nearest, weight maps: bilinear)",
            choices=("bilinear", "bicubic"),
        ),
        "brightness": Option(
            0.1, "float", "random brightness offset up to this many image standard deviations (0: off)", minimum=0.0
        ),
        "contrast": Option(0.1, "float", "random contrast factor 1 +- this (0: off)", minimum=0.0, maximum=0.99),
        "gamma": Option(0.0, "float", "random gamma exp(+-log(1 + this)) (0: off)", minimum=0.0),
        "noise": Option(
            0.0,
            "float",
            "Gaussian noise with a random std up to this, in image standard deviations (0: off)",
            minimum=0.0,
        ),
        "blur": Option(0.0, "float", "Gaussian blur with a random sigma up to this many pixels (0: off)", minimum=0.0),
        "probability": Option(
            1.0, "float", "fraction of the tiles that are augmented at all", minimum=0.0, maximum=1.0
        ),
    },
    "overfit_one_batch": {
        "overfit": Option(
            False,
            "bool",
            "instead of training: fit a fresh model to one fixed unaugmented batch at constant train.lr until its loss < tolerance (exit code 1 if not)",
        ),
        "tolerance": Option(
            1e-2,
            "float",
            "overfit and hp_search: a model has fitted the batch when its loss falls below this",
            above=0.0,
        ),
        "max_steps": Option(250, "int", "overfit and hp_search: steps at most per model", minimum=1),
        "logging_steps": Option(10, "int", "overfit and lr_find: print the loss every this many steps", minimum=1),
        "hp_search": Option(
            False,
            "bool",
            "instead of training: overfit the same batch once per point of search_space; writes trials.csv, trials.png, best_config.yaml",
        ),
        "full_train": Option(False, "bool", "after hp_search, train with best_config.yaml at once"),
        "search_space": Option(
            DEFAULT_SEARCH_SPACE,
            "search_space",
            "section.key: a list of choices, or {log_uniform: [low, high]} or {uniform: [low, high]} for a number",
        ),
        "search_method": Option(
            "random",
            "str",
            "random: trials points drawn from search_seed; grid: every combination, grid_points values per range",
            choices=("random", "grid"),
        ),
        "grid_points": Option(
            3, "int", "grid: values per range, evenly spaced (on a log scale for log_uniform)", minimum=2
        ),
        "trials": Option(6, "int", "random: number of trials", minimum=1),
        "search_seed": Option(0, "int", "random: seed of the drawn points", minimum=0),
        "lr_find": Option(
            False,
            "bool",
            "instead of training: learning-rate range test on augmented training batches; writes lr_find.png, suggests train.lr",
        ),
        "lr_find_steps": Option(
            200, "int", "lr_find: steps at most, the lr rising exponentially from lr_find_min to lr_find_max", minimum=2
        ),
        "lr_find_min": Option(1e-7, "float", "lr_find: first learning rate", above=0.0),
        "lr_find_max": Option(1.0, "float", "lr_find: last learning rate", above=0.0),
    },
}


def default_config() -> dict:
    """A complete config holding every key's default value."""
    return {
        section: {key: _copy(option.default) for key, option in options.items()} for section, options in SCHEMA.items()
    }


def _copy(value: Any) -> Any:
    return copy.deepcopy(value)


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
        raise ConfigError(
            [f"{path}: a config is a mapping of sections (unet:, train:, augment:), not {type(data).__name__}"]
        )
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), notices: list | None = None) -> dict:
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


def resolve(user: dict, notices: list | None = None) -> dict:
    """Merge a user's (partial) config over the defaults and validate it; see ``load_config``."""
    notices = [] if notices is None else notices
    config = default_config()
    problems = []
    for section, values in user.items():
        if section not in SCHEMA:
            problems.append(
                f"{section}: unknown section{_suggest(str(section), SCHEMA)}; known sections: {', '.join(SCHEMA)}"
            )
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of keys, got {values!r}")
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            option = SCHEMA[section].get(key)
            if option is None:
                known = [f"{s}.{k}" for s, options in SCHEMA.items() for k in options]
                problems.append(f"{name}: unknown key{_suggest(name, known)}")
                continue
            try:
                config[section][key] = _check(name, option, value)
            except ValueError as error:
                problems.append(str(error))
    if problems:
        raise ConfigError(problems)
    legacy_side = (config["unet"]["input_shape"] or [None])[0]
    _apply_legacy(config, user.get("unet") or {}, notices)
    try:
        _resolve_tile_size(config["train"], config["unet"], legacy_side, notices)
    except ValueError as error:
        problems.append(f"train.tile_size: auto: {error}")
    _check_device(config["train"]["device"], problems)
    class_weights = config["train"]["class_weights"]
    if isinstance(class_weights, list) and len(class_weights) != config["unet"]["num_classes"]:
        problems.append(
            f"train.class_weights: {len(class_weights)} weights given but unet.num_classes is {config['unet']['num_classes']}"
        )
    if config["train"]["best_metric"] in ("val_rand_error", "val_vi") and config["unet"]["num_classes"] != 2:
        problems.append(
            f"train.best_metric: {config['train']['best_metric']} is measured on the cells of a two-class task, but unet.num_classes is {config['unet']['num_classes']}"
        )
    for key in ("mask_values", "mask_colors"):
        if config["train"][key] is not None and len(config["train"][key]) != config["unet"]["num_classes"]:
            problems.append(
                f"train.{key}: {len(config['train'][key])} given but unet.num_classes is {config['unet']['num_classes']}: one per class"
            )
    if config["train"]["dataset_name"] == "synthetic" and config["unet"]["num_classes"] not in (2, 3):
        problems.append(
            f"unet.num_classes: the synthetic images have 2 classes (membrane, cell) or 3 (and organelles), not {config['unet']['num_classes']}"
        )
    if config["train"]["mask_type"] == "instances" and config["unet"]["num_classes"] != 2:
        problems.append(
            f"train.mask_type: instances (one id per object) gives two classes, but unet.num_classes is {config['unet']['num_classes']}"
        )
    problems += _fold_problems(config["train"])
    if config["train"]["fold"] == "all" and any(config["overfit_one_batch"][mode] for mode in MODES):
        problems.append(
            "train.fold: all trains every fold; the overfit_one_batch checks run on one fold: set train.fold=0"
        )
    if config["train"]["min_lr"] > config["train"]["lr"]:
        problems.append(f"train.min_lr ({config['train']['min_lr']}) is above train.lr ({config['train']['lr']})")
    modes = config["overfit_one_batch"]
    chosen = [mode for mode in MODES if modes[mode]]
    if len(chosen) > 1:
        problems.append(
            f"overfit_one_batch: {' and '.join(chosen)} are true together; set at most one of {', '.join(MODES)}"
        )
    if modes["lr_find_min"] >= modes["lr_find_max"]:
        problems.append(
            f"overfit_one_batch.lr_find_min ({modes['lr_find_min']}) must be below lr_find_max ({modes['lr_find_max']})"
        )
    if problems:
        raise ConfigError(problems)
    return config


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


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
    return f" (did you mean {close[0]}?)" if close else ""


def _check(name: str, option: Option, value: Any) -> Any:
    """Return ``value`` converted to the option's type, or raise ValueError naming the key."""
    if value is None:
        if option.nullable:
            return None
        raise ValueError(f"{name}: a value is required ({option.help})")
    value = option.aliases.get(value, value) if isinstance(value, str) else value
    if option.kind == "int":
        value = _as_int(name, value)
    elif option.kind == "float":
        value = _as_float(name, value)
    elif option.kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected true or false, got {value!r}")
    elif option.kind == "str":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected a text value, got {value!r}")
    elif option.kind == "int_list":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}: expected a list of integers such as [16, 32, 64], got {value!r}")
        value = [_as_int(name, item) for item in value]
    elif option.kind == "float_list":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}: expected a list of numbers such as [0.85, 1.0, 1.2], got {value!r}")
        value = [_as_float(name, item) for item in value]
    elif option.kind == "weights":
        if isinstance(value, str) and value in ("balanced", "none"):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}: expected balanced, none or a list of one weight per class, got {value!r}")
        value = [_as_float(name, item) for item in value]
        if any(item < 0 for item in value) or not any(item > 0 for item in value):
            raise ValueError(f"{name}: class weights must be >= 0 and not all 0, got {value}")
        return value
    elif option.kind == "search_space":
        return _check_search_space(name, value)
    elif option.kind == "threshold":
        if value == "auto":
            return value
        value = _as_float(name, value)
    elif option.kind == "number_list":
        if not isinstance(value, list) or not value:
            raise ValueError(f"{name}: expected a list of numbers such as [0, 128, 255], got {value!r}")
        value = [_as_float(name, item) for item in value]
        if len(set(value)) != len(value):
            raise ValueError(f"{name}: each value may stand for one class only, got {value}")
        return value
    elif option.kind == "colour_list":
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(colour, list) and len(colour) == 3 for colour in value)
        ):
            raise ValueError(
                f"{name}: expected a list of [r, g, b] colours such as [[0, 0, 0], [255, 0, 0]], got {value!r}"
            )
        value = [[_as_int(name, channel) for channel in colour] for colour in value]
        if any(not 0 <= channel <= 255 for colour in value for channel in colour) or len(
            {tuple(colour) for colour in value}
        ) != len(value):
            raise ValueError(f"{name}: colours are distinct [r, g, b] of 0..255, got {value}")
        return value
    elif option.kind in ("int_or_auto", "int_or_all"):
        word = option.kind.removeprefix("int_or_")
        if value == word:
            return value
        if isinstance(value, str):
            raise ValueError(f"{name}: expected an integer or {word}, got {value!r}")
        value = _as_int(name, value)
    if option.choices and value not in option.choices:
        raise ValueError(
            f"{name}: {value!r} is not one of {', '.join(map(str, option.choices))}{_suggest(str(value), list(map(str, option.choices)))}"
        )
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            _check_range(name, option, item)
    return value


def _check_search_space(name: str, space: Any) -> dict:
    """A search space ``{section.key: [choices] | {log_uniform | uniform: [low, high]}}``, its choices and
    range ends checked and converted as the option of their key says; ValueError names the entry."""
    if not isinstance(space, dict) or not space:
        raise ValueError(
            f"{name}: expected a mapping such as {{train.lr: {{log_uniform: [1e-4, 1e-2]}}, train.optim: [adam, adamw]}}, got {space!r}"
        )
    searchable = [
        f"{section}.{key}" for section, options in SCHEMA.items() if section != "overfit_one_batch" for key in options
    ]
    checked = {}
    for target, values in space.items():
        entry = f"{name}: {target}"
        if target not in searchable:
            raise ValueError(f"{entry}: not a key that a search can set{_suggest(str(target), searchable)}")
        section, _, key = target.partition(".")
        option = SCHEMA[section][key]
        if isinstance(values, list) and values:
            checked[target] = [_check(entry, option, value) for value in values]
        elif isinstance(values, dict) and len(values) == 1 and next(iter(values)) in SEARCH_RANGES:
            ((kind, ends),) = values.items()
            if option.kind != "float":
                raise ValueError(f"{entry}: a {kind} range needs a number key; list the choices of {target} instead")
            if not isinstance(ends, list) or len(ends) != 2:
                raise ValueError(f"{entry}: {kind} takes [low, high], got {ends!r}")
            low, high = (_check(entry, option, end) for end in ends)
            if not low < high or (kind == "log_uniform" and low <= 0):
                raise ValueError(
                    f"{entry}: {kind} needs {'0 < ' if kind == 'log_uniform' else ''}low < high, got [{low}, {high}]"
                )
            checked[target] = {kind: [low, high]}
        else:
            raise ValueError(
                f"{entry}: expected a list of choices, {{log_uniform: [low, high]}} or {{uniform: [low, high]}}, got {values!r}"
            )
    return checked


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    return value


def _as_float(name: str, value: Any) -> float:
    # YAML 1.1 reads 1e-5 (no dot) as text, so numbers written that way arrive as strings.
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _check_range(name: str, option: Option, value: float) -> None:
    if option.minimum is not None and value < option.minimum:
        raise ValueError(f"{name}: must be >= {option.minimum}, got {value}")
    if option.maximum is not None and value > option.maximum:
        raise ValueError(f"{name}: must be <= {option.maximum}, got {value}")
    if option.above is not None and value <= option.above:
        raise ValueError(f"{name}: must be > {option.above}, got {value}")


def _apply_legacy(config: dict, user_unet: dict, notices: list) -> None:
    unet = config["unet"]
    if unet["use_ln"] is not None:
        legacy_norm = "layer" if unet["use_ln"] else "none"
        if "norm" in user_unet and user_unet["norm"] != legacy_norm:
            raise ConfigError(
                [
                    f"unet.use_ln: {unet['use_ln']} contradicts unet.norm: {unet['norm']}; remove unet.use_ln (a legacy key)"
                ]
            )
        unet["norm"] = legacy_norm
        notices.append(f"unet.use_ln: {unet['use_ln']} is a legacy key: using unet.norm: {legacy_norm}")
        unet["use_ln"] = None
    if unet["input_shape"] is not None:
        notices.append(
            "unet.input_shape is a legacy key: the model works at every valid input size (its first value sets train.tile_size: auto)"
        )
        unet["input_shape"] = None


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
        f"train.tile_size auto: {train['tile_size']} px, the valid input nearest {target} px ({source}) for depth {depth} and padding {padding}"
    )


def _check_device(device: str, problems: list) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
        problems.append(f"train.device: {device!r} is not one of auto, cpu, cuda, cuda:N, mps")


def config_to_yaml(config: dict) -> str:
    """The config as YAML text, sections and keys in schema order."""
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


SPLIT_KEYS = (
    "dataset_name",
    "folds",
    "fold",
    "fold_order",
    "test_images",
    "val_images",
    "val_fraction",
    "val_data",
)  # what decides which images are test images, with split_seed()


def split_seed(train: dict) -> int:
    """The seed that draws the folds and the validation images: ``train.split_seed``, else ``train.seed``."""
    return train["seed"] if train.get("split_seed") is None else train["split_seed"]


def split_differences(saved: dict, current: dict) -> list[str]:
    """The ``train.*`` keys that choose the training, validation and test images, where two configs differ
    (a key that ``saved`` lacks, from a version before it, counts as its default)."""
    before = {key: saved["train"].get(key, SCHEMA["train"][key].default) for key in SPLIT_KEYS}
    differences = [
        f"train.{key}: checkpoint {before[key]!r}, config {current['train'][key]!r}"
        for key in SPLIT_KEYS
        if before[key] != current["train"][key]
    ]
    saved_seed, current_seed = split_seed(saved["train"]), split_seed(current["train"])
    if saved_seed != current_seed:
        differences.append(f"train.split_seed (else train.seed): checkpoint {saved_seed}, config {current_seed}")
    return differences


def architecture_differences(saved: dict, current: dict) -> list[str]:
    """The ``unet.*`` keys that change the weights' shapes or meaning, where two configs differ."""
    keys = ("input_channels", "image_channels", "num_classes", "padding", "norm", "upsample")
    return [
        f"unet.{key}: checkpoint {saved['unet'].get(key)!r}, config {current['unet'][key]!r}"
        for key in keys
        if saved["unet"].get(key) != current["unet"][key]
    ]
