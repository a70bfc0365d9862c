"""Speed options: mixed precision, loss scaling, gradient accumulation, channels-last, activation
checkpointing, torch.compile's fallback, and the sampler's shards for several processes."""

import copy

import pytest
import torch

import training
from dataset import EpochSampler
from model import UNet
from segmentation import device
from segmentation.config import TrainSettings
from segmentation.engine.step import build_optimizer, train_step
from tests.test_training import read_rows, tiny_config
from training import train

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
    rows = read_rows(summary["run_log"])
    assert len(rows) == 6 and all(row["step"] == str(4 * (i + 1)) for i, row in enumerate(rows))
    assert float(rows[-1]["train_loss"]) < 0.8 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_loss"]) < 0.9 * float(rows[0]["val_loss"])
    state = torch.load(summary["run_weights"] / "last.pt", weights_only=True)
    assert state["model"]["inc.double_conv.0.weight"].dtype == torch.float32


def test_fp16_run_saves_and_restores_its_loss_scale(tmp_path):
    summary = train(tiny_config(tmp_path, "train.precision=fp16", "train.max_epochs=1", "train.run_name=fp16"))
    scale = torch.load(summary["run_weights"] / "last.pt", weights_only=True)["scaler"]["scale"]
    assert scale > 0
    resumed = train(tiny_config(tmp_path, "train.precision=fp16", "train.max_epochs=2", "train.resume=auto"))
    assert resumed["run_weights"] == summary["run_weights"] and resumed["epoch"] == 2


def test_a_failing_torch_compile_falls_back_to_eager_with_a_notice(tmp_path, monkeypatch, capsys):
    class FailingCompiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

        def forward(self, *inputs):
            raise RuntimeError("InductorError: no working C++ compiler found\nmore details")

    monkeypatch.setattr(training.torch, "compile", FailingCompiled)
    summary = train(tiny_config(tmp_path, "train.compile=true", "train.max_epochs=2"))
    assert not summary["interrupted"] and summary["epoch"] == 2
    assert (
        capsys.readouterr().err.count(
            "note: torch.compile failed (InductorError: no working C++ compiler found): training without it"
        )
        == 1
    )


def test_sampler_shards_are_disjoint_equal_and_resumable():
    shards = [list(EpochSampler(10, seed=3, rank=rank, world_size=3)) for rank in range(3)]
    assert all(len(shard) == 3 for shard in shards)
    flat = [index for shard in shards for index in shard]
    assert len(set(flat)) == 9 and set(flat) <= set(range(10))
    single = list(EpochSampler(10, seed=3))
    assert [single[3 * i + 1] for i in range(3)] == shards[1]  # every third of the one order
    sampler = EpochSampler(10, seed=3, rank=1, world_size=3)
    sampler.set_epoch(2, start=1)
    assert len(sampler) == 2
    full = EpochSampler(10, seed=3, rank=1, world_size=3)
    full.set_epoch(2)
    assert list(sampler) == list(full)[1:]
    assert all(20 <= index < 30 for index in full)


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


def _states_after_a_step(model, optimizer, precision):
    scaler = torch.amp.GradScaler("cpu") if precision == "fp16" else None
    train_step(model, optimizer, tiny_batch(), "ce", 1.0, CPU, precision=precision, scaler=scaler, accum_steps=2)
    return list(optimizer.state.values())


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        (
            "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni\n",
            True,
        ),  # Zen 4, Cooper Lake
        (
            "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl amx_bf16 amx_tile\n",
            True,
        ),  # Sapphire Rapids
        (
            "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512dq\n",
            False,
        ),  # Skylake-X: oneDNN emulates bf16
        ("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n", False),  # laptops before AVX-512
        ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm sve\n", True),  # ARM Neoverse V1
        ("processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n", False),
    ],
)
def test_cpu_bf16_is_native_only_with_the_bfloat16_instructions(tmp_path, cpuinfo, native):
    path = tmp_path / "cpuinfo"
    path.write_text(cpuinfo)
    assert device.cpu_has_native_bf16(str(path)) is native


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_that_emulates_it_gets_a_note_to_use_fp32(monkeypatch, capsys, native):
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: native)
    device.prepare_device(CPU, "bf16")
    device.prepare_device(CPU, "fp32")
    notes = capsys.readouterr().err
    assert ("train.precision=fp32" in notes) is not native
    assert notes.count("note:") == (0 if native else 1)
