"""bench.py's measurements: the FLOP count of a forward pass against a count by hand from the paper's sizes, the
options, and the 3D training table."""

import importlib.util

import pytest
import torch

import bench
from model import UNet
from segmentation.benchmarks.speed import forward_flops

MONAI = importlib.util.find_spec("monai") is not None


def unet_flops_by_hand(
    widths: list[int], size: int, image_channels: int = 1, classes: int = 2, dims: int = 2, padding: int = 0
) -> int:
    """2 x the multiply-adds of the paper's U-Net (3x3 convolutions, valid with ``padding`` 0, 2x2
    up-convolutions, a 1x1 output layer; 3x3x3 and 2x2x2 with ``dims`` 3) on an input of ``size`` px along
    each axis, walked level by level."""
    flops, channels, skips = 0, image_channels, []
    taps, cut = 3**dims, 0 if padding else 2  # each valid convolution trims one pixel per border

    def double_conv(channels_in: int, channels_out: int, side: int) -> tuple[int, int]:
        first, second = side - cut, side - 2 * cut
        return taps * 2 * (channels_in * channels_out * first**dims + channels_out**2 * second**dims), second

    for level, width in enumerate([*widths, 2 * widths[-1]]):
        if level:
            size //= 2  # 2x2 max pooling
        count, size = double_conv(channels, width, size)
        flops, channels = flops + count, width
        skips.append(width)
    for width in reversed(widths):
        flops += 2 * 2**dims * channels * (channels // 2) * size**dims  # up-convolution: 2**dims taps per input px
        size *= 2
        count, size = double_conv(width + channels // 2, width, size)
        flops, channels = flops + count, width
    return flops + 2 * channels * classes * size**dims  # the 1x1 output layer


def test_forward_flops_of_the_paper_network_match_the_count_by_hand():
    widths = [64, 128, 256, 512]
    assert unet_flops_by_hand(widths, 572) == forward_flops(UNet(1, 2, widths), 1, 572)
    assert unet_flops_by_hand([4, 8], 92, 3, 5) == forward_flops(UNet(3, 5, [4, 8]), 3, 92)
    volume_unet = UNet(1, 2, [4, 8], padding=1, dims=3)
    assert unet_flops_by_hand([4, 8], 16, dims=3, padding=1) == forward_flops(volume_unet, 1, 16, 3)


def test_forward_flops_leave_the_model_where_it_was():
    model = UNet(1, 2, [4, 8])
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    forward_flops(model, 1, 92)
    assert all(tensor.device == torch.device("cpu") for tensor in model.state_dict().values())
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def refused_option(capsys, argv: list[str]) -> str:
    """What ``python bench.py ARGV`` prints when it refuses its options: one line (exit code 2), without argparse's
    usage, which the returned text ends with a pointer to."""
    with pytest.raises(SystemExit) as caught:
        bench.parse_options(argv)
    prog = bench.command_line().prog
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1 and err.startswith(f"{prog}: error: argument ")
    assert err.endswith(f"; {prog} --help lists the options\n")
    return err.removeprefix(f"{prog}: error: ").removesuffix(f"; {prog} --help lists the options\n")


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (
            ["--folds", "0,5"],
            "argument --folds: expected numbers from 0 to 4 separated by commas, such as 0,2, got '0,5'",
        ),
        (["--batch", "-1"], "argument --batch: expected a positive integer, got '-1'"),
        (["--size", "abc"], "argument --size: expected a positive integer, got 'abc'"),
        (["--warmup", "1.5"], "argument --warmup: expected an integer >= 0, got '1.5'"),
        (["--steps", "1" + "0" * 30], f"argument --steps: expected a positive integer, got '1{'0' * 30}'"),
        (
            ["--widths", "a,b"],
            "argument --widths: expected positive integers separated by commas, such as 64,128,256, got 'a,b'",
        ),
        (
            ["--widths", "64,,128"],
            "argument --widths: expected positive integers separated by commas, such as 64,128,256, got '64,,128'",
        ),
        (
            ["--data-scale", "30,0"],
            "argument --data-scale: expected positive integers separated by commas, such as 64,128,256, got '30,0'",
        ),
        (
            ["--models", "ours,unet"],
            "argument --models: expected some of ours, bare, monai separated by commas, got 'ours,unet'",
        ),
        (["--device", "gpu"], "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (["--peak-tflops", "nan"], "argument --peak-tflops: expected a number above 0, got 'nan'"),
        (["--predict-stack", "inf"], "argument --predict-stack: expected a number above 0, got 'inf'"),
        (["--infer-size", "-3"], "argument --infer-size: expected an integer >= 0, got '-3'"),
        (["--infer-tile", "0"], "argument --infer-tile: expected a positive integer, got '0'"),
        (["--infer-batch", "x"], "argument --infer-batch: expected a positive integer, got 'x'"),
        (["--infer-repeats", "0"], "argument --infer-repeats: expected a positive integer, got '0'"),
        (["--workers", "0", "-1"], "argument --workers: expected an integer >= 0, got '-1'"),
        (["--restart-cost", "0"], "argument --restart-cost: expected a positive integer, got '0'"),
        (["--nuclei-experiment", "-2"], "argument --nuclei-experiment: expected a positive integer, got '-2'"),
        (["--fine-tune-experiment", "0"], "argument --fine-tune-experiment: expected a positive integer, got '0'"),
        (
            ["--instance-experiment", "nuclei=x"],
            "argument --instance-experiment: expected NAME=COUNT pairs separated by commas, NAME one of nuclei, isbi, "
            "pennfudan, such as nuclei=10, got 'nuclei=x'",
        ),
        (["--data", ""], "argument --data: expected a file or folder path, got ''"),
        (["--source", ""], "argument --source: expected a file or folder path, got ''"),
        (["--pennfudan", ""], "argument --pennfudan: expected a file or folder path, got ''"),
        (["--norm", "layer"], "argument --norm: invalid choice: 'layer'"),
        (["--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
        (["--dims", "4"], "argument --dims: invalid choice: 4"),
        (["--dims", "3d"], "argument --dims: expected a positive integer, got '3d'"),
        (
            ["--dims", "3", "--tiles", "32x32"],
            "argument --tiles: expected positive integers separated by commas, such as 64,128,256, got '32x32'",
        ),
    ],
)
def test_each_bench_option_is_refused_in_one_line_naming_it_and_what_it_takes(capsys, argv, error):
    assert refused_option(capsys, argv).startswith(error)  # choices: argparse's list, whose quoting varies


def test_bench_options_that_need_each_other_are_refused_in_one_line(capsys):
    assert refused_option(capsys, ["--size", "100"]).startswith(
        "argument --size: input size 100 does not fit a depth-4 U-Net with padding 0"
    )
    assert refused_option(capsys, ["--widths", "4,8", "--size", "61"]).startswith(
        "argument --size: input size 61 does not fit a depth-2 U-Net"
    )
    assert refused_option(capsys, ["--dims", "3", "--tiles", "32,40"]).startswith(
        "argument --tiles: input size 40 does not fit a depth-4 U-Net with padding 1"
    )
    assert refused_option(capsys, ["--dims", "3", "--widths", "4,8", "--tiles", "8,10"]).startswith(
        "argument --tiles: input size 10 does not fit a depth-2 U-Net with padding 1"
    )
    assert (
        refused_option(capsys, ["--dims", "3", "--size", "572"]) == "argument --size: 2D only; --dims 3 takes --tiles"
    )
    assert refused_option(capsys, ["--dims", "3", "--channels-last"]).startswith("argument --channels-last: 2D only")
    assert refused_option(capsys, ["--tiles", "32"]) == "argument --tiles: only with --dims 3; 2D takes --size"
    for argv, folder in (
        (["--fine-tune-experiment", "2"], "--data"),
        (["--instance-experiment", "nuclei=2,isbi=3"], "--data"),
        (["--instance-experiment", "pennfudan=3", "--data", "isbi"], "--pennfudan"),
    ):
        with pytest.raises(SystemExit) as caught:
            bench.parse_options(argv)
        assert caught.value.code == 2 and f"error: {folder} is needed: " in capsys.readouterr().err


def test_every_bench_option_has_a_checked_type_and_parses_into_it():
    for action in bench.command_line()._actions:
        if action.option_strings and action.nargs != 0:  # flags take no value
            assert action.type is not None or action.choices, action.option_strings
    args = bench.parse_options(["--widths", "4,8", "--size", "60", "--instance-experiment", "nuclei=3", "--workers"])
    assert (args.widths, args.size, args.models, args.workers) == ([4, 8], 60, ["ours", "bare", "monai"], [])
    assert (args.instance_experiment, args.device, args.infer_tile) == ({"nuclei": 3}, "auto", 572)
    args = bench.parse_options(["--dims", "3", "--tiles", "16,32"])
    assert (args.dims, args.tiles, args.size, args.widths) == (3, [16, 32], None, None)


def volume_table(capsys, widths: str, side: int, models: str) -> list[list[str]]:
    """The rows of ``python bench.py --dims 3`` for one tile of ``side`` voxels, one untimed and one timed step,
    split at the columns (each model in a process of its own)."""
    argv = ["--dims", "3", "--device", "cpu", "--widths", widths, "--tiles", str(side), "--models", models]
    bench.main([*argv, "--steps", "1", "--warmup", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("CPU, ") and f"3D training, batch 1, widths [{widths.replace(',', ', ')}]" in lines[0]
    assert lines[1].split() == ["tile", "s/step", "Mvoxel/s", "GFLOP/step", "ms/GFLOP", "peak", "MiB", "est.", "MiB"]
    return [line.rsplit(maxsplit=7) for line in lines[2:]]


@pytest.mark.slow
def test_the_3d_bench_times_our_step_and_estimates_its_memory(capsys):
    rows = volume_table(capsys, "4,8", 16, "ours,bare")
    names = ["this repo (step.train_step)", "bare PyTorch loop, same U-Net"]
    assert [row[:2] for row in rows] == [[name, "16x16x16"] for name in names]
    flops = 3 * unet_flops_by_hand([4, 8], 16, dims=3, padding=1) / 1e9
    for row in rows:
        seconds, voxels, gflop, per_gflop = (float(column) for column in row[2:6])
        assert float(seconds) > 0 and gflop == pytest.approx(flops, abs=0.001) and int(row[7]) > 0
        rounding = 0.0005 / seconds + 0.001  # the printed seconds are rounded to 3 decimals
        assert voxels == pytest.approx(16**3 / seconds / 1e6, rel=rounding, abs=0.001)
        assert per_gflop == pytest.approx(1000 * seconds / flops, rel=rounding, abs=0.001)


@pytest.mark.slow
@pytest.mark.skipif(not MONAI, reason="MONAI is not installed (pip install monai)")
def test_the_3d_bench_times_monai_basic_unet_beside_ours(capsys):
    rows = volume_table(capsys, "4,8,16,32", 32, "ours,monai")  # 16: one voxel per channel for batch norm
    assert [row[:2] for row in rows] == [["this repo (step.train_step)", "32x32x32"], ["MONAI BasicUNet", "32x32x32"]]
    assert rows[1][-1] == "-" and float(rows[1][4]) > float(rows[0][4])  # no estimate; more FLOPs (a 5th level)
