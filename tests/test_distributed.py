"""segmentation.engine.distributed: DistributedDataParallel under torchrun, 2 CPU processes with gloo, and one
process (NCCL on a GPU)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import build_model
from segmentation.config import load_config
from segmentation.engine.validation import evaluate
from tests.helpers import NEEDS_CUDA, ROOT, TINY, assert_same_weights, datasets_of, predictor_of


def torchrun(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Train with 2 processes; each saves the weights it ended with as out/rank<N>.pt."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "tests" / "ddp_worker.py"),
        str(out),
        *overrides,
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_two_processes_train_the_same_weights_and_only_process_0_writes(tmp_path):
    overrides = [
        *TINY,
        f"train.cache_dir={tmp_path / 'cache'}",
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        "train.max_epochs=2",
        "train.run_name=ddp",
    ]
    result = torchrun(tmp_path, *overrides)
    # 8 tiles per epoch, 2 per process and step: 2 steps of 4
    assert "2 steps of 4 = 2 x 1 accumulated x 2 processes" in result.stdout
    assert result.stdout.count("U-Net ") == 1, "only process 0 prints"
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert_same_weights(rank0, rank1)
    assert any("running_mean" in key for key in rank0), "the test should cover BatchNorm buffers"
    assert not (tmp_path / "rank1").exists(), "process 1 wrote files"
    assert sorted(path.name for path in (tmp_path / "weights").iterdir()) == ["ddp"]
    assert sorted(path.name for path in (tmp_path / "weights" / "ddp").iterdir()) == ["best.pt", "last.pt"]
    last = torch.load(tmp_path / "weights" / "ddp" / "last.pt", weights_only=True)
    assert_same_weights(last["model"], rank0)
    with (tmp_path / "logs" / "ddp" / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert [row["step"] for row in rows] == ["2", "4"]

    # each process scored one of the 2 validation images: the gathered scores are those of all of them
    config = load_config(None, overrides)
    model = build_model(config.unet)
    model.load_state_dict(rank0)
    scores = evaluate(
        predictor_of(model, config),
        datasets_of(config, lambda message: None).val,
        config.train.loss,
    )
    for key in ("val_loss", "val_pixel_error", "val_dice", "val_rand_error"):
        assert float(rows[-1][key]) == pytest.approx(scores.value(key), rel=1e-5, abs=1e-6), key

    # resumed by both processes from process 0's checkpoint
    result = torchrun(tmp_path, *overrides[:-2], "train.max_epochs=3", "train.resume=auto")
    assert "resuming" in result.stdout and "at epoch 3, batch 0" in result.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert_same_weights(rank0, rank1)
    assert not (tmp_path / "rank1").exists()
    with (tmp_path / "logs" / "ddp" / "metrics.csv").open() as file:
        assert [row["step"] for row in csv.DictReader(file)] == ["2", "4", "6"]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_a_one_process_torchrun_run_saves_and_resumes(tmp_path, device):
    """torchrun with one process joins a process group (NCCL on CUDA, gloo on the CPU), trains, saves,
    and resumes from its checkpoint."""
    overrides = [
        *TINY,
        f"train.device={device}",
        f"train.cache_dir={tmp_path / 'cache'}",
        f"train.save_path={tmp_path / 'weights'}",
        f"train.log_path={tmp_path / 'logs'}",
        "train.run_name=one",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        str(ROOT / "tests" / "ddp_worker.py"),
        str(tmp_path),
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(
        [*command, *overrides, "train.max_epochs=1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=ROOT,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = subprocess.run(
        [*command, *overrides[:-1], "train.max_epochs=2", "train.resume=auto"],
        capture_output=True,
        text=True,
        timeout=600,
        env=environment,
        cwd=ROOT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout and "at epoch 2, batch 0" in resumed.stdout
    assert torch.load(tmp_path / "weights" / "one" / "last.pt", weights_only=True)["progress"]["epoch"] == 2
