"""The training loop: outputs, reproducibility, exact resume, interruption, NaN, errors."""

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import torch

import training
from dataset import build_datasets
from model import build_model
from segmentation.config import UserError, load_config, resolve
from segmentation.device import resolve_device
from segmentation.engine import step
from segmentation.engine.step import build_optimizer, lr_factor
from segmentation.engine.validation import evaluate
from tests.helpers import datasets_of, predictor_of
from tests.test_config import SEED_README_CONFIG
from training import train

ROOT = Path(__file__).resolve().parents[1]

# A tiny U-Net (widths 4, 8; depth 2 with valid convolutions: 60 px in, 20 px out) on small synthetic
# images: 4 training images x 2 tiles = 4 steps of 2 tiles per epoch, 2 validation images.
TINY = [
    "unet.input_channels=[4, 8]",
    "unet.padding=0",
    "train.synthetic_images=6",
    "train.synthetic_size=64",
    "train.val_fraction=0.34",
    "train.tile_size=60",
    "train.samples_per_image=2",
    "train.batch_size=2",
    "train.warmup_epochs=0.5",
    "train.device=cpu",
]


def tiny_config(tmp_path: Path, *overrides: str) -> dict:
    paths = [f"train.save_path={tmp_path / 'weights'}", f"train.log_path={tmp_path / 'logs'}"]
    return load_config(None, TINY + paths + list(overrides))


def read_rows(run_log: Path) -> list[dict]:
    with (run_log / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


def final_weights(summary: dict) -> dict:
    return torch.load(summary["run_weights"] / "last.pt", weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_lr_schedules_by_hand():
    assert lr_factor(0, 100, 10, "warmup-cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "warmup-cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)  # half-way: (1 + cos(pi/2)) / 2
    assert lr_factor(100, 100, 10, "cosine", min_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(70, 100, 0, "constant") == 1.0


def test_run_writes_checkpoints_metrics_and_plots(tmp_path):
    config = tiny_config(tmp_path, "train.max_epochs=2")
    summary = train(config)
    run_log, run_weights = summary["run_log"], summary["run_weights"]
    assert run_log.parent == tmp_path / "logs" and run_weights.parent == tmp_path / "weights"
    rows = read_rows(run_log)
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert all(0 <= float(row["val_pixel_error"]) <= 1 and math.isfinite(float(row["train_loss"])) for row in rows)
    for name in ("curves.png", "weight_map.png", "augmented_samples.png"):
        assert (run_log / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_config(run_log / "config.yaml") == config
    for name in ("last.pt", "best.pt"):
        state = torch.load(run_weights / name, weights_only=True)
        assert state["config"] == config.to_dict()
        assert {"model", "optimizer", "scheduler", "progress", "rng"} <= state.keys()
    last = torch.load(run_weights / "last.pt", weights_only=True)
    assert last["progress"]["epoch"] == 2 and last["progress"]["step"] == 8
    assert not list(run_weights.glob("*.tmp"))


def test_same_seed_same_losses_and_weights(tmp_path):
    first = train(tiny_config(tmp_path / "a", "train.max_epochs=1"))
    second = train(tiny_config(tmp_path / "b", "train.max_epochs=1"))
    other = train(tiny_config(tmp_path / "c", "train.max_epochs=1", "train.seed=1"))
    assert read_rows(first["run_log"])[0]["train_loss"] == read_rows(second["run_log"])[0]["train_loss"]
    assert_same_weights(final_weights(first), final_weights(second))
    assert read_rows(first["run_log"])[0]["train_loss"] != read_rows(other["run_log"])[0]["train_loss"]


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
    assert stopped["interrupted"] and stopped["epoch"] == 1 and stopped["batch"] == 2
    monkeypatch.setattr(training, "train_step", original_step)
    resumed = train(tiny_config(tmp_path / "resumed", "train.max_epochs=3", ema, "train.resume=auto"))
    assert not resumed["interrupted"] and resumed["run_log"] == stopped["run_log"]
    assert_same_weights(final_weights(resumed), final_weights(baseline))
    if ema.endswith("0.9"):  # the optimizer's weights resume too, and differ from their average
        resumed_state, baseline_state = (
            torch.load(run["run_weights"] / "last.pt", weights_only=True) for run in (resumed, baseline)
        )
        assert_same_weights(resumed_state["training_model"], baseline_state["training_model"])
        assert not torch.equal(baseline_state["model"]["outc.weight"], baseline_state["training_model"]["outc.weight"])
    assert [row["train_loss"] for row in read_rows(resumed["run_log"])] == [
        row["train_loss"] for row in read_rows(baseline["run_log"])
    ]


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


def test_nan_loss_stops_with_a_message_and_keeps_best(tmp_path, monkeypatch):
    first = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=nan"))
    best = (first["run_weights"] / "best.pt").read_bytes()
    original_loss = step.segmentation_loss
    monkeypatch.setattr(step, "segmentation_loss", lambda *args: original_loss(*args) * float("nan"))
    with pytest.raises(UserError, match="training loss became nan"):
        train(tiny_config(tmp_path, "train.max_epochs=3", "train.resume=auto"))
    assert (first["run_weights"] / "best.pt").read_bytes() == best


def test_resume_with_another_architecture_names_the_keys(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_epochs=1"))
    with pytest.raises(UserError, match=r"unet\.input_channels: checkpoint \[4, 8\], config \[4, 8, 16\]"):
        train(
            tiny_config(
                tmp_path,
                "unet.input_channels=[4, 8, 16]",
                "train.tile_size=124",
                f"train.resume={first['run_weights'] / 'last.pt'}",
            )
        )


def test_runs_never_overwrite_each_other(tmp_path):
    first = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=same"))
    second = train(tiny_config(tmp_path, "train.max_epochs=1", "train.run_name=same"))
    assert first["run_log"].name == "same" and second["run_log"].name == "same-2"
    assert (first["run_weights"] / "last.pt").exists() and (second["run_weights"] / "last.pt").exists()


def test_early_stopping_counts_epochs_without_improvement(tmp_path, monkeypatch):
    losses = iter([1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    monkeypatch.setattr(
        training,
        "evaluate",
        lambda *args: {"val_loss": next(losses), "val_pixel_error": 0.1, "val_dice": 0.9, "val_iou": 0.8},
    )
    summary = train(tiny_config(tmp_path, "train.max_epochs=6", "train.early_stopping=2", "train.best_metric=val_loss"))
    assert summary["epoch"] == 4 and summary["best_epoch"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_bitsandbytes_falls_back_to_torch_with_a_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    model = torch.nn.Linear(2, 2)
    train_config = load_config(None, ["train.use_bitsandbytes=true", "train.optim=adamw"]).train
    optimizer = build_optimizer(model, train_config, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    assert "bitsandbytes' 8-bit adamw does not work on cpu" in capsys.readouterr().err


def test_test_script_reproduces_the_validation_scores_and_writes_figures(tmp_path):
    summary = train(tiny_config(tmp_path, "train.max_epochs=2"))
    best = summary["run_weights"] / "best.pt"
    best_epoch = torch.load(best, weights_only=True)["progress"]["best_epoch"]
    logged = next(row for row in read_rows(summary["run_log"]) if int(row["epoch"]) == best_epoch)
    output = tmp_path / "figures"
    result = subprocess.run(
        [sys.executable, "test.py", "--checkpoint", str(best), "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    overall = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["all"]).split()
    assert float(overall[1]) == pytest.approx(float(logged["val_pixel_error"]), abs=1e-4)
    assert float(overall[2]) == pytest.approx(float(logged["val_dice"]), abs=1e-4)
    figures = sorted(output.glob("val_*.png"))
    assert len(figures) == 2 and all(path.read_bytes()[:4] == b"\x89PNG" for path in figures)


def test_update_ema_by_hand():
    torch.manual_seed(0)
    model, average = (torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)) for _ in range(2))
    model[1].num_batches_tracked.fill_(7)
    before = {key: value.clone() for key, value in average.state_dict().items()}
    step.update_ema(average, model, decay=0.9, step=0)  # the warm-up: d = min(0.9, 1 / 10) = 0.1
    assert torch.allclose(average[0].weight, 0.1 * before["0.weight"] + 0.9 * model[0].weight)
    before = {key: value.clone() for key, value in average.state_dict().items()}
    step.update_ema(average, model, decay=0.9, step=1000)  # d = min(0.9, 1001 / 1010) = 0.9
    for key in ("0.weight", "0.bias", "1.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(average.state_dict()[key], 0.9 * before[key] + 0.1 * model.state_dict()[key]), key
    assert average[1].num_batches_tracked.item() == 7  # copied, not averaged


def test_with_ema_validation_and_test_py_use_the_average(tmp_path):
    summary = train(tiny_config(tmp_path, "train.max_epochs=2", "train.ema=0.5"))
    last = torch.load(summary["run_weights"] / "last.pt", weights_only=True)
    config = resolve(last["config"])
    data = datasets_of(config)
    logged = read_rows(summary["run_log"])[-1]
    scores = {}
    for key in ("model", "training_model"):
        model = build_model(config.unet)
        model.load_state_dict(last[key])
        scores[key] = evaluate(predictor_of(model, config), data.val, config.train.loss)["val_loss"]
    assert scores["model"] != scores["training_model"]
    assert scores["model"] == pytest.approx(float(logged["val_loss"]), rel=1e-6)


def test_test_script_errors_are_one_line(tmp_path):
    missing = subprocess.run(
        [sys.executable, "test.py", f"train.save_path={tmp_path / 'nothing'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        f"error: no checkpoint found: looked for {tmp_path / 'nothing'}/*/best.pt; train first (python "
        "training.py) or pass --checkpoint PATH"
    ]
    summary = train(tiny_config(tmp_path, "train.max_epochs=1"))
    config_path = tmp_path / "other.yaml"
    config_path.write_text("unet:\n  input_channels: [4, 8, 16]\n  norm: layer\n")
    other = subprocess.run(
        [
            sys.executable,
            "test.py",
            "--checkpoint",
            str(summary["run_weights"] / "best.pt"),
            "--config",
            str(config_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 1
    lines = [
        line for line in other.stderr.strip().splitlines() if not line.startswith("note: train.tile_size auto")
    ]  # other.yaml's tile is auto
    assert (
        len(lines) == 1
        and "unet.input_channels" in lines[0]
        and "unet.norm: checkpoint 'batch', config 'layer'" in lines[0]
    )


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
    assert not summary["interrupted"] and summary["epoch"] == 1 and (summary["run_weights"] / "last.pt").exists()
    assert config.train.tile_size == 320 and "tiles of 320 px" in capsys.readouterr().out


def test_validation_of_a_single_class_everywhere_is_noted_once(tmp_path, monkeypatch, capsys):
    original = training.evaluate
    monkeypatch.setattr(
        training, "evaluate", lambda *args: {**original(*args), "uniform_images": 2}
    )  # both validation images
    train(tiny_config(tmp_path, "train.max_epochs=2"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "predicted as a single class everywhere" in line]
    assert len(notes) == 1 and notes[0].startswith("note: epoch 1: all 2 validation images")


def test_evaluate_counts_the_images_predicted_as_one_class(tmp_path):
    config = tiny_config(tmp_path)
    data = build_datasets(config.unet, config.train, lambda message: None)
    model = build_model(config.unet)
    assert evaluate(predictor_of(model, config), data.val, config.train.loss)["uniform_images"] in (0, 1, 2)
    with torch.no_grad():
        model.outc.bias.copy_(torch.tensor([-50.0, 50.0]))  # class 1 everywhere
    assert evaluate(predictor_of(model, config), data.val, config.train.loss)["uniform_images"] == len(data.val) == 2
