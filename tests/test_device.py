"""segmentation.device: a device that does not exist is one line; a CPU that only emulates bfloat16 is noted; a
training step or a prediction that cannot fit the device's free memory is refused in one line before anything is
written or allocated."""

import os
import re

import pytest
import torch

from segmentation import device
from segmentation.config import UserError, load_config
from segmentation.device import resolve_device
from segmentation.engine.run import check_training_memory
from segmentation.memory import forward_maps, training_activation_bytes
from tests.helpers import ROOT, folder_config, tiny_config
from training import train

CPU = torch.device("cpu")


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(UserError, match="no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def test_free_memory_on_a_cpu_is_the_kernels_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   21000000 kB\n")
    assert device.free_memory(CPU, str(meminfo)) == 21_000_000 * 1024
    # without /proc/meminfo (another system), the free physical pages
    pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(device.free_memory(CPU, str(tmp_path / "missing")) - pages) < 2**30
    assert device.free_memory(torch.device("meta")) is None


def test_amounts_are_written_in_decimal_units():
    assert [device.amount(size) for size in (1.308e15, 812e9, 3.24e9, 1e6, 9.96e6, 240e6, 4096, 12)] == [
        "1.3 PB",
        "812 GB",
        "3.2 GB",
        "1.0 MB",
        "10 MB",
        "240 MB",
        "4.1 kB",
        "12 bytes",
    ]


def test_a_task_that_cannot_fit_is_one_line_with_its_parts_and_the_free_memory(monkeypatch):
    monkeypatch.setattr(device, "free_memory", lambda where: 21 * 10**9)
    parts = {"parameters": 3_200_000_000, "activations": 808_800_000_000}
    with pytest.raises(UserError) as caught:
        device.require_memory("a training step", parts, CPU, "lower train.batch_size")
    assert str(caught.value) == (
        "a training step needs about 812 GB (parameters 3.2 GB, activations 809 GB), 21 GB are free on cpu: "
        "lower train.batch_size"
    )
    with pytest.raises(UserError, match=r"needs about 6.0 GB for each of 4 processes \(parameters 1.0 GB, x 5.0 GB\)"):
        device.require_memory("a training step", {"parameters": 10**9, "x": 5 * 10**9}, CPU, "lower it", sharing=4)
    device.require_memory("a training step", {"parameters": 21 * 10**9}, CPU, "lower it")  # it fits: nothing
    monkeypatch.setattr(device, "free_memory", lambda where: None)
    device.require_memory("a training step", parts, CPU, "lower it")  # unknown free memory: no refusal


@pytest.mark.parametrize(
    "override, part",
    [
        # 4.5 x 10^12 parameters (tests/test_checkpoint.py counts them by hand), 20 bytes each
        ("unet.input_channels=[100000, 200000]", r"state 91 TB, activations of 2 tiles of 60x60 px [\d.]+ GB\)"),
        # by hand, in TB of a tile (a 4-channel map of 10^6 px sides: 16 TB): the inc's 4 maps 64, the Down 44, the
        # bottleneck 22, the Ups 56 and 112, logits and loss 36; the backward's 10 copies of the concatenation 320:
        # 654 TB a tile
        ("train.tile_size=1000000", r"state 150 kB, activations of 2 tiles of 1000000x1000000 px 1\.3 PB\)"),
    ],
)
def test_a_training_step_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, override, part):
    config = tiny_config(tmp_path / "run", override)
    with pytest.raises(UserError) as caught:
        train(config)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("a training step needs about "), message
    assert re.search(part, message) and " are free on cpu: lower train.batch_size (2), train.tile_size (" in message
    widths = list(config.unet.input_channels)
    assert message.endswith(f"or unet.input_channels ({widths}), or set train.activation_checkpointing=true")
    assert not (tmp_path / "run").exists()  # no run folder, nothing prepared


def test_the_shipped_configs_and_the_tests_tiny_ones_fit_a_machine_of_16_gb(tmp_path, monkeypatch):
    """The estimate never refuses what runs today: config.yaml and the recipes at their tile sizes (the GPU
    recipes' steps fit a 16 GB GPU, as they do), the tiny configs of the tests."""
    monkeypatch.setattr(device, "free_memory", lambda where: 16 * 10**9)
    for path in [ROOT / "config.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]:
        check_training_memory(load_config(path, ["train.device=cpu"]), torch.device("cpu"))
    check_training_memory(tiny_config(tmp_path), torch.device("cpu"))
    check_training_memory(folder_config(tmp_path, "train.tile_size=124", "unet.padding=1"), torch.device("cpu"))


def test_the_memory_estimate_of_the_shipped_config_is_a_bound_within_twice_its_measured_peak():
    """The shipped config (widths 16-128, 252 px tiles, 4 a step, Adam, fp32): 1,942,306 parameters of 4 bytes
    five times over (weights, gradients, two moments, a step's temporaries), and per tile the maps autograd
    keeps and ten copies of the largest one; one training step measured on a 2-core CPU peaked 270-310 MB
    above the resident size before the model was built."""
    config = load_config(ROOT / "config.yaml", ["train.device=cpu"])
    blocks = forward_maps(config.unet, 2, 252)
    estimate = 20 * 1_942_306 + 4 * training_activation_bytes(blocks)
    assert 310e6 <= estimate <= 2 * 270e6
