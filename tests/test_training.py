"""training.py: outputs, reproducibility, exact resume, interruption, NaN, out of memory, precision, folds and
one-line errors."""

import csv
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import test_script
import torch

import training
from model import build_model
from segmentation.config import UserError, load_config, resolve
from segmentation.data.synthetic import SyntheticSample, synthetic_em
from segmentation.engine import step
from segmentation.engine.resume import find_resume_checkpoint
from segmentation.engine.run import Processes
from segmentation.engine.validation import Validation, evaluate
from tests.helpers import (
    ROOT,
    SEED_README_CONFIG,
    SLICES,
    TINY,
    assert_same_weights,
    datasets_of,
    folder_overrides,
    make_rgb_folder,
    plain_folder_config,
    predictor_of,
    read_rows,
    run_out_of_memory,
    tiny_config,
)
from training import train


def final_weights(summary: dict) -> dict:
    return torch.load(summary.folders.weights / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_run_writes_checkpoints_metrics_and_plots(tmp_path):
    config = tiny_config(tmp_path, "train.max_epochs=2")
    summary = train(config)
    run_log, run_weights = summary.folders.log, summary.folders.weights
    assert run_log.parent == tmp_path / "logs" and run_weights.parent == tmp_path / "weights"
    rows = read_rows(run_log)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(0 <= float(row["val_pixel_error"]) <= 1 and math.isfinite(float(row["train_loss"])) for row in rows)
    for name in ("curves.png", "weight_map.png", "augmented_samples.png"):
        assert (run_log / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the run folder keeps the config as given and beside it the plan: unet.boundary_class auto decided by
    # the (generated) masks, train.tile_size as given
    assert load_config(run_log / "config.yaml") == config
    plan = json.loads((run_log / "plan.json").read_text())
    assert plan["boundary_class"] is False and plan["tile_size"] == 60 and plan["mask_reading"] == "generated"
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_weights / name, weights_only=True)
        assert state["config"] == config.to_dict() and state["plan"] == plan
        assert {"model", "optimizer", "scheduler", "progress", "rng"} <= state.keys()
    last = torch.load(run_weights / "last.pt", weights_only=True)
    assert last["progress"]["epoch"] == 2 and last["progress"]["step"] == 8
    assert not list(run_weights.glob("*.tmp"))


@pytest.mark.slow
def test_same_seed_same_losses_and_weights(tmp_path):
    first = train(tiny_config(tmp_path / "a", "train.max_epochs=1"))
    second = train(tiny_config(tmp_path / "b", "train.max_epochs=1"))
    other = train(tiny_config(tmp_path / "c", "train.max_epochs=1", "train.seed=1"))
    assert read_rows(first.folders.log)[0]["train_loss"] == read_rows(second.folders.log)[0]["train_loss"]
    assert_same_weights(final_weights(first), final_weights(second))
    assert read_rows(first.folders.log)[0]["train_loss"] != read_rows(other.folders.log)[0]["train_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("ema", ["train.ema=0", "train.ema=0.9"])
def test_stop_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, ema):
    baseline = train(tiny_config(tmp_path / "baseline", "train.max_epochs=3", ema))
    step_count = [0]
    original_step = training.train_step

    def step_then_interrupt(*args, **kwargs):
        loss = original_step(*args, **kwargs)
        step_count[0] += 1
        if step_count[0] == 6:  # epoch 2, batch 2 of 4: as if the user pressed Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(training, "train_step", step_then_interrupt)
    stopped = train(tiny_config(tmp_path / "resumed", "train.max_epochs=3", ema))
    assert stopped.interrupted and stopped.progress.epoch == 1 and stopped.progress.batch == 2
    monkeypatch.setattr(training, "train_step", original_step)
    resumed = train(tiny_config(tmp_path / "resumed", "train.max_epochs=3", ema, "train.resume=auto"))
    assert not resumed.interrupted and resumed.folders.log == stopped.folders.log
    assert_same_weights(final_weights(resumed), final_weights(baseline))
    if ema.endswith("0.9"):  # the optimizer's weights resume too, and differ from their average
        resumed_state, baseline_state = (
            torch.load(run.folders.weights / "last.pt", weights_only=True) for run in (resumed, baseline)
        )
        assert_same_weights(resumed_state["training_model"], baseline_state["training_model"])
        assert not torch.equal(baseline_state["model"]["outc.weight"], baseline_state["training_model"]["outc.weight"])
    assert [row["train_loss"] for row in read_rows(resumed.folders.log)] == [
        row["train_loss"] for row in read_rows(baseline.folders.log)
    ]


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_auto(tmp_path):
    overrides = TINY + [
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        f"train.cache_dir={tmp_path / 'cache'}",
        "train.max_epochs=60",
        "train.run_name=killed",
    ]
    process = subprocess.Popen(
        [sys.executable, "training.py", *overrides], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = tmp_path / "weights" / "killed" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (
        last.exists() and torch.load(last, weights_only=True)["progress"]["epoch"] >= 2
    ):
        time.sleep(0.2)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved_epoch = torch.load(last, weights_only=True)["progress"]["epoch"]
    assert 2 <= saved_epoch < 60
    resumed = subprocess.run(
        [
            sys.executable,
            "training.py",
            *overrides[:-2],
            "train.max_epochs=" + str(saved_epoch + 2),
            "train.resume=auto",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {last}" in resumed.stdout
    epochs = [int(row["epoch"]) for row in read_rows(tmp_path / "logs" / "killed")]
    assert epochs == list(range(1, saved_epoch + 3))


def test_a_new_run_has_a_last_pt_from_its_first_step_which_resume_auto_finds(tmp_path):
    older = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=older"))
    fresh = training.set_up(tiny_config(tmp_path, "train.run_name=fresh"), Processes(0, 1, torch.device("cpu")))
    saved = torch.load(fresh.folders.weights / "last.pt", weights_only=True)
    assert (saved["progress"]["step"], saved["progress"]["run_name"]) == (0, "fresh")
    # killed now, train.resume=auto continues this run, not the older one
    newest = find_resume_checkpoint("auto", tmp_path / "weights")
    assert newest == fresh.folders.weights / "last.pt" != older.folders.weights / "last.pt"


def saved_inside_an_epoch(last: Path) -> bool:
    """Whether ``last`` holds a step inside the second epoch or a later one."""
    if not last.exists():
        return False
    progress = torch.load(last, weights_only=True)["progress"]
    return progress["epoch"] >= 1 and progress["batch"] > 0


@pytest.mark.slow
def test_a_kill_between_two_time_based_saves_resumes_at_the_saved_step(tmp_path):
    overrides = [
        *[override for override in TINY if not override.startswith("train.samples_per_image")],
        "train.samples_per_image=16",  # 64 tiles, 32 steps of 2 per epoch: checks (every 10 steps) inside epochs
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        f"train.cache_dir={tmp_path / 'cache'}",
        "train.max_epochs=6",
    ]
    timed = [*overrides, "train.run_name=timed", "train.save_minutes=0.0001"]  # 6 ms: a save at every check
    process = subprocess.Popen(
        [sys.executable, "training.py", *timed], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = tmp_path / "weights" / "timed" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not saved_inside_an_epoch(last):
        time.sleep(0.01)
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(last, weights_only=True)["progress"]
    assert (
        0 < saved["batch"] < 32 and saved["batch"] % 10 == 0 and saved["step"] == 32 * saved["epoch"] + saved["batch"]
    )
    resumed = subprocess.run(
        [sys.executable, "training.py", *timed, "train.resume=auto"], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {last} at epoch {saved['epoch'] + 1}, batch {saved['batch']}" in resumed.stdout
    assert [int(row["epoch"]) for row in read_rows(tmp_path / "logs" / "timed")] == [1, 2, 3, 4, 5, 6]
    plain = subprocess.run(
        [sys.executable, "training.py", *overrides, "train.run_name=plain", "train.save_minutes=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed_weights, plain_weights = (
        torch.load(tmp_path / "weights" / run / "last.pt", weights_only=True)["model"] for run in ("timed", "plain")
    )
    assert_same_weights(resumed_weights, plain_weights)


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_best(tmp_path, monkeypatch):
    first = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=nan"))
    best = (first.folders.weights / "best.pt").read_bytes()
    original_loss = step.segmentation_loss
    monkeypatch.setattr(step, "segmentation_loss", lambda *args: original_loss(*args) * float("nan"))
    with pytest.raises(UserError, match="training loss became nan"):
        train(tiny_config(tmp_path, "train.max_epochs=3", "train.resume=auto"))
    assert (first.folders.weights / "best.pt").read_bytes() == best


@pytest.mark.slow
def test_resume_with_another_architecture_names_the_keys(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_epochs=1"))
    with pytest.raises(UserError, match=r"unet\.input_channels: checkpoint \[4, 8\], config \[4, 8, 16\]"):
        train(
            tiny_config(
                tmp_path,
                "unet.input_channels=[4, 8, 16]",
                "train.tile_size=124",
                f"train.resume={first.folders.weights / 'last.pt'}",
            )
        )


@pytest.mark.slow
def test_runs_never_overwrite_each_other(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=same"))
    second = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=same"))
    assert first.folders.log.name == "same" and second.folders.log.name == "same-2"
    assert (first.folders.weights / "last.pt").exists() and (second.folders.weights / "last.pt").exists()


@pytest.mark.slow
def test_early_stopping_counts_epochs_without_improvement(tmp_path, monkeypatch):
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    monkeypatch.setattr(
        training,
        "evaluate",
        lambda *args: Validation(next(losses), {"pixel_error": 0.1, "dice": 0.9, "iou": 0.8}),
    )
    summary = train(tiny_config(tmp_path, "train.max_epochs=6", "train.early_stopping=2", "train.best_metric=val_loss"))
    assert summary.progress.epoch == 4 and summary.progress.best_epoch == 2


@pytest.mark.slow
def test_with_ema_validation_and_test_py_use_the_average(tmp_path):
    summary = train(tiny_config(tmp_path, "train.max_epochs=2", "train.ema=0.5"))
    last = torch.load(summary.folders.weights / "last.pt", weights_only=True)
    config = resolve(last["config"])
    data = datasets_of(config)
    logged = read_rows(summary.folders.log)[-1]
    scores = {}
    for key in ("model", "training_model"):
        model = build_model(config.unet)
        model.load_state_dict(last[key])
        scores[key] = evaluate(predictor_of(model, config), data.val, config.train.loss).loss
    assert scores["model"] != scores["training_model"]
    assert scores["model"] == pytest.approx(float(logged["val_loss"]), rel=1e-6)


@pytest.mark.slow
def test_the_seed_readme_config_trains_as_written(tmp_path, capsys):
    """The seed repo's README config, unchanged but for the device, the data path, the network's
    size and the length: padding 1 and its input_shape[0] (320) give the tile, pedestrians the data."""
    rng = np.random.default_rng(0)
    for folder in ("PNGImages", "PedMasks"):
        (tmp_path / "PennFudanPed" / folder).mkdir(parents=True)
    for index in range(10):  # Penn-Fudan's official layout: photos and instance-id masks
        image = rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)
        mask = np.zeros((64, 80), np.uint8)
        mask[10:50, 5 + index : 25 + index], mask[12:60, 40:60] = 1, 2
        skimage.io.imsave(
            tmp_path / "PennFudanPed" / "PNGImages" / f"FudanPed{index:05d}.png", image, check_contrast=False
        )
        skimage.io.imsave(
            tmp_path / "PennFudanPed" / "PedMasks" / f"FudanPed{index:05d}_mask.png", mask, check_contrast=False
        )
    path = tmp_path / "seed.yaml"
    path.write_text(SEED_README_CONFIG)
    notices = []
    config = load_config(
        path,
        [
            "train.device=cpu",
            f"train.data={tmp_path / 'PennFudanPed'}",
            "unet.input_channels=[4, 8]",
            "train.max_epochs=1",
            f"train.save_path={tmp_path / 'weights'}",
            f"train.log_path={tmp_path / 'logs'}",
        ],
        notices,
    )
    summary = train(config)
    assert not summary.interrupted and summary.progress.epoch == 1 and (summary.folders.weights / "last.pt").exists()
    assert config.data.tile_size == 320 and "tiles of 320 px" in capsys.readouterr().out


@pytest.mark.slow
def test_validation_of_a_single_class_everywhere_is_noted_once(tmp_path, monkeypatch, capsys):
    original = training.evaluate
    # both validation images
    monkeypatch.setattr(training, "evaluate", lambda *args: dataclasses.replace(original(*args), uniform_images=2))
    train(tiny_config(tmp_path, "train.max_epochs=2"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "predicted as a single class everywhere" in line]
    assert len(notes) == 1 and notes[0].startswith("note: epoch 1: all 2 validation images")


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_with_bf16_channels_last_and_pinned_memory(tmp_path):
    precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    summary = train(
        tiny_config(
            tmp_path,
            "train.device=cuda",
            f"train.precision={precision}",
            "train.channels_last=true",
            "train.num_workers=2",
            "train.max_epochs=2",
        )
    )
    assert summary.progress.epoch == 2 and next(summary.model.parameters()).is_cuda
    assert all(torch.isfinite(parameter).all() for parameter in summary.model.parameters())


@pytest.mark.slow
def test_a_bf16_run_with_accumulation_and_checkpointing_trains_on_cpu(tmp_path):
    config = tiny_config(
        tmp_path,
        "train.precision=bf16",
        "train.activation_checkpointing=true",
        "train.grad_accum_steps=2",
        "train.batch_size=1",
        "train.max_epochs=6",
        "train.lr=3e-3",
    )
    summary = train(config)
    rows = read_rows(summary.folders.log)
    assert len(rows) == 6 and all(row["step"] == str(4 * (i + 1)) for i, row in enumerate(rows))
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_loss"]) < 0.9 * float(rows[0]["val_loss"])
    state = torch.load(summary.folders.weights / "last.pt", weights_only=True)
    assert state["model"]["inc.double_conv.0.weight"].dtype == torch.float32


@pytest.mark.slow
def test_fp16_run_saves_and_restores_its_loss_scale(tmp_path):
    summary = train(tiny_config(tmp_path, "train.precision=fp16", "train.max_epochs=1", "train.run_name=fp16"))
    scale = torch.load(summary.folders.weights / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale > 0
    resumed = train(tiny_config(tmp_path, "train.precision=fp16", "train.max_epochs=2", "train.resume=auto"))
    assert resumed.folders.weights == summary.folders.weights and resumed.progress.epoch == 2


@pytest.mark.slow
def test_a_failing_torch_compile_falls_back_to_eager_with_a_notice(tmp_path, monkeypatch, capsys):
    class FailingCompiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *inputs):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore details")

    monkeypatch.setattr(training.torch, "compile", FailingCompiled)
    summary = train(tiny_config(tmp_path, "train.compile=true", "train.max_epochs=2"))
    assert not summary.interrupted and summary.progress.epoch == 2
    assert (
        capsys.readouterr().err.count(
            "note: torch.compile failed (InductorError: no working C++ compiler found): training without it"
        )
        == 1
    )


@pytest.mark.slow
def test_out_of_memory_in_training_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, capsys):
    first = training.train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=oom"))
    saved = {name: (first.folders.weights / name).read_bytes() for name in ("last.pt", "best.pt")}
    run_out_of_memory(monkeypatch)
    with pytest.raises(UserError) as caught:
        training.train(tiny_config(tmp_path, "train.max_epochs=2", "train.resume=auto"))
    message = str(caught.value)
    assert "\n" not in message and message.startswith("out of memory while training on cpu (")
    assert (
        "GiB of RAM) at train.batch_size=2, train.tile_size=60, train.precision=fp32: lower train.batch_size or "
        "train.tile_size, or set train.activation_checkpointing=true" in message
    )
    assert message.endswith("the checkpoints saved so far are intact (continue with train.resume=auto)")
    assert {name: (first.folders.weights / name).read_bytes() for name in saved} == saved
    capsys.readouterr()
    overrides = [
        "unet.input_channels=[4, 8]",
        "train.synthetic_images=6",
        "train.synthetic_size=64",
        "train.tile_size=60",
        "train.batch_size=2",
        "train.device=cpu",
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        f"train.cache_dir={tmp_path / 'cache'}",
        "train.max_epochs=2",
    ]
    assert training.main(overrides) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and errors[0].startswith("error: out of memory while training on cpu")
        and "Traceback" not in err
    )


@pytest.mark.slow
def test_a_nan_loss_under_fp16_names_fp16_and_suggests_bf16(tmp_path, monkeypatch):
    original = step.segmentation_loss
    monkeypatch.setattr(step, "segmentation_loss", lambda *args: original(*args) * float("nan"))
    with pytest.raises(
        UserError,
        match=(
            r"training loss became nan .*: train.precision=fp16 overflows float16's range \(up to 65504\): use "
            r"train.precision=bf16, or lower train.lr"
        ),
    ):
        training.train(tiny_config(tmp_path, "train.precision=fp16", "train.max_epochs=1"))
    with pytest.raises(
        UserError, match=r"training loss became nan .*: lower train.lr \(now 0.001\) or set train.grad_clip"
    ):
        training.train(tiny_config(tmp_path / "fp32", "train.max_epochs=1"))


def every_fold_arguments(image_folder: Path) -> list[str]:
    """training.py overrides for train.fold=all over 3 folds of the test images, with a tiny model."""
    return [
        *folder_overrides(image_folder),
        "train.folds=3",
        "train.fold=all",
        "train.val_fraction=0.25",
        "train.warmup_epochs=0",
    ]


@pytest.mark.slow
def test_every_fold_trains_resumes_and_test_py_summarizes_them(image_folder, capsys):
    arguments = every_fold_arguments(image_folder)
    assert training.main([*arguments, "train.max_epochs=1", "train.run_name=cv"]) == 0
    printed = capsys.readouterr().out
    best = [image_folder / "weights" / f"cv-fold{fold}" / "best.pt" for fold in range(3)]
    assert printed.splitlines()[-1] == "python test.py --checkpoint " + " ".join(map(str, best))
    test_names = {}
    for fold, path in enumerate(best):
        state = torch.load(path, weights_only=True)
        assert state["config"]["train"]["fold"] == fold and state["progress"]["epoch"] == 1
        test_names[fold] = datasets_of(resolve(state["config"])).test.names
    assert sorted(sum(test_names.values(), [])) == SLICES

    # resume=auto continues the newest series: each fold from its last.pt, in its own folder
    assert training.main([*arguments, "train.max_epochs=2", "train.resume=auto"]) == 0
    assert sorted(path.name for path in (image_folder / "weights").iterdir()) == ["cv-fold0", "cv-fold1", "cv-fold2"]
    assert [torch.load(path.with_name("last.pt"), weights_only=True)["progress"]["epoch"] for path in best] == [2, 2, 2]
    capsys.readouterr()
    assert training.main([*arguments, "train.max_epochs=2", "train.resume=auto"]) == 0
    assert capsys.readouterr().err.count("has finished its 2 epochs; skipping it") == 3

    # test.py scores each fold on its own test images, then the mean and sample standard deviation;
    # an override after the checkpoints is an override, not a path
    assert (
        test_script.main(
            ["--checkpoint", *map(str, best), "train.device=cpu", "--output", str(image_folder / "scores")]
        )
        == 0
    )
    printed = capsys.readouterr().out
    per_fold = [
        [float(value) for value in line.split()[1:]] for line in printed.splitlines() if line.split()[:1] == ["all"]
    ]
    rows = {
        line.split()[0]: [float(value) for value in line.split()[1:]]
        for line in printed.splitlines()
        if line.split()[:1] and line.split()[0] in ("cv-fold0", "cv-fold1", "cv-fold2", "mean", "std")
    }
    assert len(per_fold) == 3 and [rows[f"cv-fold{fold}"] for fold in range(3)] == per_fold
    for column in range(len(per_fold[0])):
        values = [row[column] for row in per_fold]
        assert rows["mean"][column] == pytest.approx(statistics.mean(values), abs=1.1e-4)  # both rounded to 4 decimals
        assert rows["std"][column] == pytest.approx(statistics.stdev(values), abs=2e-4)
    for fold in range(3):  # each fold's masks are those of its own test images
        assert (
            sorted(path.name for path in (image_folder / "scores" / f"cv-fold{fold}" / "masks").glob("*.png"))
            == test_names[fold]
        )
    capsys.readouterr()
    assert test_script.main(["--checkpoint", *map(str, best), "--input", str(image_folder / "images")]) == 1
    assert "--input and --export take one" in capsys.readouterr().err


@pytest.mark.slow
def test_every_fold_skips_folds_that_early_stopping_ended(image_folder, capsys, monkeypatch):
    # a validation loss that never improves: each fold stops after epoch 2 of 4 (patience 1)
    monkeypatch.setattr(
        training, "evaluate", lambda *args: Validation(1.0, {"pixel_error": 0.1, "dice": 0.9, "iou": 0.8})
    )
    arguments = [
        *every_fold_arguments(image_folder),
        "train.max_epochs=4",
        "train.early_stopping=1",
        "train.best_metric=val_loss",
        "train.run_name=es",
    ]
    assert training.main(arguments) == 0
    last = [image_folder / "weights" / f"es-fold{fold}" / "last.pt" for fold in range(3)]
    assert [torch.load(path, weights_only=True)["progress"]["epoch"] for path in last] == [2, 2, 2]
    capsys.readouterr()
    assert training.main([*arguments, "train.resume=auto"]) == 0
    assert capsys.readouterr().err.count("ended by early stopping; skipping it") == 3
    assert [torch.load(path, weights_only=True)["progress"]["epoch"] for path in last] == [2, 2, 2]
    # without early stopping now, the same runs continue to max_epochs
    assert (
        training.main(
            [
                *every_fold_arguments(image_folder),
                "train.max_epochs=4",
                "train.best_metric=val_loss",
                "train.run_name=es",
                "train.resume=auto",
            ]
        )
        == 0
    )
    assert [torch.load(path, weights_only=True)["progress"]["epoch"] for path in last] == [4, 4, 4]


@pytest.mark.slow
def test_three_synthetic_classes_are_trained_predicted_and_scored_per_class(tmp_path, capsys):
    image, label, _ = synthetic_em(96, np.random.default_rng(0), classes=3)
    assert set(np.unique(label)) == {0, 1, 2} and 0.01 < np.mean(label == 2) < 0.1  # organelles: a rare third class
    summary = train(
        tiny_config(
            tmp_path, "unet.num_classes=3", "train.max_epochs=2", "train.synthetic_size=96", "train.samples_per_image=4"
        )
    )
    with (summary.folders.log / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert all(0 <= float(rows[-1][f"val_dice_{c}"]) <= 1 for c in range(3))
    assert (summary.folders.log / "curves.png").read_bytes()[:4] == b"\x89PNG"
    best = str(summary.folders.weights / "best.pt")
    capsys.readouterr()
    assert test_script.main(["--checkpoint", best, "--output", str(tmp_path / "diagnostics")]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.strip().startswith("image"))
    assert (
        header.split()[-6:] == ["Dice", "0", "Dice", "1", "Dice", "2"] and header.count("Dice") == 4
    )  # foreground mean, then each class
    counts = np.zeros((3, 3), dtype=np.int64)  # true class x predicted class, counted from the written files
    for mask_path in sorted((tmp_path / "diagnostics" / "masks").glob("*.png")):
        written = skimage.io.imread(mask_path)
        assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 1, 2}  # class indices, not 0/255
        index = int(mask_path.stem.split()[-1])
        truth = SyntheticSample(mask_path.stem, 0, index, 96, 3).read({}).label
        np.add.at(counts, (truth.ravel(), written.ravel()), 1)
    line = next(line for line in table.splitlines() if line.strip().startswith("all")).split()
    for c in range(3):
        dice = (
            2 * counts[c, c] / (counts[c].sum() + counts[:, c].sum()) if counts[c].sum() + counts[:, c].sum() else 1.0
        )
        assert float(line[-3 + c]) == pytest.approx(dice, abs=1e-4)


@pytest.mark.slow
def test_training_on_a_folder_of_rgb_images_with_0_255_masks(tmp_path):
    make_rgb_folder(tmp_path / "data", count=5, size=(64, 72))
    summary = train(
        plain_folder_config(
            tmp_path / "data",
            "unet.input_channels=[4, 8]",
            "unet.image_channels=3",
            "unet.padding=1",
            "train.tile_size=32",
            "train.batch_size=2",
            "train.max_epochs=2",
            "train.device=cpu",
            "train.val_fraction=0.2",
            f"train.save_path={tmp_path / 'w'}",
            f"train.log_path={tmp_path / 'l'}",
        )
    )
    assert (summary.folders.weights / "best.pt").exists() and 0 <= summary.validation.value("val_pixel_error") <= 1
