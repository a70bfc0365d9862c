"""segmentation.engine.search: overfitting one batch, the hyperparameter search, the learning-rate range test."""

import csv
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_training import TINY, tiny_config

import training
from dataset import EpochSampler
from segmentation.config import ConfigError, UserError, config_to_yaml, load_config
from segmentation.data.cache import write_entry
from segmentation.engine import search
from tests.helpers import ROOT


def read_trials(run_log: Path) -> list[dict]:
    with (run_log / "trials.csv").open() as file:
        return list(csv.DictReader(file))


def is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def overfit(config) -> dict:
    """``overfit_one_batch.overfit`` as training.py runs it."""
    return search.overfit_batch(config, config_to_yaml(config))


def find_lr(config) -> dict:
    """``overfit_one_batch.lr_find`` as training.py runs it."""
    return search.lr_find(config, config_to_yaml(config))


def test_overfit_reaches_a_loose_tolerance_with_the_training_step(tmp_path, monkeypatch, capsys):
    calls = []
    original_step = search.train_step
    monkeypatch.setattr(search, "train_step", lambda *args: calls.append(1) or original_step(*args))
    result = overfit(
        tiny_config(tmp_path, "train.lr=0.01", "overfit_one_batch.tolerance=0.1", "overfit_one_batch.max_steps=200")
    )
    assert result["reached"] and not result["diverged"]
    assert result["steps"] == len(result["losses"]) == len(calls) < 200
    assert result["losses"][-1] < 0.1 <= min(result["losses"][:-1])
    assert result["verdict"][0].startswith(f"reached tolerance 0.1 in {result['steps']} steps")
    assert f"verdict: reached tolerance 0.1 in {result['steps']} steps" in capsys.readouterr().out
    assert is_png(result["run_log"] / "loss.png") and result["run_log"].name.endswith("-overfit")


def test_absurd_lr_fails_with_the_lower_lr_hint(tmp_path):
    result = overfit(tiny_config(tmp_path, "train.lr=10", "train.grad_clip=0", "overfit_one_batch.max_steps=60"))
    assert not result["reached"]
    assert result["verdict"][0].startswith(("diverged at step", "did not reach"))
    assert any(line.startswith("hint:") and "lower train.lr (now 10)" in line for line in result["verdict"])


def test_tiny_lr_fails_with_the_raise_lr_hint(tmp_path):
    result = overfit(tiny_config(tmp_path, "train.lr=1e-9", "overfit_one_batch.max_steps=20"))
    assert not result["reached"] and not result["diverged"] and result["steps"] == 20
    assert result["verdict"][0].startswith("did not reach tolerance")
    assert any("raise train.lr" in line for line in result["verdict"][1:])
    assert not any("lower train.lr" in line for line in result["verdict"])


def test_the_batch_is_fixed_and_unaugmented(tmp_path):
    config = tiny_config(tmp_path, "train.batch_size=3")
    plan, train_set = search.planned_tiles(config)
    first, warnings = search.fixed_batch(train_set, plan, config.train)
    second, _ = search.fixed_batch(search.planned_tiles(config)[1], plan, config.train)
    smaller_config = tiny_config(tmp_path, "train.batch_size=2")
    smaller, _ = search.fixed_batch(train_set, plan, smaller_config.train)
    assert first[0].shape == (3, 1, 60, 60) and warnings == []
    order = list(EpochSampler(len(train_set), config.train.seed))[:3]
    for batch_tensor, raw in zip(first, zip(*(train_set[i] for i in order))):
        assert torch.equal(batch_tensor, torch.stack(raw))  # the dataset's tiles as they are: no augmentation
    for a, b, c in zip(first, second, smaller):
        assert torch.equal(a, b) and torch.equal(a[:2], c)


def test_labels_beyond_the_classes_are_an_error(tmp_path):
    config = tiny_config(tmp_path, "train.class_weights=none")  # a class weight per class could not weigh label 2
    plan, train_set = search.planned_tiles(config)
    doubled = []
    for index, prepared in enumerate(train_set.images):
        image, label, border = prepared.arrays()
        doubled.append(
            write_entry(tmp_path / f"doubled{index}", prepared.name, image, label * 2, border, 1, num_classes=3)
        )
    train_set.images = doubled
    with pytest.raises(UserError, match="label 2 but unet.num_classes is 2"):
        search.fixed_batch(train_set, plan, config.train)


def test_hp_search_ranks_trials_and_writes_a_trainable_best_config(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(training, "train", lambda config: trained.append(config) or SimpleNamespace(interrupted=False))
    space = "{train.lr: {log_uniform: [1e-3, 3e-2]}, train.optim: [adam, sgd]}"
    config = tiny_config(
        tmp_path,
        f"overfit_one_batch.search_space={space}",
        "overfit_one_batch.trials=3",
        "overfit_one_batch.tolerance=0.2",
        "overfit_one_batch.max_steps=40",
        "overfit_one_batch.hp_search=true",
        "overfit_one_batch.full_train=true",
    )
    assert training.run_config(config) == 0  # the search, then full training of its best config
    (run_log,) = (tmp_path / "logs").glob("*-hp_search")
    rows = read_trials(run_log)
    assert len(rows) == 3 and sorted(int(row["trial"]) for row in rows) == [1, 2, 3]

    def rule(row):
        if row["diverged"] == "True":
            return (2, 0.0)
        return (0, int(row["steps"])) if row["reached"] == "True" else (1, float(row["final_loss"]))

    assert rows == sorted(rows, key=rule) and [row["rank"] for row in rows] == ["1", "2", "3"]
    assert is_png(run_log / "trials.png")
    best = load_config(run_log / "best_config.yaml")
    assert best.train.lr == float(rows[0]["train.lr"]) and best.train.optim == rows[0]["train.optim"]
    modes = best.overfit_one_batch
    assert not (modes.overfit or modes.hp_search or modes.lr_find or modes.full_train)
    assert best.unet == config.unet and best.overfit_one_batch.search_space == config.overfit_one_batch.search_space
    assert trained == [best]


def test_grid_takes_every_combination_and_spaced_range_points(tmp_path):
    config = tiny_config(
        tmp_path,
        "overfit_one_batch.search_method=grid",
        "overfit_one_batch.grid_points=4",
        "overfit_one_batch.search_space={train.optim: [adam, adamw, sgd], train.lr: {log_uniform: [1e-4, 1e-1]}, "
        "unet.dropout: {uniform: [0, 0.3]}}",
    )
    points = search.search_points(config.overfit_one_batch)
    assert len(points) == 3 * 4 * 4
    assert sorted({point["train.lr"] for point in points}) == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1])
    assert sorted({point["unet.dropout"] for point in points}) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert len({tuple(point.values()) for point in points}) == len(points)
    assert len(search.trial_configs(config, points)) == len(points)


@pytest.mark.parametrize(
    "space, message",
    [
        (
            "{train.lrr: [0.1]}",
            "overfit_one_batch.search_space: train.lrr: not a key that a search can set (did you mean train.lr?)",
        ),
        ("{train.optim: [adam, rmsprop]}", "overfit_one_batch.search_space: train.optim: 'rmsprop' is not one of"),
        ("{train.lr: {log_uniform: [0, 1e-2]}}", "overfit_one_batch.search_space: train.lr: must be > 0.0, got 0.0"),
        ("{train.lr: {normal: [1e-3, 1e-2]}}", "overfit_one_batch.search_space: train.lr: expected a list of choices"),
        (
            "{train.optim: {uniform: [0, 1]}}",
            "overfit_one_batch.search_space: train.optim: a uniform range needs a number key",
        ),
        (
            "{unet.input_channels: [8, 16]}",
            "overfit_one_batch.search_space: unet.input_channels: expected a list of integers",
        ),
        (
            "{overfit_one_batch.max_steps: [10, 20]}",
            "overfit_one_batch.search_space: overfit_one_batch.max_steps: not a key that a search can set",
        ),
    ],
)
def test_bad_search_space_is_a_one_line_config_error(tmp_path, space, message):
    with pytest.raises(ConfigError) as caught:
        tiny_config(tmp_path, f"overfit_one_batch.search_space={space}")
    assert len(caught.value.problems) == 1 and caught.value.problems[0].startswith(message)


def test_a_trial_config_that_does_not_resolve_stops_before_any_trial(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "fit_one_batch", lambda *args: pytest.fail("a trial ran"))
    config = tiny_config(
        tmp_path,
        "train.lr=0.01",
        "train.min_lr=0.005",
        "overfit_one_batch.search_method=grid",
        "overfit_one_batch.search_space={train.lr: [0.01, 0.001]}",
    )
    with pytest.raises(ConfigError) as caught:
        search.hp_search(config)
    assert caught.value.problems == [
        "overfit_one_batch.search_space: trial 2 (train.lr=0.001): train.min_lr (0.005) is above train.lr (0.001)"
    ]
    config = tiny_config(tmp_path, "overfit_one_batch.search_space={unet.input_channels: [[4, 8], [4, 8, 16]]}")
    with pytest.raises(
        ConfigError, match=r"trial \d \(unet.input_channels=\[4, 8, 16\]\): train.tile_size: input size 60 does not fit"
    ):
        search.hp_search(config)


def test_a_diverging_trial_is_recorded_ranked_last_and_the_search_goes_on(tmp_path):
    config = tiny_config(
        tmp_path,
        "train.grad_clip=0",
        "train.optim=sgd",
        "overfit_one_batch.search_method=grid",
        "overfit_one_batch.search_space={train.lr: [1000.0, 0.01]}",
        "overfit_one_batch.max_steps=30",
    )
    summary = search.hp_search(config)
    rows = read_trials(summary["run_log"])
    assert [row["trial"] for row in rows] == ["2", "1"]
    assert rows[1]["diverged"] == "True" and rows[0]["diverged"] == "False"
    assert not math.isfinite(float(rows[1]["final_loss"])) and int(rows[1]["steps"]) < 30
    assert int(rows[0]["steps"]) == 30 or rows[0]["reached"] == "True"


def test_ctrl_c_in_trial_2_still_writes_trial_1(tmp_path, monkeypatch):
    original = search.fit_one_batch
    calls = []

    def interrupt_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(search, "fit_one_batch", interrupt_the_second)
    summary = search.hp_search(
        tiny_config(
            tmp_path, "overfit_one_batch.trials=3", "overfit_one_batch.max_steps=5", "overfit_one_batch.full_train=true"
        )
    )
    assert summary["interrupted"] and len(calls) == 2 and "full_train_config" not in summary
    rows = read_trials(summary["run_log"])
    assert [row["trial"] for row in rows] == ["1"]
    best = load_config(summary["run_log"] / "best_config.yaml")
    assert best.train.lr == float(rows[0]["train.lr"])
    assert is_png(summary["run_log"] / "trials.png")


def test_lr_find_plots_and_suggests_an_lr_in_range(tmp_path):
    result = find_lr(
        tiny_config(
            tmp_path,
            "overfit_one_batch.lr_find_steps=40",
            "overfit_one_batch.lr_find_min=1e-5",
            "overfit_one_batch.lr_find_max=10",
        )
    )
    assert 1e-5 <= result["lr"] <= 10
    assert result["lrs"] == pytest.approx(np.geomspace(1e-5, 10, 40)[: len(result["lrs"])])
    assert is_png(result["run_log"] / "lr_find.png")


def test_suggest_lr_picks_the_steepest_descent_before_the_minimum():
    lrs = np.geomspace(1e-6, 1, 50).tolist()
    smoothed = [
        1.0 / (1 + math.exp(3 * (math.log10(lr) + 3))) + (0.0 if lr < 0.1 else 10 * lr) for lr in lrs
    ]  # steepest at 1e-3
    lr, rule = search.suggest_lr(lrs, smoothed)
    assert lr == pytest.approx(1e-3, rel=0.4) and rule == "steepest descent of the smoothed loss"
    assert search.suggest_lr(lrs[:3], [1.0, 2.0, 3.0]) == (lrs[0], "lr of the lowest smoothed loss / 10")


@pytest.mark.slow
def test_cli_modes(tmp_path):
    paths = [
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        f"train.cache_dir={tmp_path / 'cache'}",
    ]
    both = subprocess.run(
        [
            sys.executable,
            "training.py",
            *TINY,
            *paths,
            "overfit_one_batch.overfit=true",
            "overfit_one_batch.hp_search=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert both.returncode == 2
    assert both.stderr.strip().splitlines() == [
        "config error: overfit_one_batch: overfit and hp_search are true together; set at most one of overfit, "
        "hp_search, lr_find"
    ]
    failed = subprocess.run(
        [
            sys.executable,
            "training.py",
            *TINY,
            *paths,
            "overfit_one_batch.overfit=true",
            "train.lr=1e-9",
            "overfit_one_batch.max_steps=5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "verdict: did not reach tolerance" in failed.stdout, failed.stderr
    assert len(list((tmp_path / "logs").glob("*-overfit/loss.png"))) == 1
