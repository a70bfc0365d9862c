"""segmentation.config: loading, overrides, validation, the typed settings, and the shipped configs."""

import dataclasses
import re
import subprocess
import sys
import time
import tracemalloc

import pytest
import yaml

from segmentation.config import (
    SCHEMA,
    ConfigError,
    TrainSettings,
    UserError,
    default_config,
    load_config,
    parse_overrides,
    resolve,
)
from tests.helpers import ROOT, SEED_README_CONFIG, datasets_of, folder_config
from training import main as training_main


def problems_of(user: dict) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        resolve(user)
    return caught.value.problems


def test_shipped_config_documents_every_key_and_loads():
    text = (ROOT / "config.yaml").read_text()
    config = load_config(ROOT / "config.yaml")
    for section, options in SCHEMA.items():
        for key in options:
            line = next((line for line in text.splitlines() if re.match(rf"\s+{key}:", line)), None)
            assert line is not None, f"{section}.{key} missing from config.yaml"
            assert "#" in line and line.split("#", 1)[1].strip(), f"{section}.{key} has no comment in config.yaml"
    assert set(config.to_dict()) == set(SCHEMA)


def test_unknown_key_names_it_and_suggests_the_closest():
    problems = problems_of({"unet": {"nrom": "batch"}, "train": {"learning_rate": 0.1}})
    assert problems[0].startswith("unet.nrom: unknown key") and "did you mean unet.norm?" in problems[0]
    assert problems[1].startswith("train.learning_rate: unknown key")
    assert "did you mean" in problems_of({"trian": {"lr": 1}})[0]


def test_wrong_types_and_ranges_are_one_line_each():
    problems = problems_of(
        {
            "train": {"batch_size": "eight", "lr": -1, "val_fraction": 1.5, "use_bitsandbytes": "yes please"},
            "unet": {"padding": 2, "norm": "layernorm"},
        }
    )
    assert len(problems) == 6
    text = "\n".join(problems)
    assert "train.batch_size: expected an integer" in text
    assert "train.lr: must be > 0.0" in text
    assert "train.val_fraction: must be <= 0.9" in text
    assert "train.use_bitsandbytes: expected true or false" in text
    assert "unet.padding: 2 is not one of 0, 1" in text
    assert "unet.norm: 'layernorm' is not one of" in text and "did you mean layer?" in text


def test_yaml_exponent_without_dot_is_a_number():
    # PyYAML reads 1e-5 as the string '1e-5'
    assert yaml.safe_load("lr: 1e-5")["lr"] == "1e-5"
    config = load_config(None, ["train.lr=1e-5", "train.weight_decay=5E-4"])
    assert config.train.lr == pytest.approx(1e-5) and isinstance(config.train.lr, float)
    assert config.train.weight_decay == pytest.approx(5e-4)


def test_overrides_are_yaml_and_applied_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_size: 2\n")
    config = load_config(
        path, ["train.lr=3e-4", "unet.input_channels=[8, 16]", "train.run_name=null", "augment.flip=false"]
    )
    assert config.train.lr == pytest.approx(3e-4)
    assert config.train.batch_size == 2
    assert config.unet.input_channels == (8, 16)
    assert config.run.run_name is None and config.augment.flip is False
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_overrides(["trainlr=3"])


def test_seed_readme_config_is_accepted_with_the_same_meaning(tmp_path):
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_README_CONFIG)
    notices = []
    config = load_config(path, ["train.device=cpu"], notices)
    assert config.unet.norm == "layer"  # use_ln: True
    assert "input_shape" not in config.to_dict()["unet"]
    assert config.data.dataset_name == "pennfudan"
    assert config.train.lr == pytest.approx(1e-5)
    assert config.data.w_0 == pytest.approx(1.1) and config.run.early_stopping == 50
    assert any("use_ln" in n for n in notices) and any("input_shape is a legacy key" in n for n in notices)
    # the seed's input_shape[0] (320) with its padding 1 sets train.tile_size: auto, and the run says so
    assert config.data.tile_size == 320 and any(n.startswith("train.tile_size auto: 320 px") for n in notices)
    assert load_config(path, ["train.device=cpu", "unet.use_ln=false"]).unet.norm == "none"
    with pytest.raises(ConfigError, match="contradicts"):
        load_config(path, ["unet.norm=batch"])


def test_device_and_class_weight_checks():
    assert "train.device" in problems_of({"train": {"device": "gpu"}})[0]
    assert problems_of({"train": {"class_weights": [1, 2, 3]}}) == [
        "train.class_weights: 3 weights given but unet.num_classes is 2"
    ]
    assert resolve({"train": {"class_weights": [1, "2e0"]}}).data.class_weights == (1.0, 2.0)


def test_defaults_are_valid():
    expected = default_config()
    assert expected["train"]["tile_size"] == "auto"  # the run's plan decides it
    assert resolve({}).to_dict() == expected
    assert list(resolve({}).to_dict()["train"]) == list(expected["train"])  # the YAML's order


def test_settings_are_frozen_typed_and_round_trip_as_plain_data():
    config = load_config(None, ["unet.input_channels=[8, 16]", "train.test_images=[3, 4]", "predict.scales=[1.0, 1.2]"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.lr = 1.0
    assert isinstance(config.train, TrainSettings) and config.unet.depth == 2
    assert config.data.test_images == (3, 4) and config.predict.scales == (1.0, 1.2)
    data = config.to_dict()
    assert data["unet"]["input_channels"] == [8, 16] and data["train"]["test_images"] == [3, 4]
    assert yaml.safe_load(yaml.safe_dump(data)) == data  # plain data: YAML and checkpoints store it as it is
    assert resolve(data) == config
    changed = config.with_values({"train.lr": 0.01, "unet.norm": "group"})
    assert (changed.train.lr, changed.unet.norm, config.train.lr, config.unet.norm) == (0.01, "group", 1e-3, "batch")
    with pytest.raises(ConfigError, match="train.lr: must be > 0.0"):
        config.with_values({"train.lr": 0})


def test_a_config_stored_before_the_typed_settings_still_resolves():
    """Checkpoints of earlier versions store every key, the legacy ones as null, and lack newer keys."""
    stored = default_config()
    stored["unet"].update(use_ln=None, input_shape=None)
    stored["train"].update(tile_size=252)
    del stored["train"]["split_seed"]
    expected = default_config()
    expected["train"]["tile_size"] = 252
    notices = []
    assert resolve(stored, notices).to_dict() == expected and notices == []


@pytest.mark.slow
def test_cli_unknown_key_fails_in_one_line():
    result = subprocess.run(
        [sys.executable, "training.py", "train.max_epochs=1", "unet.foo=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unet.foo" in lines[0] and "unknown key" in lines[0]


@pytest.mark.parametrize("name", ["isbi2012", "isbi2012_cpu", "pennfudan", "pennfudan_cpu"])
def test_shipped_result_configs_hold_out_a_fixed_test_set(name):
    config = load_config(ROOT / "configs" / f"{name}.yaml", [], [])
    train = config.data
    test_images = train.test_images
    assert test_images and not set(test_images) & set(train.val_images or [])
    if name.startswith("isbi2012"):
        assert test_images == (24, 25, 26, 27, 28, 29) and train.val_images == (21, 22, 23)
        assert config.unet.padding == 0 and config.unet.image_channels == 1 and config.augment.elastic_std > 0
        assert (
            train.w_0 > 0 or name == "isbi2012_cpu"
        )  # the paper's set-up has border weights; the CPU recipe measured better without
    else:
        assert config.unet.padding == 1 and config.unet.image_channels == 3


@pytest.mark.parametrize("data_set", ["isbi2012", "pennfudan"])
def test_baseline_configs_are_plain_and_otherwise_the_recipe(data_set):
    recipe = load_config(ROOT / "configs" / f"{data_set}_cpu.yaml", [], [])
    baseline = load_config(ROOT / "configs" / f"baseline_{data_set}_cpu.yaml", [], [])
    # plain: cross-entropy without class or border weights, threshold 0.5 without calibration, no watershed cut
    assert baseline.train.loss == "ce" and baseline.data.class_weights == "none" and baseline.data.w_0 == 0
    assert (
        baseline.predict.threshold == 0.5
        and baseline.predict.watershed_seeds is None
        and baseline.predict.tta is False
        and baseline.predict.scales == (1.0,)
    )
    assert baseline.augment.elastic_std == 0 and baseline.augment.scale == 0 and baseline.augment.brightness == 0
    assert baseline.train.ema == 0 and baseline.train.optim == "adam"  # the optimizer's own weights
    # the same network, data, split and budget as the recipe
    assert baseline.unet == recipe.unet
    for key in (
        "dataset_name",
        "data",
        "test_images",
        "val_images",
        "val_fraction",
        "fold_order",
        "image_scale",
        "tile_size",
        "samples_per_image",
        "batch_size",
        "max_epochs",
        "precision",
        "channels_last",
        "lr",
        "seed",
        "split_seed",
        "best_metric",
    ):
        assert baseline.to_dict()["train"][key] == recipe.to_dict()["train"][key], key


def test_contradictory_fold_settings_are_one_line_each(image_folder):
    with pytest.raises(
        UserError,
        match=r"train.test_images: train.folds chooses the test images of each fold; set train.test_images=null",
    ):
        folder_config(image_folder, "train.folds=3", "train.test_images=[1]")
    with pytest.raises(UserError, match=r"train.val_images: train.folds chooses"):
        folder_config(image_folder, "train.folds=3", "train.val_images=[1]")
    with pytest.raises(UserError, match=r"train.fold: 3 is not among the 3 folds \(0..2, or all\)"):
        folder_config(image_folder, "train.folds=3", "train.fold=3")
    with pytest.raises(UserError, match=r"train.fold: 1 needs train.folds"):
        folder_config(image_folder, "train.fold=1")
    with pytest.raises(UserError, match=r"train.fold: expected an integer or all, got 'every'"):
        folder_config(image_folder, "train.folds=3", "train.fold=every")
    with pytest.raises(UserError, match=r"train.resume: with train.fold=all .* use train.resume=auto"):
        folder_config(image_folder, "train.folds=3", "train.fold=all", "train.resume=weights/x/last.pt")
    with pytest.raises(UserError, match=r"train.folds: 7 folds need at least 7 images, found 6"):
        datasets_of(folder_config(image_folder, "train.folds=7"), lambda message: None)


def test_the_boundary_class_is_for_two_classes_and_takes_a_weight_of_its_own():
    with pytest.raises(ConfigError, match="unet.boundary_class: true learns the borders of objects of two classes"):
        load_config(None, ["unet.boundary_class=true", "unet.num_classes=3"])
    with pytest.raises(ConfigError, match="unet.boundary_class: expected true, false or auto"):
        load_config(None, ["unet.boundary_class=sometimes"])
    config = load_config(None, ["unet.boundary_class=true", "train.class_weights=[1, 2, 4]"])
    assert config.data.class_weights == (1.0, 2.0, 4.0)
    with pytest.raises(ConfigError, match="train.class_weights: 3 weights given but unet.num_classes is 2"):
        load_config(None, ["train.class_weights=[1, 2, 4]"])


def refusal(capsys, *argv: str) -> str:
    """``python training.py ARGV`` run in this process, which must refuse its config: the one line it prints
    (exit code 2, nothing else on stdout or stderr)."""
    assert training_main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err[:2000]
    return err.strip()


def alias_bomb(levels: int, width: int) -> str:
    """A YAML alias bomb: a list of ``width`` words, then ``levels`` lists of ``width`` aliases of the list
    before, the last as train.val_images: a few hundred bytes that expand to ``width**(levels + 1)`` values."""
    names = [f"l{level}" for level in range(levels + 1)]
    lines = [f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]"]
    lines += [f"{name}: &{name} [{', '.join([f'*{below}'] * width)}]" for below, name in zip(names, names[1:])]
    return "\n".join([*lines, f"train: {{val_images: *{names[-1]}}}"]) + "\n"


def test_a_yaml_alias_bomb_is_refused_in_one_short_line_fast_and_in_little_memory(tmp_path, capsys):
    deep, wide = tmp_path / "deep_bomb.yaml", tmp_path / "wide_bomb.yaml"
    deep.write_text(alias_bomb(levels=8, width=9))  # the issue's: 9**10 values, 11 levels deep
    wide.write_text(alias_bomb(levels=5, width=20))  # 20**6 = 64 million values, 8 levels deep
    tracemalloc.start()
    start = time.perf_counter()
    try:
        lines = [refusal(capsys, "--config", str(path)) for path in (deep, wide)]
        seconds, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines == [
        f"config error: {deep}: nested more than 10 levels deep; a config holds sections of keys and short lists",
        f"config error: {wide}: holds more than 100,000 values, counting each use of a YAML alias (*name); a config "
        "holds hundreds: write it without aliases of aliases",
    ]
    # the expansion is never built (it took 1.8 GB and minutes); 30 s leaves room for a loaded CI machine
    assert seconds < 30 and peak < 50 * 2**20
    hundred = "&b [" + ", ".join(["&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + ["*a"] * 9) + "]"  # 100 values
    with pytest.raises(ConfigError, match=r"^train.val_images: holds more than 100,000 values"):
        load_config(None, [f"train.val_images=[{hundred}, {', '.join(['*b'] * 1000)}]"])
    assert load_config(None, ["train.val_images=[&v 1, *v]"]).data.val_images == (1, 1)  # an alias is fine


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "{a: " * 50_000 + "1" + "}" * 50_000,  # PyYAML reads nesting recursively: RecursionError
        "- " * 50_000 + "x",
        "train:\n  val_images: " + "[" * 11 + "1" + "]" * 11,  # readable, but 13 levels deep
    ],
    ids=["mappings", "block lists", "13 levels"],
)
def test_a_config_nested_thousands_deep_is_refused_in_one_line(tmp_path, capsys, text):
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    assert refusal(capsys, "--config", str(path)) == (
        f"config error: {path}: nested more than 10 levels deep; a config holds sections of keys and short lists"
    )


def test_an_override_nested_too_deep_is_refused_in_one_line():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.val_images=" + "[" * 20 + "]" * 20])
    assert caught.value.problems == [
        "train.val_images: nested more than 10 levels deep; a config holds sections of keys and short lists"
    ]


def test_a_binary_file_given_as_config_is_refused_in_one_line(tmp_path, capsys):
    binary = tmp_path / "program"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(128)) * 8)
    random = tmp_path / "random.yaml"
    random.write_bytes(b"train:\n  lr: 0.1\n" + bytes([0xFF, 0xFE, 0x00, 0xC3]))
    assert refusal(capsys, "--config", str(binary)) == (
        f"config error: {binary}: not a text (YAML) file: character 0 (#x7f) cannot be in YAML; give a config "
        "such as config.yaml"
    )
    assert refusal(capsys, "--config", str(random)) == (
        f"config error: {random}: not a text (YAML) file: byte 17 (#xff) is not UTF-8; give a config such as "
        "config.yaml"
    )
    huge = tmp_path / "huge.yaml"
    huge.write_text("# a comment\n" * 100_000)
    assert refusal(capsys, "--config", str(huge)) == (
        f"config error: {huge}: larger than 1 MiB; a config is a YAML text file of KBs"
    )


def test_a_key_or_section_given_twice_is_refused_naming_it_and_its_lines(tmp_path, capsys):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1e-3\n  batch_size: 2\n  lr: 1e-2\n")
    assert refusal(capsys, "--config", str(path)) == (
        f"config error: {path}: train.lr is given twice, on lines 2 and 4: keep one"
    )
    path.write_text("train: {lr: 1e-3}\nunet: {padding: 1}\ntrain: {lr: 1e-2}\n")
    assert refusal(capsys, "--config", str(path)) == (
        f"config error: {path}: train is given twice, on lines 1 and 3: keep one"
    )
    path.write_text("train: {lr: 1e-3, 'lr': 1e-2}\n")  # quoted or not, the same key
    assert refusal(capsys, "--config", str(path)) == (
        f"config error: {path}: train.lr is given twice, on line 1: keep one"
    )
    path.write_text("train: {<<: {lr: 0.1, seed: 1}, lr: 0.2}\n")  # a merge key's keys may be overridden
    config = load_config(path)
    assert (config.train.lr, config.train.seed) == (0.2, 1)


@pytest.mark.parametrize(
    ("name", "shown", "why"),
    [
        ("../../x", "'../../x'", "it holds a / or \\"),
        ("a/b", "'a/b'", "it holds a / or \\"),
        ("/abs", "'/abs'", "it holds a / or \\"),
        ("a\\b", "'a\\\\b'", "it holds a / or \\"),
        ("..", "'..'", "it is the current or the parent folder"),
        (".", "'.'", "it is the current or the parent folder"),
        ('"a\\0b"', "'a\\x00b'", "it holds a character that cannot be printed"),  # YAML's \0: a NUL
        (
            "x" * 201,
            f"'{'x' * 47}...{'x' * 48}'",
            "it is 201 bytes long (a folder name takes 255, with suffixes such as -fold3-2; at most 200)",
        ),
    ],
)
def test_a_run_name_must_be_one_folder_name(capsys, name, shown, why):
    assert refusal(capsys, f"train.run_name={name}") == (
        f"config error: train.run_name: {shown} is not one folder name: {why}; name the run, e.g. exp1"
    )


def test_a_run_name_from_a_file_is_checked_too_and_names_with_dots_stay_valid(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  run_name: /tmp/elsewhere\n")
    assert refusal(capsys, "--config", str(path)) == (
        "config error: train.run_name: '/tmp/elsewhere' is not one folder name: it holds a / or \\; name the run, "
        "e.g. exp1"
    )
    assert refusal(capsys, "train.run_name=''") == "config error: train.run_name: expected a text value, got ''"
    assert load_config(None, ["train.run_name=exp.1"]).run.run_name == "exp.1"
    assert load_config(None, ["train.run_name=" + "x" * 200]).run.run_name == "x" * 200


def test_synthetic_images_larger_than_the_pixel_limit_are_refused_naming_both_keys(image_folder, capsys):
    assert refusal(capsys, "train.synthetic_size=100000") == (
        "config error: train.synthetic_size: 100000 px per side makes images of 10,000,000,000 pixels, above "
        "train.max_image_pixels (1,073,741,824); lower train.synthetic_size or raise train.max_image_pixels"
    )
    assert load_config(None, ["train.synthetic_size=512", "train.max_image_pixels=262144"]).data.synthetic_size == 512
    # the synthetic size is no limit on a folder's images, which their reader checks against the limit
    assert folder_config(image_folder, "train.max_image_pixels=1000").data.max_image_pixels == 1000


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "train.max_epochs=" + "1" + "0" * 100,
            "train.max_epochs: about 10**100 is beyond any integer setting (at most 2**63 - 1)",
        ),
        ("train.lr=" + "1" + "0" * 400, "train.lr: expected a finite number, got about 10**400"),
        ("train.lr=.inf", "train.lr: expected a finite number, got inf"),
        ("train.lr=.nan", "train.lr: expected a finite number, got nan"),
        ("train.lr=2024-01-01", "train.lr: expected a finite number, got datetime.date(2024, 1, 1)"),
        (
            "train.run_name=2024-01-01",
            "train.run_name: expected a text value, got datetime.date(2024, 1, 1) (YAML reads it as date: quote it)",
        ),
        ("train.lr=2024-13-45", "train.lr: YAML cannot read a value: month must be in 1..12"),
        ("train.data=[" + "1, " * 100 + "]", "train.data: expected a text value, got [1, 1, 1, 1, 1, 1, 1, 1, ...]"),
        ("train.lr=\x01", "train.lr: not a text (YAML) value: character 0 (#x01) cannot be in YAML"),
    ],
    ids=[
        "huge int",
        "huge int as float",
        "inf",
        "nan",
        "date",
        "date as text",
        "no date",
        "long list",
        "control character",
    ],
)
def test_odd_yaml_values_are_refused_in_one_short_line(capsys, override, line):
    assert refusal(capsys, override) == f"config error: {line}"


def test_an_integer_too_long_for_python_is_one_line(capsys):
    line = refusal(capsys, "train.seed=" + "1" * 5000)  # Python reads at most 4300 digits (3.10.7 and later)
    assert line.startswith("config error: train.seed: ") and len(line) < 200


def test_an_ignore_value_that_is_also_a_class_is_refused_in_one_line():
    assert problems_of({"train": {"ignore_value": 1}}) == [
        "train.ignore_value: 1 is the class index of class 1: choose a value that no class uses (e.g. 255 for "
        "class-index masks, 128 for 0/255 masks)"
    ]
    masks = {"unet": {"num_classes": 3}, "train": {"mask_values": [0, 128, 255], "ignore_value": 255}}
    assert problems_of(masks)[0].startswith("train.ignore_value: 255 is the gray value of class 2")
    colours = {"train": {"mask_colors": [[0, 0, 0], [9, 9, 9]], "ignore_color": [9, 9, 9]}}
    assert problems_of(colours) == ["train.ignore_color: [9, 9, 9] is the colour of class 1: choose another"]
    assert problems_of({"train": {"ignore_color": [1, 2]}}) == [
        "train.ignore_color: expected one [r, g, b] colour, got [1, 2]"
    ]
    assert resolve({"train": {"ignore_value": 128}}).data.ignore_value == 128.0
