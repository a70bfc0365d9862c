"""Benchmark: training and inference speed of the U-Net, against a bare PyTorch loop and MONAI's BasicUNet.

    python bench.py [--device cpu|cuda] [--size 572] [--batch 8] [--widths 64,128,256,512]     # GPU defaults shown
                    [--precision fp32|bf16|fp16] [--channels-last] [--compile] [--steps 3]
                    [--models ours,bare,monai] [--infer-size 2048] [--workers 0 2] [--data ISBI_FOLDER]
    python bench.py                              # on a CPU: tiles of 252 px, batch 2, a 512 px image: minutes
    python bench.py --dims 3 [--tiles 32,48,64]  # 3D: our U-Net against MONAI's BasicUNet(spatial_dims=3)
    python bench.py --data-scale 30,240,960      # data at scale: in memory (as before the cache) vs the cache
    python bench.py --predict-stack 2            # peak memory of test.py --input on a 2 GB multi-page TIFF
    python bench.py --nuclei-experiment 40       # touching nuclei: instance-id masks against 0/255 masks
    python bench.py --fine-tune-experiment 20 --data ISBI_FOLDER [--source CKPT]   # 3 ISBI slices: init_from vs scratch
    python bench.py --instance-experiment nuclei=40,isbi=20,pennfudan=60 --data ISBI --pennfudan PF   # ids vs 0/255
    python bench.py --restart-cost 3             # a torchrun worker killed: seconds to the restarted group's step
    python bench.py --sparse-experiment isbi=20,pennfudan=80 --data ISBI --pennfudan PF   # scribbles vs dense masks
    python bench.py --volume-experiment damaged=30:30,isbi=20:20 --data ISBI   # a 3D U-Net against the 2D one
    python bench.py --peers nnunet,stardist --data TRAIN --held HELD --minutes 10 [--csv OUT] [--config OURS.yaml]
                                                 # ours, nnU-Net and StarDist on the same images for the same minutes

Prints numbers and asserts nothing. Three tables by default:

1. Training, on the same random batch for every model: ms per step, images/s, peak memory, forward
   GFLOP per image, achieved TFLOP/s and, on CUDA, the model FLOP utilisation (MFU). ``ours`` is
   ``segmentation.engine.step.train_step`` (weighted cross-entropy with a weight map, gradient clipping, Adam);
   ``bare`` the same network in a five-line PyTorch loop (plain cross-entropy, Adam); ``monai``
   MONAI's ``BasicUNet`` with the same widths and normalisation (same-size convolutions, so more
   FLOPs per image: compare TFLOP/s). MONAI is a benchmark-only dependency (``pip install monai``).
2. Inference: one ``--infer-size`` square image predicted by the tiled predictor (``segmentation.inference.infer``).
3. The data path (loader and augmentation) against the training step: the device must never wait.

With ``--dims 3``, one table instead: the training step of our 3D U-Net (``UNet(dims=3)``, same-size
convolutions), the bare loop and MONAI's ``BasicUNet(spatial_dims=3)`` on cubic tiles of each ``--tiles`` side:
seconds per step, voxels per second, GFLOP per step and milliseconds per GFLOP, and the peak memory of the
step beside ``segmentation.memory``'s estimate of it (the one training's set-up checks against the device).

FLOPs are those of one forward pass as torch.utils.flop_counter counts them (2 x the multiply-adds of
the convolutions and matrix products; ReLUs, norms and pooling are left out); a training step counts
as 3 x forward (the backward pass is about twice the forward). MFU divides the achieved TFLOP/s by the
card's dense peak for the precision (``--peak-tflops`` to give it; fp32 counts TF32 tensor cores, which PyTorch uses for
convolutions by default). Each model runs in a process of its own, so that the peak memory (CUDA:
``max_memory_allocated``; CPU: growth of the resident set while building and training the model)
is its own.

``--data-scale`` writes folders of N images of 512x512 px and prints, for the in-memory data path of
before the preprocessing cache (kept here to compare with) and for the cache (cold, then warm): the
start-up time per image, peak RSS, RAM and disk bytes per pixel, and the loader's time per batch
against the shipped model's training step. ``--predict-stack`` writes a multi-page TIFF and prints
the peak RSS of ``test.py --input`` on it. The measurements live in ``segmentation.benchmarks``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from model import output_size
from segmentation.benchmarks.fine_tune import fine_tune_experiment
from segmentation.benchmarks.instances import instance_experiment
from segmentation.benchmarks.nuclei import nuclei_experiment
from segmentation.benchmarks.peers import PEERS, peer_table, plot_peer_curves
from segmentation.benchmarks.restart import restart_cost_table
from segmentation.benchmarks.scale import data_scale_table, predict_stack_table
from segmentation.benchmarks.sparse import ISBI_FOLDS, SPARSE_SETS, sparse_experiment
from segmentation.benchmarks.speed import (
    data_path_table,
    in_child,
    print_training_table,
    print_volume_table,
    time_inference,
    time_training,
)
from segmentation.benchmarks.volumes import VOLUME_SETS, volume_experiment
from segmentation.config import UserError
from segmentation.device import resolve_device
from segmentation.options import (
    OneLineParser,
    device_name,
    index_list,
    int_list,
    named_count_pairs,
    named_counts,
    named_paths,
    non_negative_int,
    path_argument,
    positive_float,
    positive_int,
    word_list,
)

# Defaults per device type: the paper's tiles and batch on a GPU; on a CPU a size that times in minutes
DEVICE_DEFAULTS = {
    "cuda": {"size": 572, "batch": 8, "steps": 3, "infer_size": 2048, "workers": [0, 2], "widths": [64, 128, 256, 512]},
    "cpu": {"size": 252, "batch": 2, "steps": 2, "infer_size": 512, "workers": [0], "widths": [64, 128, 256, 512]},
}
# --dims 3: Cicek et al.'s 3D U-Net widths on a GPU; on a CPU widths and tiles that time in a couple of minutes
VOLUME_DEFAULTS = {
    "cuda": {"tiles": [64, 96, 128], "batch": 2, "steps": 3, "widths": [32, 64, 128, 256]},
    "cpu": {"tiles": [32, 48, 64], "batch": 1, "steps": 2, "widths": [8, 16, 32, 64]},
}
INSTANCE_SETS = ("nuclei", "isbi", "pennfudan")  # the data sets of --instance-experiment


def command_line() -> argparse.ArgumentParser:
    """The command line's options."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", type=device_name, help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--dims",
        default=2,
        type=positive_int,
        choices=(2, 3),
        help="2: images, the three tables; 3: volumes, the 3D training table at each of --tiles",
    )
    parser.add_argument(
        "--size",
        type=positive_int,
        help="2D training tile size in px, valid for the network (default: 572 on a GPU, 252 on a CPU)",
    )
    parser.add_argument(
        "--tiles",
        type=int_list,
        metavar="SIDE,...",
        help="--dims 3: sides of the cubic training tiles in voxels, multiples of 2**depth (default: 64,96,128 on "
        "a GPU, 32,48,64 on a CPU)",
    )
    parser.add_argument("--batch", type=positive_int, help="training batch (default: 8 on a GPU, 2 on a CPU; 3D: 2, 1)")
    parser.add_argument(
        "--widths",
        type=int_list,
        help="unet.input_channels, comma-separated (default: the paper's 64,128,256,512; --dims 3: 32,64,128,256 "
        "on a GPU, 8,16,32,64 on a CPU)",
    )
    parser.add_argument(
        "--norm", default="batch", choices=("batch", "instance", "none"), help="normalisation in both networks"
    )
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true", help="2D only")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument(
        "--steps", type=positive_int, help="timed training steps per model and tile (default: 3 on a GPU, 2 on a CPU)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="untimed steps first (cuDNN autotuning, compiling)"
    )
    parser.add_argument(
        "--models",
        default="ours,bare,monai",
        type=word_list(("ours", "bare", "monai")),
        help="which of ours, bare, monai to time (monai is skipped, with a note, where it is not installed)",
    )
    parser.add_argument(
        "--peak-tflops", type=positive_float, help="the device's peak for MFU (default: from the card's name)"
    )
    add_inference_arguments(parser)
    parser.add_argument(
        "--workers",
        type=non_negative_int,
        nargs="*",
        help="loader worker counts to time (none: skip the data path; default: 0 2 on a GPU, 0 on a CPU)",
    )
    parser.add_argument(
        "--data",
        type=path_argument,
        help="ISBI 2012 folder for the data path (default: synthetic images); --peers: the training folder",
    )
    add_scale_arguments(parser)
    add_experiment_arguments(parser)
    return parser


def add_scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The measurements of data, stacks and restarts at scale (each "instead" of the speed tables)."""
    parser.add_argument(
        "--data-scale",
        type=int_list,
        help="instead: the data path for folders of this many 512 px images, e.g. 30,240,960 (in memory vs the cache)",
    )
    parser.add_argument(
        "--restart-cost",
        type=positive_int,
        metavar="TRIES",
        help="instead: seconds from a killed torchrun worker (2 CPU processes) to the restarted group's first step",
    )
    parser.add_argument(
        "--predict-stack",
        type=positive_float,
        metavar="GB",
        help="instead: peak memory of test.py --input on a multi-page TIFF of this many GB, e.g. 2",
    )


def add_inference_arguments(parser: argparse.ArgumentParser) -> None:
    """The inference timing's image and tiled predictor."""
    parser.add_argument(
        "--infer-size",
        type=non_negative_int,
        help="side of the image for the inference timing (0: skip; default: 2048 on a GPU, 512 on a CPU)",
    )
    parser.add_argument(
        "--infer-tile",
        type=positive_int,
        default=572,
        help="tile side of the tiled predictor (default: the paper's 572)",
    )
    parser.add_argument("--infer-batch", type=positive_int, default=8, help="tiles per forward pass when predicting")
    parser.add_argument("--infer-repeats", type=positive_int, default=1, help="timed predictions of the image")


def add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    """The experiments that train models to compare (each "instead" of the speed tables)."""
    parser.add_argument(
        "--nuclei-experiment",
        type=positive_int,
        metavar="EPOCHS",
        help=(
            "instead: touching nuclei trained from instance-id masks and from 0/255 masks, seeds 0 and 1; "
            "object F1 on held-out images"
        ),
    )
    parser.add_argument(
        "--fine-tune-experiment",
        type=positive_int,
        metavar="EPOCHS",
        help="instead: 3 ISBI 2012 slices (--data) trained from scratch and from a model of the synthetic images "
        "(train.init_from), seeds 0-2; scores on 6 held-out slices",
    )
    parser.add_argument(
        "--source",
        type=path_argument,
        help="--fine-tune-experiment: the checkpoint to start from (default: trained first)",
    )
    parser.add_argument(
        "--instance-experiment",
        type=named_counts(INSTANCE_SETS),
        metavar="SET=EPOCHS,...",
        help="instead: id masks against 0/255 masks, with and without the boundary class, seeds 0 and 1, on "
        "nuclei (generated), isbi (--data) and pennfudan (--pennfudan), e.g. nuclei=40,isbi=20,pennfudan=80",
    )
    parser.add_argument(
        "--sparse-experiment",
        type=named_counts(SPARSE_SETS),
        metavar="SET=EPOCHS,...",
        help="instead: scribbles (isbi, --data: its 5 contiguous folds) and partial masks (pennfudan, --pennfudan: "
        "seeds 0 and 1) with train.ignore_value against the dense masks, scored on the dense held-out masks, "
        "e.g. isbi=20,pennfudan=80",
    )
    parser.add_argument(
        "--volume-experiment",
        type=named_count_pairs(VOLUME_SETS),
        metavar="SET=EPOCHS_3D:EPOCHS_2D,...",
        help="instead: a 3D U-Net (unet.dims: 3) against the 2D one, on synthetic volumes with damaged sections "
        "(damaged, seeds 0 and 1) and on ISBI 2012 as a volume (isbi, --data, --folds), e.g. damaged=30:30",
    )
    parser.add_argument(
        "--nuclei3d",
        type=path_argument,
        help="--volume-experiment nuclei3d: the folder of stardist's img3d.tif and mask3d.tif (stardist/data/images "
        "in its wheel: pip download stardist --no-deps)",
    )
    parser.add_argument(
        "--folds",
        type=index_list(ISBI_FOLDS),
        metavar="K,...",
        help="--sparse- and --volume-experiment: which of ISBI's 5 contiguous folds to train (0-4; default all for "
        "the sparse, 0 for the volume experiment), e.g. 0,2,4",
    )
    parser.add_argument(
        "--pennfudan", type=path_argument, help="--instance- and --sparse-experiment: the PennFudanPed folder"
    )
    add_peer_arguments(parser)


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """--peers: ours against nnU-Net and StarDist for the same minutes (segmentation.benchmarks.peers)."""
    parser.add_argument(
        "--peers",
        type=word_list(PEERS),
        metavar="PEER,...",
        help="instead: train ours and these peers (nnunet, stardist) on --data for --minutes each, one after "
        "another, and score them on --held",
    )
    parser.add_argument("--held", type=path_argument, help="--peers: the held-out folder (images and masks)")
    parser.add_argument(
        "--minutes",
        type=positive_float,
        help="--peers: wall-time minutes of training per system; --volume-experiment damaged and isbi: per run (the "
        "epochs an upper bound)",
    )
    parser.add_argument("--csv", type=path_argument, help="--peers: also write the table to this CSV file")
    parser.add_argument(
        "--config", type=path_argument, help="--peers: our config (default: the shipped defaults on --data)"
    )
    parser.add_argument(
        "--peer-python",
        type=named_paths(PEERS),
        default={},
        metavar="PEER=PYTHON,...",
        help="--peers: the Python of a peer's environment (default: cache/peers/PEER/bin/python)",
    )
    parser.add_argument(
        "--peer-figure",
        type=path_argument,
        metavar="PNG",
        help="instead: plot the scores against minutes of the --peers CSV files given after it, named "
        "<data set>-<anything>.csv, and print the minutes each peer needed to reach our 10-minute scores",
    )
    parser.add_argument("tables", nargs="*", type=path_argument, help="--peer-figure: the CSV files")
    parser.add_argument(
        "--install-peers",
        action="store_true",
        help="--peers: build a missing peer environment under cache/peers/ (pip, once)",
    )


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (``argv``, default ``sys.argv``), each option checked by its type and what holds
    across options; a wrong one ends the program with one line (exit code 2)."""
    parser = command_line()
    args = parser.parse_args(argv)
    sets = {**(args.instance_experiment or {}), **(args.sparse_experiment or {}), **(args.volume_experiment or {})}
    if (args.fine_tune_experiment or "isbi" in sets) and not args.data:
        parser.error(
            "--data is needed: --fine-tune-experiment and --instance- or --sparse-experiment isbi=... read the ISBI "
            "2012 folder (train-volume.tif, train-labels.tif)"
        )
    if args.peers and not (args.data and args.held and args.minutes):
        parser.error("--peers needs --data (the training folder), --held (the held-out folder) and --minutes")
    if args.tables and not args.peer_figure:
        parser.error(f"unrecognized arguments: {' '.join(map(str, args.tables))}")
    if args.peer_figure and not args.tables:
        parser.error("--peer-figure needs the CSV files to plot, e.g. --peer-figure docs/peers.png isbi-10.csv")
    if args.csv and args.csv.exists():
        parser.error(f"argument --csv: {args.csv} exists; name a new file")
    if "nuclei3d" in sets and not args.nuclei3d:
        parser.error("--nuclei3d is needed: the volume experiment's nuclei3d=... reads img3d.tif and mask3d.tif there")
    if "pennfudan" in sets and not args.pennfudan:
        parser.error("--pennfudan is needed: the experiments' pennfudan=... reads the PennFudanPed folder")
    if args.dims == 3 and (args.size or args.channels_last):
        parser.error(f"argument {'--size' if args.size else '--channels-last'}: 2D only; --dims 3 takes --tiles")
    if args.dims == 2 and args.tiles:
        parser.error("argument --tiles: only with --dims 3; 2D takes --size")
    try:
        resolve_device(args.device)
    except UserError as error:
        parser.error(f"argument --device: {error}")
    depth = len(args.widths or DEVICE_DEFAULTS["cpu"]["widths"])
    sizes = [("--size", args.size, 0)] if args.size else [("--tiles", side, 1) for side in args.tiles or []]
    for option, size, padding in sizes:  # valid convolutions in 2D, same-size ones in 3D (speed.build)
        try:
            output_size(size, depth, padding)
        except ValueError as error:
            parser.error(f"argument {option}: {error}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_options(argv)
    if args.peer_figure:
        for line in plot_peer_curves(args.tables, args.peer_figure):
            print(line)
        print(f"wrote {args.peer_figure}")
        return
    if args.peers:
        peer_table(
            args.peers, args.data, args.held, args.minutes, args.config, args.csv, args.peer_python, args.install_peers
        )
        return
    if args.data_scale:
        data_scale_table(args.data_scale)
    if args.predict_stack:
        predict_stack_table(args.predict_stack)
    if args.nuclei_experiment:
        nuclei_experiment(args.nuclei_experiment, [0, 1])
    if args.fine_tune_experiment:
        fine_tune_experiment(args.data, args.fine_tune_experiment, [0, 1, 2], args.source)
    if args.restart_cost:
        restart_cost_table(args.restart_cost)
    if args.instance_experiment:
        instance_experiment(args.instance_experiment, [0, 1], args.data, args.pennfudan)
    if args.sparse_experiment:
        sparse_experiment(args.sparse_experiment, [0, 1], args.data, args.pennfudan, args.folds)
    experiments = (args.nuclei_experiment, args.fine_tune_experiment, args.restart_cost, args.instance_experiment)
    if args.volume_experiment:
        volume_experiment(args.volume_experiment, [0, 1], args.data, args.folds, args.nuclei3d, args.minutes)
    experiments += (args.sparse_experiment, args.volume_experiment)
    if args.data_scale or args.predict_stack or any(experiments):
        return

    device = resolve_device(args.device)
    defaults = VOLUME_DEFAULTS if args.dims == 3 else DEVICE_DEFAULTS
    for key, value in defaults["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models = [case for case in args.models if case != "monai" or importlib.util.find_spec("monai")]
    if not models:
        raise SystemExit("MONAI is not installed (pip install monai), and --models names no other model")
    if len(models) < len(args.models):
        print("note: MONAI is not installed (pip install monai): its BasicUNet is left out", file=sys.stderr)
    if args.dims == 3:  # each model and tile in a process of its own, for its own peak memory
        results = {}
        for side in args.tiles:
            tile_args = argparse.Namespace(**{**vars(args), "size": side})
            results |= {(case, side): in_child(time_training, case, tile_args) for case in models}
        print_volume_table(results, args, device)
        return
    results = {case: in_child(time_training, case, args) for case in models}
    print_training_table(results, args, device)
    if args.infer_size:
        result = in_child(time_inference, args)
        print(
            f"\ninference, tiled predictor ({'bf16' if device.type == 'cuda' else 'fp32'}): one "
            f"{args.infer_size}x{args.infer_size} image in "
            f"{result['seconds']:.2f} s = {1 / result['seconds']:.2f} images/s, {result['tiles']:.0f} tiles of "
            f"{args.infer_tile} px = {result['tiles'] / result['seconds']:.1f} tiles/s"
        )
    if args.workers:
        step_seconds = results["ours"]["seconds"] if "ours" in results else next(iter(results.values()))["seconds"]
        data_path_table(args, step_seconds)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:  # bad data or files: one line, as training.py and test.py say it
        raise SystemExit(f"error: {error}") from None
