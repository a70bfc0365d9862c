"""segmentation.device: a device that does not exist is one line; a CPU that only emulates bfloat16 is noted."""

import pytest
import torch

from segmentation import device
from segmentation.config import UserError
from segmentation.device import resolve_device

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
