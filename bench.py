"""Benchmark: is the data path fast enough to keep the training step busy?

    python bench.py [--device cpu|cuda] [--size 572] [--batch 8] [--widths 64,128,256,512] [--workers 0]

Times, on the same batch size and tile size: cutting tiles in the loader (per worker count), the
augmentation on the device (elastic deformation, rotation, scaling, flips, gray values), and one
training step of the U-Net (forward, backward, optimizer). Reads ISBI 2012 from ``--data`` when given,
else generates synthetic EM images. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from config import load_config
from dataset import EpochSampler, augment_batch, build_datasets
from model import UNet, count_parameters
from training import resolve_device, train_step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(dataset, batch_size: int, workers: int, batches: int) -> float:
    """Seconds per batch of the DataLoader alone (tile cutting and collation), after one warm-up batch."""
    sampler = EpochSampler(len(dataset), seed=0)
    loader = DataLoader(dataset, batch_size, sampler=sampler, drop_last=True, num_workers=workers, persistent_workers=workers > 0)
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return (time.perf_counter() - start) / batches


def time_augmentation(batch, settings: dict, device: torch.device, repeats: int) -> float:
    """Seconds per batch of ``augment_batch`` on ``device``, after one warm-up call."""
    batch = [tensor.to(device) for tensor in batch]
    generator = torch.Generator(device=device).manual_seed(0)
    augment_batch(*batch, settings, generator)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        augment_batch(*batch, settings, generator)
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def time_train_step(model: torch.nn.Module, batch, device: torch.device, steps: int) -> float:
    """Seconds per training step (forward, weighted cross-entropy, backward, Adam), after one warm-up step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = [tensor.to(device) for tensor in batch]
    train_step(model, optimizer, batch, "ce", 1.0, device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, batch, "ce", 1.0, device)
    synchronize(device)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=572, help="input tile size in px (valid for the network)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--widths", default="64,128,256,512", help="unet.input_channels, comma-separated")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="loader worker counts to time")
    parser.add_argument("--steps", type=int, default=2, help="timed training steps")
    parser.add_argument("--data", type=Path, help="ISBI 2012 folder (default: synthetic images)")
    args = parser.parse_args()

    widths = [int(width) for width in args.widths.split(",")]
    overrides = [f"unet.input_channels={widths}", f"train.tile_size={args.size}", f"train.batch_size={args.batch}", "unet.norm=none", f"train.device={args.device}"]
    overrides += ["train.dataset_name=isbi2012", f"train.data={args.data}"] if args.data else ["train.synthetic_size=512"]
    config = load_config(None, overrides)
    device = resolve_device(config["train"]["device"])
    data = build_datasets(config, print)
    dataset = data["train"]
    batch = [torch.stack(tensors) for tensors in zip(*(dataset[i] for i in range(args.batch)))]
    settings = dict(config["augment"], rotation=180.0)

    model = UNet(1, 2, widths, padding=0, norm="none").to(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"tiles {args.size}x{args.size} px, batch {args.batch}, U-Net widths {widths} ({count_parameters(model):,} parameters)")
    step = time_train_step(model, batch, device, args.steps)
    augmentation = time_augmentation(batch, settings, device, repeats=5)
    rows = [("training step (fwd + bwd + Adam)", step), ("augmentation on the device", augmentation)]
    for workers in args.workers:
        rows.append((f"loader, {workers} worker(s)", time_loader(dataset, args.batch, workers, batches=10)))
    print(f"{'':36} {'ms/batch':>10} {'samples/s':>10} {'x faster than step':>20}")
    for name, seconds in rows:
        print(f"{name:36} {seconds * 1000:>10.1f} {args.batch / seconds:>10.1f} {step / seconds:>20.1f}")
    loader_best = min(seconds for name, seconds in rows[2:])
    data_path = loader_best + augmentation
    print(f"{'data path (best loader + augmentation)':36} {data_path * 1000:>10.1f} {args.batch / data_path:>10.1f} {step / data_path:>20.1f}")
    print("(with workers the loader runs beside the step; augmentation runs in the training process)")


if __name__ == "__main__":
    main()
