"""The CUDA paths: mixed precision, channels-last, torch.compile, tiled bf16 inference, bitsandbytes,
pinned-memory training and torchrun with NCCL. Marked ``cuda`` and skipped without a GPU; on a machine
with one, ``python -m pytest -m cuda`` runs them (a minute or two, most of it compiling).
The 1-process torchrun run also runs on the CPU (gloo), so that its path is tested everywhere."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import UNet
from segmentation.config import TrainSettings
from segmentation.engine.step import build_optimizer, train_step
from segmentation.inference.infer import predict_probabilities
from tests.test_training import tiny_config
from training import train

ROOT = Path(__file__).resolve().parents[1]
needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SIZE = 92  # a valid input of a depth-2, padding-0 U-Net: 52 px output


def learnable_batch(device: torch.device, count: int = 4, size: int = SIZE, seed: int = 0) -> list[torch.Tensor]:
    """Random images whose label is where the (smoothed) image is positive: a task a U-Net learns in steps."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.avg_pool2d(torch.randn(count, 1, size + 4, size + 4, generator=generator), 5, stride=1)
    return [image.to(device), (image[:, 0] > 0).long().to(device), torch.ones(count, size, size, device=device)]


def small_unet(device: torch.device, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(1, 2, [8, 16], padding=0, norm="batch").to(device)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_mixed_precision_step_lowers_the_loss(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    device = torch.device("cuda")
    model, batch = small_unet(device), learnable_batch(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    losses = [train_step(model, optimizer, batch, "ce", 1.0, device, precision, scaler).item() for _ in range(40)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.6 * losses[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_channels_last_and_compiled_steps_match_eager_fp32():
    """One SGD step from the same weights: the loss within 1e-4 relative, the new weights within 1e-4
    absolute (TF32 off, so that only the kernels' summation order differs)."""
    device = torch.device("cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        eager = small_unet(device)
        variants = {
            "eager": (eager, False),
            "channels_last": (copy.deepcopy(eager).to(memory_format=torch.channels_last), True),
            "compiled": (torch.compile(copy.deepcopy(eager)), False),
        }
        results = {}
        for name, (model, channels_last) in variants.items():
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            loss = train_step(
                model, optimizer, learnable_batch(device), "ce", 0.0, device, channels_last=channels_last
            ).item()
            results[name] = (loss, [parameter.detach().float().cpu() for parameter in model.parameters()])
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    for name in ("channels_last", "compiled"):
        assert results[name][0] == pytest.approx(results["eager"][0], rel=1e-4), name
        for got, expected in zip(results[name][1], results["eager"][1]):
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiled_bf16_inference_gives_the_fp32_masks():
    device = torch.device("cuda")
    model, batch = small_unet(device), learnable_batch(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):  # a trained model: its probabilities are not all near 0.5
        train_step(model, optimizer, batch, "ce", 1.0, device)
    image = learnable_batch(device, count=1, size=300, seed=1)[0][0]
    masks = [predict_probabilities(model, image, tile_size=SIZE, amp=amp).argmax(0) for amp in (True, False)]
    overlap = (masks[0] & masks[1]).sum().item()
    dice = 2 * overlap / (masks[0].sum().item() + masks[1].sum().item())
    assert dice >= 0.999, dice


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bitsandbytes_8bit_adamw_steps_on_cuda():
    pytest.importorskip("bitsandbytes")
    device = torch.device("cuda")
    model, batch = small_unet(device), learnable_batch(device)
    settings = TrainSettings(optim="adamw", lr=1e-2, weight_decay=0.0, use_bitsandbytes=True, momentum=0.9)
    optimizer = build_optimizer(model, settings, device)
    assert "8bit" in type(optimizer).__name__
    losses = [
        train_step(
            model, optimizer, batch, "ce", 1.0, device, "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        ).item()
        for _ in range(40)
    ]
    states = [
        value for state in optimizer.state.values() for value in state.values() if isinstance(value, torch.Tensor)
    ]
    assert any(value.dtype == torch.uint8 for value in states) and losses[-1] < 0.6 * losses[0]


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
    assert summary["epoch"] == 2 and next(summary["model"].parameters()).is_cuda
    assert all(torch.isfinite(parameter).all() for parameter in summary["model"].parameters())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_a_one_process_torchrun_run_saves_and_resumes(tmp_path, device):
    """torchrun with one process joins a process group (NCCL on CUDA, gloo on the CPU), trains, saves,
    and resumes from its checkpoint."""
    overrides = [
        "unet.input_channels=[4, 8]",
        "train.synthetic_images=6",
        "train.synthetic_size=64",
        "train.val_fraction=0.34",
        "train.tile_size=60",
        "train.samples_per_image=2",
        "train.batch_size=2",
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
