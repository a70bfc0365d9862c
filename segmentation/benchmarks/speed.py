"""Training and inference speed: one model's steps timed in a process of its own, FLOPs and model FLOP utilisation.

``bench.py`` prints the tables; each timing runs in a fresh process (``in_child``), so that the peak
memory (CUDA: ``max_memory_allocated``; CPU: growth of the resident set while building and training
the model) is the model's own. In 3D (``bench.py --dims 3``) the table has a row per model and cubic tile,
with the peak beside ``segmentation.memory``'s estimate of our step.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.metadata
import multiprocessing
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from segmentation.memory import forward_maps, shown_tile, training_activation_bytes, unet_parameter_count

# Dense tensor-core peaks in TFLOP/s from NVIDIA's data sheets (SXM modules; PCIe cards are lower)
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
}
ROOT = Path(__file__).resolve().parents[2]  # the repository, where training.py and test.py lie


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model: torch.nn.Module, image_channels: int, size: int, dims: int = 2) -> float:
    """FLOPs of a forward pass of one image of ``size`` px along each of its ``dims`` axes, as
    ``torch.utils.flop_counter`` counts them: 2 x the multiply-adds of the convolutions (transposed ones
    included) and matrix products, on the meta device (nothing is computed)."""
    meta_model = copy.deepcopy(model).to("meta").eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        meta_model(torch.zeros(1, image_channels, *(size,) * dims, device="meta"))
    return float(counter.get_total_flops())


def build(name: str, widths: list[int], norm: str, dims: int = 2) -> torch.nn.Module:
    """``ours`` and ``bare``: this project's U-Net (in 2D valid convolutions, as in the paper; in 3D same-size
    ones, as MONAI's); ``monai``: MONAI's BasicUNet with the same widths (its five levels are ours plus the
    bottleneck)."""
    if name == "monai":
        from monai.networks.nets import BasicUNet

        features = (*widths, 2 * widths[-1], widths[0])
        if len(widths) != 4:
            raise SystemExit("MONAI's BasicUNet has depth 4: give --widths with 4 values")
        monai_norm = {
            "batch": ("batch", {}),
            "instance": ("instance", {"affine": True}),
            "none": ("instance", {"affine": False}),
        }[norm]
        model = BasicUNet(
            spatial_dims=dims,
            in_channels=1,
            out_channels=2,
            features=features,
            act=("relu", {"inplace": True}),
            norm=monai_norm,
            upsample="deconv",
        )
        if norm == "none":  # BasicUNet always normalises: swap the norm layers for identities
            for parent in list(model.modules()):
                for child_name, child in parent.named_children():
                    if isinstance(child, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
                        setattr(parent, child_name, torch.nn.Identity())
        return model
    from model import UNet

    return UNet(1, 2, widths, padding=0 if dims == 2 else 1, norm=norm, dims=dims)


def step_memory_estimate(model: torch.nn.Module, batch: int, size: int, precision: str) -> int:
    """Bytes of a training step of our U-Net ``model`` on ``batch`` tiles of ``size`` px along each axis, as
    training's set-up estimates it (``engine.run.check_training_memory``, Adam): the weights, their gradients
    and Adam's state, and the activations (``segmentation.memory``)."""
    blocks = forward_maps(model, model.out_channels, size, 4 if precision == "fp32" else 2)
    weights = 4 * 5 * unet_parameter_count(model, model.out_channels)  # weights, gradients, Adam's 3 copies
    return weights + batch * training_activation_bytes(blocks)


def time_training(case: str, args: argparse.Namespace, queue) -> None:
    """Child process: time ``args.steps`` training steps of model ``case`` after ``args.warmup``."""
    from model import center_crop
    from segmentation.device import prepare_device, resolve_device
    from segmentation.engine.step import autocast, train_step

    device = resolve_device(args.device)
    prepare_device(device)
    if case == "monai":  # imported before the baseline: the import's 170 MiB are not the step's
        import monai.networks.nets  # noqa: F401
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = build(case, args.widths, args.norm, args.dims)
    flops = forward_flops(model, 1, args.size, args.dims)
    estimate = None if case == "monai" else step_memory_estimate(model, args.batch, args.size, args.precision)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator, shape = torch.Generator().manual_seed(0), (args.batch, *(args.size,) * args.dims)
    image = torch.randn(shape[0], 1, *shape[1:], generator=generator)
    label = (torch.rand(shape, generator=generator) > 0.3).long()
    weight = 1 + torch.rand(shape, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    step_model = torch.compile(model) if args.compile else model
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if case == "ours":

        def step():
            train_step(
                step_model,
                optimizer,
                (image, label, weight),
                "ce",
                1.0,
                device,
                args.precision,
                scaler,
                channels_last=args.channels_last,
            )

    else:
        image, label = image.to(device).contiguous(memory_format=memory_format), label.to(device)

        def step():  # the loop every tutorial shows
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, args.precision):
                logits = step_model(image)
            loss = F.cross_entropy(logits.float(), center_crop(label, *logits.shape[2:]))
            if scaler:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()

    for _ in range(args.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    queue.put(
        {"seconds": seconds, "peak_bytes": peak, "flops": flops, "estimate_bytes": estimate, "device": describe(device)}
    )


def time_inference(args: argparse.Namespace, queue) -> None:
    """Child process: the tiled predictor on one ``args.infer_size`` square image (bf16 on CUDA)."""
    from segmentation.device import resolve_device
    from segmentation.inference.infer import predict_probabilities

    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    model = build("ours", args.widths, args.norm).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    tiles = 0

    def count(module, inputs, output):
        nonlocal tiles
        tiles += inputs[0].shape[0]

    model.register_forward_hook(count)
    image = torch.randn(1, args.infer_size, args.infer_size, generator=torch.Generator().manual_seed(0))
    if device.type == "cuda":
        predict_probabilities(
            model, image, args.infer_tile, batch_size=args.infer_batch
        )  # warm-up: cuDNN picks its kernels
        synchronize(device)
    tiles, start = 0, time.perf_counter()
    for _ in range(args.infer_repeats):
        predict_probabilities(model, image, args.infer_tile, batch_size=args.infer_batch)
    synchronize(device)
    seconds = (time.perf_counter() - start) / args.infer_repeats
    queue.put({"seconds": seconds, "tiles": tiles / args.infer_repeats})


def in_child(function, *arguments) -> dict:
    """Run ``function(*arguments, queue)`` in a fresh process and return what it put in the queue."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=function, args=(*arguments, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"{function.__name__}{arguments[:1]} failed with exit code {process.exitcode}")
    return queue.get()


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def peak_tflops(device_name: str, precision: str) -> float | None:
    for card, peaks in PEAK_TFLOPS.items():
        if card in device_name:
            return peaks[precision]
    return None


def data_path_table(args: argparse.Namespace, step_seconds: float) -> None:
    """The loader (per worker count) and the augmentation, timed on the benchmark's batch."""
    from dataset import EpochSampler, planned_datasets
    from segmentation.config import load_config
    from segmentation.data.augment import augment_batch
    from segmentation.device import resolve_device

    overrides = [
        f"unet.input_channels={args.widths}",
        f"train.tile_size={args.size}",
        f"train.batch_size={args.batch}",
        f"train.device={args.device}",
    ]
    overrides += (
        ["train.dataset_name=isbi2012", f"train.data={args.data}"] if args.data else ["train.synthetic_size=512"]
    )
    config = load_config(None, overrides)
    device = resolve_device(args.device)
    dataset = planned_datasets(config.unet, config.data, config.predict, config.train.seed, lambda _: None)[1].train
    batch = [torch.stack(tensors).to(device) for tensors in zip(*(dataset[i] for i in range(args.batch)))]
    settings = dataclasses.replace(config.augment, rotation=180.0)
    generator = torch.Generator(device=device).manual_seed(0)
    augment_batch(*batch, settings, generator)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(5):
        augment_batch(*batch, settings, generator)
    synchronize(device)
    rows = [("augmentation on the device", (time.perf_counter() - start) / 5)]
    for workers in args.workers:
        loader = DataLoader(
            dataset,
            args.batch,
            sampler=EpochSampler(len(dataset), seed=0),
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        iterator = iter(loader)
        next(iterator)
        start = time.perf_counter()
        for _ in range(10):
            next(iterator)
        rows.append((f"loader, {workers} worker(s)", (time.perf_counter() - start) / 10))
    data_path = rows[0][1] + min(seconds for _, seconds in rows[1:])
    rows.append(("data path (best loader + augmentation)", data_path))
    print(f"\ndata path ({'ISBI 2012' if args.data else 'synthetic images'}), batch {args.batch} at {args.size} px")
    print(f"{'':40} {'ms/batch':>10} {'samples/s':>10} {'x faster than our step':>23}")
    for name, seconds in rows:
        print(f"{name:40} {seconds * 1000:>10.1f} {args.batch / seconds:>10.1f} {step_seconds / seconds:>23.1f}")
    print("(loader workers run beside the step; the augmentation runs in the training process)")


def print_training_table(results: dict, args: argparse.Namespace, device: torch.device) -> None:
    """The training table: ms per step, images/s, peak memory, FLOPs, TFLOP/s, MFU, ratio to the bare loop."""
    device_name = next(iter(results.values()))["device"]
    peak = args.peak_tflops or (peak_tflops(device_name, args.precision) if device.type == "cuda" else None)
    print(
        f"{device_name}, torch {torch.__version__}; training at {args.size}x{args.size} px, batch {args.batch}, "
        f"widths {args.widths}, norm {args.norm}, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}{', compiled' if args.compile else ''}; "
        f"mean of {args.steps} steps after {args.warmup}" + (f"; MFU against {peak} TFLOP/s" if peak else "")
    )
    names = {
        "ours": "this repo (step.train_step)",
        "bare": "bare PyTorch loop, same U-Net",
        "monai": "MONAI BasicUNet, same widths",
    }
    print(
        f"{'':34} {'ms/step':>9} {'img/s':>8} {'peak MiB':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6} "
        f"{'vs bare':>8}"
    )
    for case, result in results.items():
        tflops = 3 * result["flops"] * args.batch / result["seconds"] / 1e12
        versus = (
            f"{result['seconds'] / results['bare']['seconds']:.2f}x" if "bare" in results and case != "monai" else ""
        )
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(
            f"{names[case]:34} {result['seconds'] * 1000:>9.1f} {args.batch / result['seconds']:>8.1f} "
            f"{result['peak_bytes'] / 2**20:>9.0f} "
            f"{result['flops'] / 1e9:>10.1f} {tflops:>8.3f} {mfu:>6} {versus:>8}"
        )


def print_volume_table(results: dict, args: argparse.Namespace, device: torch.device) -> None:
    """The 3D training table, a row per model and tile (``results[(case, side)]``): seconds per step, voxels
    per second, the step's FLOPs (3 x forward) and milliseconds per GFLOP, the peak memory and, for our
    U-Net, ``segmentation.memory``'s estimate of it."""
    device_name = next(iter(results.values()))["device"]
    monai = f", MONAI {importlib.metadata.version('monai')}" if any(case == "monai" for case, _ in results) else ""
    peak = "max_memory_allocated" if device.type == "cuda" else "growth of the process's peak RSS"
    print(
        f"{device_name}, torch {torch.__version__}{monai}; 3D training, batch {args.batch}, widths {args.widths}, "
        f"norm {args.norm}, same-size convolutions, {args.precision}{', compiled' if args.compile else ''}; "
        f"mean of {args.steps} steps after {args.warmup}; peak: {peak}, estimate: segmentation.memory"
    )
    names = {"ours": "this repo (step.train_step)", "bare": "bare PyTorch loop, same U-Net", "monai": "MONAI BasicUNet"}
    print(
        f"{'':30} {'tile':>11} {'s/step':>8} {'Mvoxel/s':>9} {'GFLOP/step':>11} {'ms/GFLOP':>9} "
        f"{'peak MiB':>9} {'est. MiB':>9}"
    )
    for (case, side), result in results.items():
        gflop = 3 * result["flops"] * args.batch / 1e9
        estimate = "-" if result["estimate_bytes"] is None else f"{result['estimate_bytes'] / 2**20:.0f}"
        print(
            f"{names[case]:30} {shown_tile((side,) * 3):>11} {result['seconds']:>8.3f} "
            f"{args.batch * side**3 / result['seconds'] / 1e6:>9.3f} {gflop:>11.3f} "
            f"{1000 * result['seconds'] / gflop:>9.3f} {result['peak_bytes'] / 2**20:>9.0f} {estimate:>9}"
        )
