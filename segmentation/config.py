"""Settings: config.yaml and its key=value overrides, validated and resolved once into frozen dataclasses.

``load_config`` is all the entry points need: defaults, then the YAML file, then the overrides, checked
key by key and across keys, or a ``ConfigError`` with one line per problem. The result, ``Config``,
holds one frozen section each (``segmentation.settings`` declares them; the YAML's ``train`` section is
three: ``data``, ``train`` and ``run``). The library below the entry points receives a section or a few
values, never the whole config, and reads them as attributes. What depends on the data (``auto`` values,
tile sizes, classes) is not decided here but in the run's plan (``segmentation.plan``).
``Config.to_dict`` gives the plain data, in the YAML's layout, that run folders and checkpoints store;
``resolve`` reads it back.

This is the one module that knows the YAML's layout by its keys.
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
from segmentation.settings import (
    MODES,
    YAML_SECTIONS,
    AugmentSettings,
    DataSettings,
    OverfitSettings,
    PredictSettings,
    RunSettings,
    TrainSettings,
    UNetSettings,
    frozen,
    plain,
)


class UserError(Exception):
    """A problem with the user's config, data or files: printed as one line, without a traceback."""


class ConfigError(UserError):
    """One or more config problems, one per line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"  # the shipped config, beside the scripts
AUTO_TILE_SIDE = 256  # train.tile_size: auto aims here: a few cells of EM, a good part of a photo at half size


@dataclass(frozen=True)
class Config:
    """The resolved settings of a run, one frozen section each (``settings.YAML_SECTIONS`` says where each
    section's keys stand in config.yaml)."""

    unet: UNetSettings = field(default_factory=UNetSettings)
    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    run: RunSettings = field(default_factory=RunSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    overfit_one_batch: OverfitSettings = field(default_factory=OverfitSettings)

    def to_dict(self) -> dict:
        """The settings as plain data in config.yaml's layout (``{section: {key: value}}``, lists for tuples,
        schema order): what run folders write as YAML and checkpoints store."""
        data: dict = {}
        for section in fields(self):
            values = plain(dataclasses.asdict(getattr(self, section.name)))
            data.setdefault(YAML_SECTIONS[section.name], {}).update(values)
        return data

    def with_values(self, values: dict[str, Any]) -> Config:
        """These settings with ``{section.key: value}`` (config.yaml's names) set, resolved and checked again."""
        data = self.to_dict()
        for name, value in values.items():
            section, _, key = name.partition(".")
            data[section][key] = copy.deepcopy(value)
        return resolve(data)


# config.yaml's sections, each with the options of its keys (the train section's from three dataclasses)
SCHEMA: dict[str, dict[str, Option]] = {}
for _section in fields(Config):
    SCHEMA.setdefault(YAML_SECTIONS[_section.name], {}).update(
        {item.name: item.metadata["option"] for item in fields(_section.default_factory)}
    )


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
        _legacy_tile_size(config["train"], config["unet"], (legacy.get("input_shape") or [None])[0], notices)
    except ValueError as error:
        problems.append(f"train.tile_size: auto: {error}")
    problems += _cross_key_problems(config)
    if problems:
        raise ConfigError(problems)
    return settings_of(config)


def settings_of(config: dict) -> Config:
    """The frozen ``Config`` of a complete, checked config in the YAML's layout (plain data)."""
    sections = {}
    for item in fields(Config):
        values = config[YAML_SECTIONS[item.name]]
        sections[item.name] = item.default_factory(
            **{key.name: frozen(values[key.name]) for key in fields(item.default_factory)}
        )
    return Config(**sections)


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


def _legacy_tile_size(train: dict, unet: dict, legacy_side: int | None, notices: list) -> None:
    """The seed's ``unet.input_shape[0]`` under ``train.tile_size: auto``: the valid input size nearest it for
    the configured depth and padding, with a notice (otherwise the run's plan decides ``auto``)."""
    if train["tile_size"] != "auto" or legacy_side is None:
        return
    depth, padding = len(unet["input_channels"]), unet["padding"]
    train["tile_size"] = nearest_valid_input_size(legacy_side, depth, padding)
    notices.append(
        f"train.tile_size auto: {train['tile_size']} px, the valid input nearest {legacy_side} px "
        f"(unet.input_shape[0]) for depth {depth} and padding {padding}"
    )


def auto_tile_size(depth: int, padding: int) -> int:
    """``train.tile_size: auto`` for a network of ``depth`` poolings and ``padding``: the valid input size
    nearest ``AUTO_TILE_SIDE`` (the run's plan decides it; ``python dataset.py check`` suggests it)."""
    return nearest_valid_input_size(AUTO_TILE_SIDE, depth, padding)


def config_to_yaml(config: Config) -> str:
    """The settings as YAML text, sections and keys in schema order."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None)


def split_differences(saved: dict, current: DataSettings, seed: int) -> list[str]:
    """The ``train.*`` keys that choose the training, validation and test images, where a checkpoint's
    stored config ``saved`` (plain data) and ``current`` (with ``train.seed`` ``seed``) differ (a key that
    ``saved`` lacks, from a version before it, counts as its default)."""
    before = {key: saved["train"].get(key, SCHEMA["train"][key].default) for key in SPLIT_KEYS}
    now = plain(dataclasses.asdict(current))
    differences = [
        f"train.{key}: checkpoint {before[key]!r}, config {now[key]!r}" for key in SPLIT_KEYS if before[key] != now[key]
    ]
    saved_seed = saved["train"]["seed"] if saved["train"].get("split_seed") is None else saved["train"]["split_seed"]
    if saved_seed != current.split_seed_or(seed):
        differences.append(
            f"train.split_seed (else train.seed): checkpoint {saved_seed}, config {current.split_seed_or(seed)}"
        )
    return differences


def stored_boundary_class(saved: dict) -> bool:
    """Whether the network of a checkpoint from before plans, whose stored config is ``saved`` (plain data),
    has the boundary class (``unet.boundary_class`` as its run decided it; before the key: none)."""
    return saved["unet"].get("boundary_class", False) is True


def architecture_differences(
    saved: dict, current: UNetSettings, boundary_class: bool, keys: Sequence[str] = ARCHITECTURE_KEYS
) -> list[str]:
    """The ``unet.*`` keys among ``keys`` (default: all that change the weights' shapes or meaning) where a
    checkpoint's stored config ``saved`` (plain data; ``boundary_class``: whether its network has the
    boundary class, as its run decided) and ``current`` differ; ``auto`` in ``current`` accepts either."""
    now = plain(dataclasses.asdict(current))
    stored = {**saved["unet"], "boundary_class": boundary_class}
    return [
        f"unet.{key}: checkpoint {stored.get(key)!r}, config {now[key]!r}"
        for key in keys
        if stored.get(key) != now[key] and not (key == "boundary_class" and now[key] == "auto")
    ]
