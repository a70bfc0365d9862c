"""train.max_minutes: epochs planned from their timing, the schedule fitted to the plan, a clean end at the budget."""

import math
import time
from types import SimpleNamespace

import pytest
import torch

import training
from segmentation.checkpoints import Progress, read_checkpoint
from segmentation.config import load_config
from segmentation.engine import budget
from segmentation.engine.budget import TimeBudget
from segmentation.engine.resume import finished
from segmentation.engine.step import build_scheduler, fit_schedule
from tests.helpers import read_rows, tiny_config


def frozen_clock(monkeypatch, now: float) -> None:
    monkeypatch.setattr(budget, "time", SimpleNamespace(monotonic=lambda: now))


def test_with_steps_of_one_second_the_plan_fills_the_budget_and_the_schedule_ends_at_zero(tmp_path, monkeypatch):
    """A clock that advances 1 s per training step and not otherwise: 4-step epochs of 4 s, 30 s of budget."""
    now = {"seconds": 1000.0}
    monkeypatch.setattr(budget, "time", SimpleNamespace(monotonic=lambda: now["seconds"]))
    real_step = training.train_step

    def step_of_one_second(*arguments, **options):
        now["seconds"] += 1.0
        return real_step(*arguments, **options)

    monkeypatch.setattr(training, "train_step", step_of_one_second)
    config = tiny_config(tmp_path, "train.max_epochs=1000", "train.max_minutes=0.5", "train.run_name=c")
    training.train(config)
    rows = read_rows(tmp_path / "logs" / "c")
    # after epoch 1: 4 s used, epochs of 4 s, 26 s left: 6 more, 7 in all; every later plan agrees
    assert len(rows) == 7
    assert read_checkpoint(tmp_path / "weights" / "c" / "last.pt")["progress"]["planned_epochs"] == 7
    # epoch 1 follows the schedule of train.max_epochs (4000 steps); from its end on, the cosine (warm-up half an
    # epoch: 2 steps) of the plan's 28 steps, which step 28 ends
    steps = [int(row["step"]) for row in rows]
    assert steps == [4, 8, 12, 16, 20, 24, 28]
    lr = [float(row["lr"]) for row in rows]
    for step, value, total in zip(steps, lr, [4000] + [28] * 6):
        assert value == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (total - 2))), abs=1e-12)
    assert lr[-1] < 1e-12


def test_no_budget_plans_max_epochs_and_is_never_over(monkeypatch):
    frozen_clock(monkeypatch, 1e9)
    plain = TimeBudget(0.0, started=0.0)
    assert not plain.limited and not plain.over()
    assert plain.planned_epochs(3, 40, 100.0) == 40


def test_planned_epochs_fill_the_time_left_at_the_median_epoch_length(monkeypatch):
    frozen_clock(monkeypatch, 1030.0)
    # 1 minute, 10 s used before a resume and 20 s in this session: 30 s left
    run_budget = TimeBudget(1.0, used_before=10.0, started=1010.0, epoch_seconds=[10.0, 9.0, 30.0])
    # median epoch 10 s; the current one has trained 8 s, so its validation takes about 2 s: 28 s left, 2 more
    assert run_budget.planned_epochs(3, 40, 8.0) == 3 + 1 + 2
    assert run_budget.planned_epochs(3, 5, 8.0) == 5  # never more than train.max_epochs
    # before the first epoch has ended its training time is the measure: 20 s used, 12 s trained, 40 s left
    first = TimeBudget(1.0, started=1010.0)
    assert first.planned_epochs(0, 40, 12.0) == 1 + 3
    frozen_clock(monkeypatch, 2000.0)
    assert first.over()
    assert first.planned_epochs(0, 40, 12.0) == 1  # spent: the current epoch is the last


def test_fit_schedule_moves_the_decay_to_the_planned_end():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    train = load_config(None, ["train.max_epochs=10", "train.warmup_epochs=0", "train.lr=1.0"]).train
    scheduler = build_scheduler(optimizer, train, steps_per_epoch=10)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    assert math.isclose(scheduler.get_last_lr()[0], 0.5 * (1 + math.cos(math.pi * 20 / 100)))
    fit_schedule(scheduler, train, steps_per_epoch=10, epochs=4)
    optimizer.step()
    scheduler.step()
    assert math.isclose(scheduler.get_last_lr()[0], 0.5 * (1 + math.cos(math.pi * 21 / 40)))
    for _ in range(19):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] < 1e-9  # step 40: the end of 4 epochs


def test_finished_names_a_spent_budget():
    progress = Progress(run_name="r", epoch=3, seconds=61.0)
    assert "max_minutes" in finished(progress, 40, 0, max_minutes=1.0)
    assert finished(progress, 40, 0, max_minutes=2.0) is None
    assert finished(progress, 40, 0) is None


def test_a_budget_ends_the_run_cleanly_with_the_schedule_run_down(tmp_path, capsys):
    minutes = 0.1  # 6 s; an epoch of the tiny run takes a fraction of a second (curves.png, 1 s, at the end alone)
    budgeted = ["train.max_epochs=10000", f"train.max_minutes={minutes}", "train.log_epoch=10000"]
    config = tiny_config(tmp_path, *budgeted, "train.run_name=b")
    start = time.monotonic()
    result = training.train(config)
    elapsed = time.monotonic() - start
    assert not result.interrupted
    rows = read_rows(tmp_path / "logs" / "b")
    epochs = len(rows)
    assert 1 <= epochs < 10000
    longest = max(float(row["epoch_seconds"]) for row in rows)
    assert elapsed < 60 * minutes + 3 * longest + 10  # ended near the budget, not at max_epochs
    last = read_checkpoint(tmp_path / "weights" / "b" / "last.pt")["progress"]
    assert last["epoch"] == epochs and last["planned_epochs"] == epochs
    assert last["seconds"] >= 60 * minutes * 0.8
    assert "val_dice" in rows[-1]  # the last epoch was validated
    assert (tmp_path / "weights" / "b" / "best.pt").is_file()
    out = capsys.readouterr().out
    assert "time budget 0.1 min (train.max_minutes)" in out
    # resuming a spent run trains no further epoch
    resumed = training.train(tiny_config(tmp_path, *budgeted, "train.resume=auto"))
    assert resumed.progress.epoch == epochs
