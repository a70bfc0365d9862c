"""segmentation.engine.step: the optimiser and schedules by hand, accumulation, mixed precision and loss scaling,
memory options, bitsandbytes, the moving average, and the CUDA paths (marked cuda)."""

import copy
import sys

import pytest
import torch

from model import UNet
from segmentation.config import TrainSettings, load_config
from segmentation.engine import step
from segmentation.engine.step import build_optimizer, lr_factor, train_step
from tests.helpers import learnable_batch, small_unet

CPU = torch.device("cpu")


def tiny_batch(batch_size: int = 4, size: int = 60, seed: int = 0):
    """Images, labels and all-ones weight maps for a depth-2 U-Net with valid convolutions."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(batch_size, 1, size, size, generator=generator)
    label = (torch.rand(batch_size, size, size, generator=generator) > 0.5).long()
    return image, label, torch.ones(batch_size, size, size)


def gradients_after_step(model: torch.nn.Module, batch, **options) -> list[torch.Tensor]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the step leaves the weights alone
    train_step(model, optimizer, batch, "ce", 0.0, CPU, **options)
    return [parameter.grad.clone() for parameter in model.parameters()]


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(norm):
    model = UNet(input_channels=(4, 8), norm=norm)
    batch = tiny_batch()
    whole = gradients_after_step(copy.deepcopy(model), batch)
    for accum_steps in (2, 4):
        accumulated = gradients_after_step(copy.deepcopy(model), batch, accum_steps=accum_steps)
        for a, b in zip(whole, accumulated):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_runs_the_convolutions_in_bf16_and_keeps_fp32_weights():
    torch.manual_seed(0)
    model = UNet(input_channels=(4, 8), norm="batch")
    output_dtypes = []
    model.inc.register_forward_hook(lambda module, inputs, output: output_dtypes.append(output.dtype))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = tiny_batch()
    losses = [train_step(model, optimizer, batch, "ce", 1.0, CPU, precision="bf16").item() for _ in range(30)]
    assert output_dtypes[0] == torch.bfloat16
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_fp16_loss_scaling_skips_a_step_whose_gradients_overflow():
    torch.manual_seed(0)
    model = UNet(input_channels=(4, 8))
    before = copy.deepcopy(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # a scale of 2^40 makes the fp16 gradients overflow: the scaler must skip the step and back off
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    train_step(model, optimizer, tiny_batch(), "ce", 1.0, CPU, precision="fp16", scaler=scaler)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert scaler.get_scale() == 2.0**39
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    train_step(model, optimizer, tiny_batch(), "ce", 1.0, CPU, precision="fp16", scaler=scaler)
    assert not torch.equal(model.inc.double_conv[0].weight, before["inc.double_conv.0.weight"])


@pytest.mark.parametrize(
    "options", [{"channels_last": True}, {"checkpointing": True}], ids=["channels_last", "activation_checkpointing"]
)
def test_memory_options_leave_the_gradients_unchanged(options):
    torch.manual_seed(0)
    # with checkpointing, dropout must draw the same masks when it recomputes (channels-last draws other ones)
    model = UNet(input_channels=(4, 8), norm="batch", dropout=0.5 if options.get("checkpointing") else 0.0)
    batch = tiny_batch()
    torch.manual_seed(1)
    reference = gradients_after_step(copy.deepcopy(model), batch)
    variant = copy.deepcopy(model)
    if options.get("checkpointing"):
        variant.activation_checkpointing = True
    else:
        variant = variant.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    gradients = gradients_after_step(variant, batch, channels_last=options.get("channels_last", False))
    for a, b in zip(reference, gradients):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_activation_checkpointing_recomputes_the_blocks_in_the_backward_pass():
    model = UNet(input_channels=(4, 8))
    calls = []
    model.inc.double_conv[0].register_forward_hook(lambda *args: calls.append(1))
    gradients_after_step(model, tiny_batch())
    model.activation_checkpointing = True
    gradients_after_step(model, tiny_batch())
    assert len(calls) == 3  # once without, twice (forward and recomputation) with checkpointing


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_bitsandbytes_8bit_adamw_trains_with_mixed_precision_and_accumulation(precision):
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = UNet(input_channels=(8, 16), norm="batch")
    settings = TrainSettings(optim="adamw", lr=1e-2, weight_decay=0.0, use_bitsandbytes=True, momentum=0.9)
    optimizer = build_optimizer(model, settings, CPU)
    if not type(optimizer).__module__.startswith("bitsandbytes"):
        pytest.skip("bitsandbytes' 8-bit optimizer does not run on this machine's CPU")
    assert any(
        state.get("state1") is not None and state["state1"].dtype == torch.uint8
        for state in _states_after_a_step(model, optimizer, precision)
    )
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    batch = tiny_batch()
    losses = [
        train_step(model, optimizer, batch, "ce", 1.0, CPU, precision=precision, scaler=scaler, accum_steps=2).item()
        for _ in range(30)
    ]
    assert losses[-1] < 0.6 * losses[0]


def test_lr_schedules_by_hand():
    assert lr_factor(0, 100, 10, "warmup-cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "warmup-cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)  # half-way: (1 + cos(pi/2)) / 2
    assert lr_factor(100, 100, 10, "cosine", min_factor=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "poly") == pytest.approx(0.5**0.9)
    assert lr_factor(70, 100, 0, "constant") == 1.0


def test_bitsandbytes_falls_back_to_torch_with_a_notice(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    model = torch.nn.Linear(2, 2)
    train_config = load_config(None, ["train.use_bitsandbytes=true", "train.optim=adamw"]).train
    optimizer = build_optimizer(model, train_config, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW
    assert "bitsandbytes' 8-bit adamw does not work on cpu" in capsys.readouterr().err


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


def _states_after_a_step(model, optimizer, precision):
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    train_step(model, optimizer, tiny_batch(), "ce", 1.0, CPU, precision=precision, scaler=scaler, accum_steps=2)
    return list(optimizer.state.values())
