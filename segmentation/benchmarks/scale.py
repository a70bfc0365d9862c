"""Data at scale: the loader in memory against the preprocessing cache, and test.py's memory on a large stack.

``bench.py --data-scale`` and ``--predict-stack`` print these tables; every measurement runs in a
fresh process (``speed.in_child``), so that its peak resident set is its own.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from segmentation.benchmarks.speed import ROOT, in_child
from segmentation.settings import DataSettings, UNetSettings


def data_scale_table(counts: list[int]) -> None:
    """``--data-scale``: start-up, memory and loader speed for folders of N images of 512x512 px, read
    in memory as before the cache and through the cache (cold, then warm), with the shipped config's
    tiles and batch; the loader's time per batch against the shipped model's training step."""

    root = Path(tempfile.mkdtemp(prefix="unet-bench-data-"))
    try:
        write_scale_folders(root, counts)
        step = in_child(time_shipped_step)
        print(
            "\ndata at scale: folders of 512x512 px images, config.yaml's tiles and batch; one epoch through the "
            f"loader; the shipped model's step takes {step['seconds'] * 1000:.0f} ms"
        )
        print(
            f"{'images':>7} {'path':>16} {'start s/image':>14} {'peak RSS GB':>12} {'RAM B/px':>9} "
            f"{'disk B/px':>10} {'ms/batch':>9} {'x faster than step':>19}"
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
                    f"{count:>7} {kind:>16} {result['startup'] / count:>14.4f} {result['peak_rss'] / 1e9:>12.2f} "
                    f"{(result['peak_rss'] - result['baseline_rss']) / result['pixels']:>9.1f} "
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
    from segmentation.plan import training_tile_size

    config = load_config(DEFAULT_CONFIG, ["train.device=cpu"])
    train, size = config.train, training_tile_size(config.data.tile_size, config.unet.depth, config.unet.padding)
    torch.manual_seed(0)
    model = build_model(config.unet)
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    batch = (
        torch.randn(train.batch_size, 1, size, size),
        torch.randint(0, 2, (train.batch_size, size, size)),
        torch.ones(train.batch_size, size, size),
    )
    train_step(model, optimizer, batch, train.loss, train.grad_clip, torch.device("cpu"))
    start = time.perf_counter()
    for _ in range(3):
        train_step(model, optimizer, batch, train.loss, train.grad_clip, torch.device("cpu"))
    queue.put({"seconds": (time.perf_counter() - start) / 3})


def measure_data_path(kind: str, data: Path, cache_dir: Path | None, queue) -> None:
    """Child process: build the training tiles of a folder (``memory``: every image preprocessed and
    kept in RAM, as before the cache; else through the cache) and read one epoch through the loader."""
    from dataset import EpochSampler, planned_datasets

    config = scale_config(data, cache_dir or data / "unused")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if kind == "memory":
        tiles = in_memory_tiles(config.unet, config.data, config.train.seed)
    else:
        tiles = planned_datasets(config.unet, config.data, config.predict, config.train.seed, lambda _: None)[1].train
    startup = time.perf_counter() - start
    loader = DataLoader(tiles, config.train.batch_size, sampler=EpochSampler(len(tiles), seed=0), drop_last=True)
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


def in_memory_tiles(unet: UNetSettings, data: DataSettings, seed: int) -> torch.utils.data.Dataset:
    """The data path before the preprocessing cache, kept here to compare with: every image read,
    normalised (float32) and weighted (float32 weight map) at start, its tiles cut from mirror-padded
    copies in RAM."""
    from dataset import list_samples
    from model import output_size
    from segmentation.data.preprocess import mirror_pad, normalize_image
    from segmentation.data.readers import MaskSettings
    from segmentation.data.weight_maps import class_balance_weights, weight_map
    from segmentation.plan import training_tile_size

    masks = MaskSettings.from_settings(unet.num_classes, data)
    samples = [sample.read(masks) for sample in list_samples(data, unet.num_classes, seed)[0]]
    class_weights = class_balance_weights([sample.label for sample in samples], unet.num_classes)
    tile = training_tile_size(data.tile_size, unet.depth, unet.padding)
    out = output_size(tile, unet.depth, unet.padding)
    margin = (tile - out) // 2
    arrays = [
        [
            mirror_pad(array, margin, margin, margin)
            for array in (
                normalize_image(s.image, unet.image_channels),
                s.label.astype(np.int64),
                weight_map(s.label, s.instances, data.w_0, data.sigma, class_weights),
            )
        ]
        for s in samples
    ]

    class InMemoryTiles(torch.utils.data.Dataset):
        def __len__(self):
            return len(arrays) * data.samples_per_image

        def __getitem__(self, key):
            epoch, index = divmod(key, len(self))
            rng = np.random.default_rng([seed, epoch, index])
            image, label, weight = arrays[index // data.samples_per_image]
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
    (8-bit pages of 2048x2048 px, as an EM stack) with a small U-Net (widths 4-8, so that it runs in
    minutes on a CPU)."""
    import tempfile

    import tifffile

    from model import build_model
    from segmentation.checkpoints import Progress, save_checkpoint
    from segmentation.config import load_config
    from segmentation.plan import decide_plan

    root = Path(tempfile.mkdtemp(prefix="unet-bench-stack-"))
    try:
        config = load_config(None, ["unet.input_channels=[4, 8]", "train.device=cpu"])
        plan = decide_plan(config.unet, config.data, config.predict, [], lambda _: None)
        state = {"model": build_model(config.unet).state_dict(), "config": config.to_dict(), "plan": plan.to_dict()}
        save_checkpoint(root / "small.pt", {**state, "progress": Progress("untrained").to_dict()})
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
                str(ROOT / "test.py"),
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
            f"\ntest.py --input on a {(root / 'stack.tif').stat().st_size / 2**30:.2f} GiB TIFF of {pages} pages "
            "of 2048x2048 px (masks and probabilities): "
            f"peak RSS {peak / 2**30:.2f} GiB, {time.perf_counter() - start:.0f} s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
