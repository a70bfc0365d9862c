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
from segmentation.options import DEVICE_PATTERN, Option, check_value, clipped, shown, suggest
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
# What no config is, refused before anything is built from it; the shipped config is 12 KB, 4 levels deep,
# of a few hundred values. A YAML alias bomb (lists of aliases of lists of aliases) expands a 1 KB file to
# billions of values, and PyYAML reads nesting recursively.
MAX_CONFIG_BYTES = 2**20
MAX_VALUES = 100_000  # counting each use of an alias
MAX_DEPTH = 10  # nested mappings and lists, the top mapping of sections included
MERGE_TAG = "tag:yaml.org,2002:merge"  # the << key, whose keys the mapping's own may override


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
ARCHITECTURE_KEYS = (
    "input_channels",
    "image_channels",
    "num_classes",
    "padding",
    "norm",
    "upsample",
    "boundary_class",
    "dims",
)


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
            problems.append(f"{shown(item)}: overrides are written section.key=value, for example train.lr=3e-4")
            continue
        try:
            value = load_yaml(text, name.strip())
        except ConfigError as error:
            problems += error.problems
            continue
        nested.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError(problems)
    return nested


def read_yaml(path: str | Path) -> dict:
    """Read a config file (``load_yaml``: safe YAML that is a config's size); an empty file is an empty config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: config file not found"])
    with path.open("rb") as file:
        text = file.read(MAX_CONFIG_BYTES + 1)  # no more: a config given a disk image must not fill the memory
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES // 2**20} MiB; a config is a YAML text file of KBs"])
    data = load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError([f"{path}: a config is a mapping of sections (unet:, train:, augment:), not {kind}"])
    return data


def load_yaml(text: str | bytes, where: str) -> Any:
    """One YAML document (a file's bytes, or an override's value), read as ``yaml.safe_load`` reads it but
    refusing in one line, named by ``where``, what is no config: bytes that are not text, a key given twice
    in one mapping (YAML would keep the last silently), and ``MAX_DEPTH`` or ``MAX_VALUES`` exceeded. These
    are checked on the composed nodes, before any value is built."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # reads the first bytes already, to tell the encoding
        node = loader.get_single_node()
        if node is None:
            return None
        _check_nodes(node, where)
        return loader.construct_document(node)
    except RecursionError:  # PyYAML composes nested nodes recursively: thousands of levels end here
        raise ConfigError([_too_deep(where)]) from None
    except yaml.reader.ReaderError as error:  # bytes that are not UTF-8, or a character YAML does not allow
        raise ConfigError([_not_text(error, where, "file" if isinstance(text, bytes) else "value")]) from None
    except yaml.YAMLError as error:
        raise ConfigError([f"{where}: not valid YAML: {_yaml_problem(error)}"]) from None
    except ValueError as error:  # from SafeLoader's constructors: a date 2024-13-45, an integer of 5000 digits
        raise ConfigError([f"{where}: YAML cannot read a value: {clipped(str(error).partition(';')[0])}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _not_text(error: yaml.reader.ReaderError, where: str, noun: str) -> str:
    """What makes a config ``file`` or an override's ``value`` binary rather than YAML text, in one line."""
    if error.encoding == "unicode":
        found = f"character {error.position} (#x{error.character:02x}) cannot be in YAML"
    else:
        found = f"byte {error.position} (#x{error.character:02x}) is not UTF-8"
    return f"{where}: not a text (YAML) {noun}: {found}" + (
        "; give a config such as config.yaml" if noun == "file" else ""
    )


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, in one line."""
    if not isinstance(error, yaml.MarkedYAMLError) or not error.problem:
        return clipped(str(error).strip().replace("\n", " "))
    mark = error.problem_mark
    return clipped(error.problem) + (f" (line {mark.line + 1}, column {mark.column + 1})" if mark else "")


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Refuse composed YAML nodes nested deeper than ``MAX_DEPTH``, of more than ``MAX_VALUES`` values or
    with a key given twice in one mapping. An alias is the node it names, walked at each use: the count is
    the size of the expanded data, which the walk never builds and leaves once it passes the limit."""
    pending = [(root, 1, ())]  # (node, its depth, the keys that lead to it)
    for _ in range(MAX_VALUES + 1):
        if not pending:
            return
        node, depth, keys = pending.pop()
        if isinstance(node, yaml.ScalarNode):
            continue
        if depth > MAX_DEPTH:
            raise ConfigError([_too_deep(where)])
        if isinstance(node, yaml.SequenceNode):
            pending += [(item, depth + 1, keys) for item in node.value]
        else:
            _check_keys(node, where, keys)
            pending += [(value, depth + 1, (*keys, key)) for key, value in node.value]
    raise ConfigError(
        [
            f"{where}: holds more than {MAX_VALUES:,} values, counting each use of a YAML alias (*name); "
            "a config holds hundreds: write it without aliases of aliases"
        ]
    )


def _check_keys(mapping: yaml.MappingNode, where: str, keys: tuple) -> None:
    """Refuse a key that ``mapping`` holds twice, naming it and the lines of both."""
    seen: dict = {}
    for key, _ in mapping.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == MERGE_TAG:
            continue  # a list or mapping as key cannot be a dict's key: the constructor refuses it
        identity = (key.tag, key.value)
        if identity in seen:
            name = ".".join(clipped(str(node.value)) for node in (*keys, key))
            lines = sorted({seen[identity].start_mark.line + 1, key.start_mark.line + 1})
            where_given = f"line {lines[0]}" if len(lines) == 1 else f"lines {lines[0]} and {lines[1]}"
            raise ConfigError([f"{where}: {name} is given twice, on {where_given}: keep one"])
        seen[identity] = key


def _too_deep(where: str) -> str:
    return f"{where}: nested more than {MAX_DEPTH} levels deep; a config holds sections of keys and short lists"


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
            problems.append(
                f"{clipped(str(section))}: unknown section{suggest(str(section), SCHEMA)}; known sections: {known}"
            )
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of keys, got {shown(values)}")
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            option = SCHEMA[section].get(key) or LEGACY.get(section, {}).get(key)
            if option is None:
                close = suggest(name, [*searchable, *_keys("overfit_one_batch")])
                problems.append(f"{clipped(name)}: unknown key{close}")
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
    if not re.fullmatch(DEVICE_PATTERN, train["device"]):
        problems.append(f"train.device: {shown(train['device'])} is not one of auto, cpu, cuda, cuda:N, mps")
    problems += _run_name_problems(train["run_name"])
    problems += _ignore_problems(train, classes)
    problems += _volume_problems(unet, train, config["augment"])
    side, most = train["synthetic_size"], train["max_image_pixels"]
    if train["dataset_name"] == "synthetic" and side**2 > most:
        problems.append(
            f"train.synthetic_size: {side} px per side makes images of {side**2:,} pixels, above "
            f"train.max_image_pixels ({most:,}); lower train.synthetic_size or raise train.max_image_pixels"
        )
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


def _run_name_problems(name: str | None) -> list[str]:
    """``train.run_name`` names one folder under ``train.log_path`` and one under ``train.save_path``: a path
    (``a/b``, ``../x``, ``/abs``) would write elsewhere, or over another run's files."""
    if name is None:
        return []
    size = len(name.encode(errors="surrogatepass"))
    broken = {
        "it holds a / or \\": "/" in name or "\\" in name,
        "it is the current or the parent folder": name in (".", ".."),
        "it holds a character that cannot be printed": not name.isprintable(),
        f"it is {size} bytes long (a folder name takes 255, with suffixes such as -fold3-2; at most 200)": size > 200,
    }
    why = next((reason for reason, holds in broken.items() if holds), None)
    return [f"train.run_name: {shown(name)} is not one folder name: {why}; name the run, e.g. exp1"] if why else []


def _ignore_problems(train: dict, classes: int) -> list[str]:
    """``train.ignore_value`` or ``ignore_color`` that is also a class's value or colour, or no colour."""
    value, colour = train["ignore_value"], train["ignore_color"]
    problems = []
    if value is not None:
        values = train["mask_values"] if train["mask_values"] is not None else range(classes)
        if value in values:
            kind = "gray value" if train["mask_values"] is not None else "class index"
            problems.append(
                f"train.ignore_value: {value:g} is the {kind} of class {list(values).index(value)}: choose a value "
                "that no class uses (e.g. 255 for class-index masks, 128 for 0/255 masks)"
            )
    if colour is not None:
        if len(colour) != 3:
            problems.append(f"train.ignore_color: expected one [r, g, b] colour, got {shown(colour)}")
        elif train["mask_colors"] is not None and list(colour) in [list(c) for c in train["mask_colors"]]:
            index = [list(c) for c in train["mask_colors"]].index(list(colour))
            problems.append(f"train.ignore_color: {list(colour)} is the colour of class {index}: choose another")
    return problems


def _volume_problems(unet: dict, train: dict, augment: dict) -> list[str]:
    """What a 3D run (``unet.dims: 3``) cannot take: a spacing of other than 3 sizes, photographs, bicubic warps."""
    problems = []
    if train["spacing"] is not None and len(train["spacing"]) != 3:
        problems.append(f"train.spacing: expected the voxel size [z, y, x], got {shown(train['spacing'])}")
    if unet["dims"] == 3 and train["dataset_name"] == "pennfudan":
        problems.append("unet.dims: 3 trains on volumes, and Penn-Fudan holds photographs: set unet.dims: 2")
    if unet["dims"] == 3 and augment["interpolation"] == "bicubic":
        problems.append("augment.interpolation: bicubic warps only images; volumes take bilinear (trilinear)")
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
    stored = {"dims": 2, **saved["unet"], "boundary_class": boundary_class}  # checkpoints from before dims: 2D
    return [
        f"unet.{key}: checkpoint {stored.get(key)!r}, config {now[key]!r}"
        for key in keys
        if stored.get(key) != now[key] and not (key == "boundary_class" and now[key] == "auto")
    ]
