"""Benchmark: training and inference speed of the U-Net, against a bare PyTorch loop and MONAI's BasicUNet.

    python bench.py [--device cpu|cuda] [--size 572] [--batch 8] [--widths 64,128,256,512]     # GPU defaults shown
                    [--precision fp32|bf16|fp16] [--channels-last] [--compile] [--steps 3]
                    [--models ours,bare,monai] [--infer-size 2048] [--workers 0 2] [--data ISBI_FOLDER]
    python bench.py                              # on a CPU: tiles of 252 px, batch 2, a 512 px image: minutes
    python bench.py --data-scale 30,240,960      # data at scale: in memory (as before the cache) vs the cache
    python bench.py --predict-stack 2            # peak memory of test.py --input on a 2 GB multi-page TIFF
    python bench.py --nuclei-experiment 40       # touching nuclei: instance-id masks against 0/255 masks

Prints numbers and asserts nothing. Three tables by default:

1. Training, on the same random batch for every model: ms per step, images/s, peak memory, forward
   GFLOP per image, achieved TFLOP/s and, on CUDA, the model FLOP utilisation (MFU). ``ours`` is
   ``step.train_step`` (weighted cross-entropy with a weight map, gradient clipping, Adam);
   ``bare`` the same network in a five-line PyTorch loop (plain cross-entropy, Adam); ``monai``
   MONAI's ``BasicUNet`` with the same widths and normalisation (same-size convolutions, so more
   FLOPs per image: compare TFLOP/s). MONAI is a benchmark-only dependency (``pip install monai``).
2. Inference: one ``--infer-size`` square image predicted by the tiled predictor (``infer.py``).
3. The data path (loader and augmentation) against the training step: the device must never wait.

FLOPs are counted from the shapes of every convolution in one forward pass (2 x multiply-adds; the
ReLUs, norms and pooling are left out); a training step counts as 3 x forward (the backward pass is
about twice the forward). MFU divides the achieved TFLOP/s by the card's dense peak for the
precision (``--peak-tflops`` to give it; fp32 counts TF32 tensor cores, which PyTorch uses for
convolutions by default). Each model runs in a process of its own, so that the peak memory (CUDA:
``max_memory_allocated``; CPU: growth of the resident set while building and training the model)
is its own.

``--data-scale`` writes folders of N images of 512x512 px and prints, for the in-memory data path of
before the preprocessing cache (kept here to compare with) and for the cache (cold, then warm): the
start-up time per image, peak RSS, RAM and disk bytes per pixel, and the loader's time per batch
against the shipped model's training step. ``--predict-stack`` writes a multi-page TIFF and prints
the peak RSS of ``test.py --input`` on it.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import multiprocessing
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

# Dense tensor-core peaks in TFLOP/s from NVIDIA's data sheets (SXM modules; PCIe cards are lower)
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L4": {"bf16": 121.0, "fp16": 121.0, "fp32": 60.0},
}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_flops(model: torch.nn.Module, image_channels: int, size: int) -> float:
    """FLOPs (2 x multiply-adds) of the convolutions in a forward pass of one ``size`` x ``size``
    image, counted from their shapes on the meta device (nothing is computed)."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1]
        if isinstance(module, torch.nn.ConvTranspose2d):  # every input pixel spreads to kernel x out_channels outputs
            total += 2 * inputs[0].numel() * module.out_channels * kernel // module.groups
        else:
            total += 2 * output.numel() * module.in_channels * kernel // module.groups

    meta_model = copy.deepcopy(model).to("meta").eval()
    hooks = [
        m.register_forward_hook(count)
        for m in meta_model.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    ]
    with torch.no_grad():
        meta_model(torch.zeros(1, image_channels, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    return float(total)


def build(name: str, widths: list[int], norm: str) -> torch.nn.Module:
    """``ours`` and ``bare``: this project's U-Net (valid convolutions, as in the paper);
    ``monai``: MONAI's BasicUNet with the same widths (its five levels are ours plus the bottleneck)."""
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
            spatial_dims=2,
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
                    if isinstance(child, torch.nn.InstanceNorm2d):
                        setattr(parent, child_name, torch.nn.Identity())
        return model
    from model import UNet

    return UNet(1, 2, widths, padding=0, norm=norm)


def time_training(case: str, args: argparse.Namespace, queue) -> None:
    """Child process: time ``args.steps`` training steps of model ``case`` after ``args.warmup``."""
    from model import center_crop
    from segmentation.engine.device import prepare_device, resolve_device
    from segmentation.engine.step import autocast, train_step

    device = resolve_device(args.device)
    prepare_device(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.manual_seed(0)
    model = build(case, args.widths, args.norm)
    flops = forward_flops(model, 1, args.size)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, 1, args.size, args.size, generator=generator)
    label = (torch.rand(args.batch, args.size, args.size, generator=generator) > 0.3).long()
    weight = 1 + torch.rand(args.batch, args.size, args.size, generator=generator)
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
            loss = F.cross_entropy(logits.float(), center_crop(label, *logits.shape[-2:]))
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
    queue.put({"seconds": seconds, "peak_bytes": peak, "flops": flops, "device": describe(device)})


def time_inference(args: argparse.Namespace, queue) -> None:
    """Child process: the tiled predictor on one ``args.infer_size`` square image (bf16 on CUDA)."""
    from segmentation.engine.device import resolve_device
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
    from dataset import EpochSampler, build_datasets
    from segmentation.config import load_config
    from segmentation.data.augment import augment_batch
    from segmentation.engine.device import resolve_device

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
    dataset = build_datasets(config, lambda message: None)["train"]
    batch = [torch.stack(tensors).to(device) for tensors in zip(*(dataset[i] for i in range(args.batch)))]
    settings = dict(config["augment"], rotation=180.0)
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


def data_scale_table(counts: list[int]) -> None:
    """``--data-scale``: start-up, memory and loader speed for folders of N images of 512x512 px, read
    in memory as before the cache and through the cache (cold, then warm), with the shipped config's
    tiles and batch; the loader's time per batch against the shipped model's training step."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="unet-bench-data-"))
    try:
        write_scale_folders(root, counts)
        step = in_child(time_shipped_step)
        print(
            f"\ndata at scale: folders of 512x512 px images, config.yaml's tiles and batch; one epoch through the loader; the shipped model's step takes {step['seconds'] * 1000:.0f} ms"
        )
        print(
            f"{'images':>7} {'path':>16} {'start s/image':>14} {'peak RSS GB':>12} {'RAM B/px':>9} {'disk B/px':>10} {'ms/batch':>9} {'x faster than step':>19}"
        )
        for count in counts:
            for kind, cache_dir in (
                ("memory", None),
                ("cache, cold", root / f"cache{count}"),
                ("cache, warm", root / f"cache{count}"),
            ):
                result = in_child(measure_data_path, kind, root / f"n{count}", cache_dir)
                disk = (
                    sum(path.stat().st_size for path in cache_dir.rglob("*.npy")) / result["pixels"] if cache_dir else 0
                )
                print(
                    f"{count:>7} {kind:>16} {result['startup'] / count:>14.4f} {result['peak_rss'] / 1e9:>12.2f} {(result['peak_rss'] - result['baseline_rss']) / result['pixels']:>9.1f} "
                    f"{disk:>10.1f} {result['per_batch'] * 1000:>9.1f} {step['seconds'] / result['per_batch']:>19.1f}"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def write_scale_folders(root: Path, counts: list[int]) -> None:
    """``root/n<N>/{images,masks}`` for each N: 30 synthetic EM images of 512 px as 8-bit PNGs and
    0/255 masks, repeated under new names; each folder holds its own hard links, so its files (and
    cache entries) are its own."""
    import skimage.io

    from segmentation.data.synthetic import synthetic_em_set

    originals = root / "originals"
    for folder in ("images", "masks"):
        (originals / folder).mkdir(parents=True)
    for index, (image, label, _) in enumerate(synthetic_em_set(30, 512, seed=0)):
        skimage.io.imsave(originals / "images" / f"{index}.png", (image * 255).astype(np.uint8), check_contrast=False)
        skimage.io.imsave(originals / "masks" / f"{index}.png", (label * 255).astype(np.uint8), check_contrast=False)
    for count in counts:
        for folder in ("images", "masks"):
            (root / f"n{count}" / folder).mkdir(parents=True)
            for index in range(count):
                os.link(originals / folder / f"{index % 30}.png", root / f"n{count}" / folder / f"{index:05d}.png")


def scale_config(data: Path, cache_dir: Path | None):
    from segmentation.config import DEFAULT_CONFIG, load_config

    return load_config(
        DEFAULT_CONFIG,
        ["train.dataset_name=folder", f"train.data={data}", f"train.cache_dir={cache_dir}", "train.device=cpu"],
    )


def time_shipped_step(queue) -> None:
    """Child process: ms per training step of config.yaml's model on a batch of its tiles, on the CPU."""
    from model import build_model
    from segmentation.config import DEFAULT_CONFIG, load_config
    from segmentation.engine.step import build_optimizer, train_step

    config = load_config(DEFAULT_CONFIG, ["train.device=cpu"])
    train, size = config["train"], config["train"]["tile_size"]
    torch.manual_seed(0)
    model = build_model(config["unet"])
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    batch = (
        torch.randn(train["batch_size"], 1, size, size),
        torch.randint(0, 2, (train["batch_size"], size, size)),
        torch.ones(train["batch_size"], size, size),
    )
    train_step(model, optimizer, batch, train["loss"], train["grad_clip"], torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(3):
        train_step(model, optimizer, batch, train["loss"], train["grad_clip"], torch.device("cpu"))
    queue.put({"seconds": (time.perf_counter() - start) / 3})


def measure_data_path(kind: str, data: Path, cache_dir: Path | None, queue) -> None:
    """Child process: build the training tiles of a folder (``memory``: every image preprocessed and
    kept in RAM, as before the cache; else through the cache) and read one epoch through the loader."""
    from dataset import EpochSampler, build_datasets

    config = scale_config(data, cache_dir or data / "unused")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    tiles = in_memory_tiles(config) if kind == "memory" else build_datasets(config, lambda message: None)["train"]
    startup = time.perf_counter() - start
    loader = DataLoader(tiles, config["train"]["batch_size"], sampler=EpochSampler(len(tiles), seed=0), drop_last=True)
    start, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
    pixels = sum(1 for _ in (data / "images").iterdir()) * 512 * 512
    queue.put(
        {
            "startup": startup,
            "per_batch": (time.perf_counter() - start) / batches,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "baseline_rss": baseline,
            "pixels": pixels,
        }
    )


def in_memory_tiles(config: dict) -> torch.utils.data.Dataset:
    """The data path before the preprocessing cache, kept here to compare with: every image read,
    normalised (float32) and weighted (float32 weight map) at start, its tiles cut from mirror-padded
    copies in RAM."""
    from dataset import list_samples
    from model import output_size
    from segmentation.data.preprocess import mirror_pad, normalize_image
    from segmentation.data.readers import mask_settings
    from segmentation.data.weight_maps import class_balance_weights, weight_map

    unet, train = config["unet"], config["train"]
    samples = [sample.read(mask_settings(config)) for sample in list_samples(config)[0]]
    class_weights = class_balance_weights([sample.label for sample in samples], unet["num_classes"])
    tile, out = train["tile_size"], output_size(train["tile_size"], len(unet["input_channels"]), unet["padding"])
    margin = (tile - out) // 2
    arrays = [
        [
            mirror_pad(array, margin, margin, margin)
            for array in (
                normalize_image(s.image, unet["image_channels"]),
                s.label.astype(np.int64),
                weight_map(s.label, s.instances, train["w_0"], train["sigma"], class_weights),
            )
        ]
        for s in samples
    ]

    class InMemoryTiles(torch.utils.data.Dataset):
        def __len__(self):
            return len(arrays) * train["samples_per_image"]

        def __getitem__(self, key):
            epoch, index = divmod(key, len(self))
            rng = np.random.default_rng([train["seed"], epoch, index])
            image, label, weight = arrays[index // train["samples_per_image"]]
            top, left = (int(rng.integers(0, side - 2 * margin - out + 1)) for side in label.shape)
            window = (slice(top, top + tile), slice(left, left + tile))
            return (
                torch.from_numpy(np.ascontiguousarray(image[(slice(None), *window)])),
                torch.from_numpy(label[window].copy()),
                torch.from_numpy(weight[window].copy()),
            )

    return InMemoryTiles()


def predict_stack_table(gigabytes: float) -> None:
    """``--predict-stack``: peak memory of ``test.py --input`` on a multi-page TIFF of this many GB
    (8-bit pages of 2048x2048 px, as an EM stack) with a small U-Net (widths 4-8, so that it runs in minutes on a CPU)."""
    import subprocess
    import tempfile

    import tifffile

    from model import build_model
    from segmentation.config import load_config
    from segmentation.engine.checkpoint import save_checkpoint

    root = Path(tempfile.mkdtemp(prefix="unet-bench-stack-"))
    try:
        config = load_config(None, ["unet.input_channels=[4, 8]", "train.device=cpu"])
        save_checkpoint(
            root / "small.pt",
            {"model": build_model(config["unet"]).state_dict(), "config": config, "progress": {"epoch": 0}},
        )
        pages = max(1, round(gigabytes * 2**30 / 2048**2))
        rng = np.random.default_rng(0)
        with tifffile.TiffWriter(root / "stack.tif") as writer:
            for _ in range(pages):
                writer.write(
                    rng.integers(0, 255, (2048, 2048), dtype=np.uint8), photometric="minisblack", contiguous=True
                )
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("test.py")),
                "--checkpoint",
                str(root / "small.pt"),
                "--input",
                str(root / "stack.tif"),
                "--output",
                str(root / "out"),
                "--probabilities",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(
            f"\ntest.py --input on a {(root / 'stack.tif').stat().st_size / 2**30:.2f} GiB TIFF of {pages} pages of 2048x2048 px (masks and probabilities): "
            f"peak RSS {peak / 2**30:.2f} GiB, {time.perf_counter() - start:.0f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def nuclei_experiment(epochs: int, seeds: list[int]) -> None:
    """``--nuclei-experiment``: 30 synthetic images of touching nuclei (``synthetic.touching_nuclei``),
    trained with the shipped config once from instance-id masks and once from the same masks as 0/255,
    per seed; prints the object F1 at IoU 0.5 and the Dice on the 6 held-out test images."""
    import subprocess
    import tempfile

    import skimage.io
    import tifffile

    from segmentation.data.synthetic import touching_nuclei

    root = Path(tempfile.mkdtemp(prefix="unet-bench-nuclei-"))
    try:
        truth = []
        for kind in ("ids", "binary"):
            (root / kind / "images").mkdir(parents=True)
            (root / kind / "masks").mkdir()
        for index, child in enumerate(np.random.SeedSequence(7).spawn(30)):
            image, ids = touching_nuclei(256, np.random.default_rng(child), spacing=22.0)
            truth.append(ids)
            for kind in ("ids", "binary"):
                skimage.io.imsave(
                    root / kind / "images" / f"{index:02d}.png", (image * 255).astype(np.uint8), check_contrast=False
                )
            tifffile.imwrite(root / "ids" / "masks" / f"{index:02d}.tif", ids, photometric="minisblack")
            skimage.io.imsave(
                root / "binary" / "masks" / f"{index:02d}.png", ((ids > 0) * 255).astype(np.uint8), check_contrast=False
            )
        print(
            f"\ntouching nuclei: 30 images of 256 px, trained on 21, validated on 3, scored on 6 (24-29) against the true ids; {epochs} epochs of the shipped config"
        )
        print(f"{'masks':>18} {'seed':>5} {'object F1':>10} {'Dice':>8} {'minutes':>8}")
        for kind, label in (("ids", "instance ids"), ("binary", "0/255")):
            for seed in seeds:
                overrides = [
                    "train.dataset_name=folder",
                    f"train.data={root / kind}",
                    f"train.cache_dir={root / 'cache'}",
                    f"train.save_path={root / 'weights'}",
                    f"train.log_path={root / 'logs'}",
                    f"train.run_name={kind}-{seed}",
                    f"train.seed={seed}",
                    f"train.max_epochs={epochs}",
                    "train.val_images=[21, 22, 23]",
                    "train.test_images=[24, 25, 26, 27, 28, 29]",
                ]
                start = time.perf_counter()
                subprocess.run(
                    [sys.executable, str(Path(__file__).with_name("training.py")), *overrides],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                minutes = (time.perf_counter() - start) / 60
                scores = in_child(score_objects, root / "weights" / f"{kind}-{seed}" / "best.pt", truth[24:])
                print(f"{label:>18} {seed:>5} {scores['f1']:>10.3f} {scores['dice']:>8.3f} {minutes:>8.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def score_objects(checkpoint: Path, truth: list, queue) -> None:
    """Child process: object F1 at IoU 0.5 and Dice of a checkpoint on its config's test images,
    against the true object ids ``truth`` (one array per test image)."""
    from dataset import build_datasets
    from segmentation.data.readers import object_instances
    from segmentation.engine.checkpoint import decision_threshold, load_model
    from segmentation.inference.infer import predict_with_config, predicted_classes
    from segmentation.metrics import instance_f1, instance_matches

    model, config, state, device = load_model(checkpoint, None, [])
    test = build_datasets(config, lambda message: None)["test"]
    matched, overlap, total = np.zeros(3, dtype=np.int64), 0, 0
    for (image, label, _), ids in zip(test, truth):
        classes = predicted_classes(
            predict_with_config(model, image.to(device), config).cpu(),
            decision_threshold(config, state),
            config["predict"]["watershed_seeds"],
            config["predict"]["watershed_min_seed"],
        ).numpy()
        matched += instance_matches(ids, object_instances(classes))
        overlap, total = (
            overlap + np.count_nonzero((classes == 1) & (ids > 0)),
            total + np.count_nonzero(classes == 1) + np.count_nonzero(ids > 0),
        )
    queue.put({"f1": instance_f1(*matched), "dice": 2 * overlap / total})


# Defaults per device type: the paper's tiles and batch on a GPU; on a CPU a size that times in minutes
DEVICE_DEFAULTS = {
    "cuda": {"size": 572, "batch": 8, "steps": 3, "infer_size": 2048, "workers": [0, 2]},
    "cpu": {"size": 252, "batch": 2, "steps": 2, "infer_size": 512, "workers": [0]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--size", type=int, help="training tile size in px, valid for the network (default: 572 on a GPU, 252 on a CPU)"
    )
    parser.add_argument("--batch", type=int, help="training batch (default: 8 on a GPU, 2 on a CPU)")
    parser.add_argument(
        "--widths", default="64,128,256,512", help="unet.input_channels, comma-separated (paper: 64,128,256,512)"
    )
    parser.add_argument(
        "--norm", default="batch", choices=("batch", "instance", "none"), help="normalisation in both networks"
    )
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--steps", type=int, help="timed training steps per model (default: 3 on a GPU, 2 on a CPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (cuDNN autotuning, compiling)")
    parser.add_argument(
        "--models",
        default="ours,bare,monai",
        help="which of ours, bare, monai to time (monai is skipped, with a note, where it is not installed)",
    )
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for MFU (default: from the card's name)")
    parser.add_argument(
        "--infer-size",
        type=int,
        help="side of the image for the inference timing (0: skip; default: 2048 on a GPU, 512 on a CPU)",
    )
    parser.add_argument(
        "--infer-tile", type=int, default=572, help="tile side of the tiled predictor (default: the paper's 572)"
    )
    parser.add_argument("--infer-batch", type=int, default=8, help="tiles per forward pass when predicting")
    parser.add_argument("--infer-repeats", type=int, default=1)
    parser.add_argument(
        "--workers",
        type=int,
        nargs="*",
        help="loader worker counts to time (none: skip the data path; default: 0 2 on a GPU, 0 on a CPU)",
    )
    parser.add_argument("--data", type=Path, help="ISBI 2012 folder for the data path (default: synthetic images)")
    parser.add_argument(
        "--data-scale",
        help="instead: the data path for folders of this many 512 px images, e.g. 30,240,960 (in memory vs the cache)",
    )
    parser.add_argument(
        "--nuclei-experiment",
        type=int,
        metavar="EPOCHS",
        help="instead: touching nuclei trained from instance-id masks and from 0/255 masks, seeds 0 and 1; object F1 on held-out images",
    )
    parser.add_argument(
        "--predict-stack",
        type=float,
        metavar="GB",
        help="instead: peak memory of test.py --input on a multi-page TIFF of this many GB, e.g. 2",
    )
    args = parser.parse_args()
    args.widths = [int(width) for width in args.widths.split(",")]
    if args.data_scale:
        data_scale_table([int(count) for count in args.data_scale.split(",")])
    if args.predict_stack:
        predict_stack_table(args.predict_stack)
    if args.nuclei_experiment:
        nuclei_experiment(args.nuclei_experiment, [0, 1])
    if args.data_scale or args.predict_stack or args.nuclei_experiment:
        return

    from segmentation.engine.device import resolve_device

    device = resolve_device(args.device)
    for key, value in DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models = [case for case in args.models.split(",") if case != "monai" or importlib.util.find_spec("monai")]
    if len(models) < len(args.models.split(",")):
        print("note: MONAI is not installed (pip install monai): its BasicUNet is left out", file=sys.stderr)
    results = {case: in_child(time_training, case, args) for case in models}
    print_training_table(results, args, device)
    if args.infer_size:
        result = in_child(time_inference, args)
        print(
            f"\ninference, tiled predictor ({'bf16' if device.type == 'cuda' else 'fp32'}): one {args.infer_size}x{args.infer_size} image in "
            f"{result['seconds']:.2f} s = {1 / result['seconds']:.2f} images/s, {result['tiles']:.0f} tiles of {args.infer_tile} px = {result['tiles'] / result['seconds']:.1f} tiles/s"
        )
    if args.workers:
        step_seconds = results["ours"]["seconds"] if "ours" in results else next(iter(results.values()))["seconds"]
        data_path_table(args, step_seconds)


def print_training_table(results: dict, args: argparse.Namespace, device: torch.device) -> None:
    """The training table: ms per step, images/s, peak memory, FLOPs, TFLOP/s, MFU, ratio to the bare loop."""
    device_name = next(iter(results.values()))["device"]
    peak = args.peak_tflops or (peak_tflops(device_name, args.precision) if device.type == "cuda" else None)
    print(
        f"{device_name}, torch {torch.__version__}; training at {args.size}x{args.size} px, batch {args.batch}, widths {args.widths}, norm {args.norm}, "
        f"{args.precision}{', channels-last' if args.channels_last else ''}{', compiled' if args.compile else ''}; mean of {args.steps} steps after {args.warmup}"
        + (f"; MFU against {peak} TFLOP/s" if peak else "")
    )
    names = {
        "ours": "this repo (step.train_step)",
        "bare": "bare PyTorch loop, same U-Net",
        "monai": "MONAI BasicUNet, same widths",
    }
    print(
        f"{'':34} {'ms/step':>9} {'img/s':>8} {'peak MiB':>9} {'GFLOP/img':>10} {'TFLOP/s':>8} {'MFU':>6} {'vs bare':>8}"
    )
    for case, result in results.items():
        tflops = 3 * result["flops"] * args.batch / result["seconds"] / 1e12
        versus = (
            f"{result['seconds'] / results['bare']['seconds']:.2f}x" if "bare" in results and case != "monai" else ""
        )
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(
            f"{names[case]:34} {result['seconds'] * 1000:>9.1f} {args.batch / result['seconds']:>8.1f} {result['peak_bytes'] / 2**20:>9.0f} "
            f"{result['flops'] / 1e9:>10.1f} {tflops:>8.3f} {mfu:>6} {versus:>8}"
        )


if __name__ == "__main__":
    main()
