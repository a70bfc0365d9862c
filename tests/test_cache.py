"""segmentation.data.cache: entries equal a direct computation, are rebuilt exactly when their source, settings
or files change, survive interruptions, and never write into the data folder."""

import os
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import torch
from skimage import measure

from dataset import list_samples
from segmentation.config import UserError, load_config
from segmentation.data import cache
from segmentation.data.cache import PreprocessingSettings, prepare_images, read_entry, write_entry
from segmentation.data.preprocess import (
    mirror_pad,
    normalize_image,
    resize_image,
    resize_mask,
    scaled_size,
)
from segmentation.data.readers import MaskSettings
from segmentation.data.weight_maps import class_balance_weights, weight_map
from tests.helpers import datasets_of, planned_data, two_discs
from training import train


def make_folder(root: Path, count: int = 4, size: tuple[int, int] = (70, 90)) -> None:
    """Gray 8-bit images with 0/255 masks of touching rectangles (so the border term is not 0)."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        mask = np.zeros(size, np.uint8)
        for _ in range(6):
            top, left = rng.integers(0, size[0] - 20), rng.integers(0, size[1] - 20)
            mask[top : top + 18, left : left + 18] = 255
        mask[:, size[1] // 2] = 0  # a one-pixel gap that splits objects
        image = np.clip(rng.normal(100 + mask * 0.3, 20), 0, 255).astype(np.uint8)
        skimage.io.imsave(root / "images" / f"img{index}.png", image, check_contrast=False)
        skimage.io.imsave(root / "masks" / f"img{index}.png", mask, check_contrast=False)


def folder_config(root: Path, cache_dir: Path, *overrides: str) -> dict:
    return load_config(
        None,
        [
            "train.dataset_name=folder",
            f"train.data={root}",
            f"train.cache_dir={cache_dir}",
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
            "train.val_fraction=0.25",
            "train.samples_per_image=3",
            "train.device=cpu",
            *overrides,
        ],
    )


def count_builds(monkeypatch) -> list:
    built = []
    original = cache.build_entry
    monkeypatch.setattr(
        cache, "build_entry", lambda sample, *args: built.append(sample.name) or original(sample, *args)
    )
    return built


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_cached_tiles_and_weight_maps_equal_the_direct_computation(tmp_path, scale):
    make_folder(tmp_path / "data")
    config = folder_config(tmp_path / "data", tmp_path / "cache", f"train.image_scale={scale}")
    plan, data = planned_data(config)
    train_set, (samples, _) = data.train, list_samples(config.data, config.unet.num_classes, config.train.seed)
    names = [image.name for image in train_set.images]
    # the whole arrays, computed directly as before the cache: every pixel in memory, float32 and float64
    direct = {}
    for sample in samples:
        read = sample.read(MaskSettings.from_settings(config.unet.num_classes, config.data))
        image, label = normalize_image(read.image, 1), read.label
        instances = measure.label(label, connectivity=1)
        if scale != 1:
            size = scaled_size(*label.shape, scale)
            image, label, instances = (
                resize_image(torch.from_numpy(image), size).numpy(),
                resize_mask(label, size),
                resize_mask(instances, size),
            )
        direct[read.name] = (image, label, instances)
    class_weights = class_balance_weights([direct[name][1] for name in names], 2)
    assert np.array_equal(np.asarray(plan.class_weights, dtype=np.float32), class_weights)
    margin, out = train_set.margin, train_set.output_size
    for key in range(len(train_set)):
        image, label, instances = direct[names[key // train_set.samples_per_image]]
        weights = weight_map(label, instances, config.data.w_0, config.data.sigma, class_weights)
        # the tile as the in-memory implementation cut it: mirror-pad everything, then slice
        rng = np.random.default_rng([config.train.seed, 0, key])
        after = [margin + max(0, out - side) for side in label.shape]
        padded = [mirror_pad(array, margin, *after) for array in (image, label, weights)]
        top = int(rng.integers(0, padded[1].shape[0] - 2 * margin - out + 1))
        left = int(rng.integers(0, padded[1].shape[1] - 2 * margin - out + 1))
        window = (slice(top, top + train_set.tile_size), slice(left, left + train_set.tile_size))
        image_tile, label_tile, weight_tile = train_set[key]
        # float16 storage: the image to 11 significant bits (exact at scale 1, where normalize_image rounds already)
        assert np.array_equal(
            image_tile.numpy(), padded[0][(slice(None), *window)].astype(np.float16).astype(np.float32)
        )
        assert np.array_equal(label_tile.numpy(), padded[1][window])
        np.testing.assert_allclose(weight_tile.numpy(), padded[2][window], rtol=2**-11)
        assert weight_tile.max() > 2 * class_weights.max()  # the border term is there
    val_image, val_label, val_weight = data.val[0]
    sample = next(s for s in samples if s.name == data.val.names[0]).read(
        MaskSettings.from_settings(config.unet.num_classes, config.data)
    )
    assert np.array_equal(val_image.numpy(), normalize_image(sample.image, 1))  # validation images keep their size
    assert np.array_equal(val_label.numpy(), sample.label)
    np.testing.assert_allclose(
        val_weight.numpy(),
        weight_map(sample.label, measure.label(sample.label, connectivity=1), 10.0, 5.0, class_weights),
        rtol=2**-11,
    )


def test_an_edited_file_or_a_changed_setting_rebuilds_exactly_what_it_must(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    built = count_builds(monkeypatch)
    config = folder_config(tmp_path / "data", tmp_path / "cache")
    datasets_of(config, print)
    assert sorted(built) == [f"img{i}.png" for i in range(4)]
    built.clear()
    datasets_of(config, print)
    assert built == []  # warm: everything from the cache
    image = skimage.io.imread(tmp_path / "data" / "images" / "img2.png")
    skimage.io.imsave(tmp_path / "data" / "images" / "img2.png", 255 - image, check_contrast=False)
    data = datasets_of(config, print)
    assert built == ["img2.png"]
    index = [image.name for image in data.train.images + data.val.images].index("img2.png")
    entry = (data.train.images + data.val.images)[index]
    assert np.array_equal(np.asarray(entry.arrays()[0]).astype(np.float32), normalize_image(255 - image, 1))
    built.clear()
    datasets_of(folder_config(tmp_path / "data", tmp_path / "cache", "train.w_0=5"))
    assert sorted(built) == [f"img{i}.png" for i in range(4)]  # the border term of every image changes
    built.clear()
    datasets_of(
        folder_config(
            tmp_path / "data",
            tmp_path / "cache",
            "train.class_weights=[1, 3]",
            "train.val_fraction=0.5",
            "train.seed=3",
        )
    )
    assert built == []  # class weights and the split are applied per tile, not stored


def test_a_truncated_cache_file_is_named_and_rebuilt(tmp_path, monkeypatch):
    make_folder(tmp_path / "data")
    config = folder_config(tmp_path / "data", tmp_path / "cache")
    first = datasets_of(config, print).train
    entry = first.images[0]
    expected = [np.array(array) for array in entry.arrays() if array is not None]
    damaged = entry.folder / "image.npy"
    damaged.write_bytes(damaged.read_bytes()[:-100])
    assert read_entry(entry.folder)[0] is None
    notes, built = [], count_builds(monkeypatch)
    second = datasets_of(config, notes.append).train
    assert built == [entry.name]
    notes = [line for line in notes if line.startswith("cache entry")]
    assert (
        len(notes) == 1
        and str(entry.folder) in notes[0]
        and entry.name in notes[0]
        and "incomplete or damaged" in notes[0]
        and "image.npy" in notes[0]
    )
    rebuilt = [np.array(array) for array in second.images[0].arrays() if array is not None]
    assert all(np.array_equal(a, b) for a, b in zip(expected, rebuilt))


def test_an_interrupted_build_resumes_with_the_finished_entries(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", count=5)
    config = folder_config(tmp_path / "data", tmp_path / "cache")
    renames = []
    original_rename = os.rename

    def killed_at_the_third(source, target):
        renames.append(target)
        if len(renames) == 3:
            raise KeyboardInterrupt  # as a Ctrl-C between writing an entry and renaming it
        return original_rename(source, target)

    monkeypatch.setattr(cache.os, "rename", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        datasets_of(config, print)
    monkeypatch.setattr(cache.os, "rename", original_rename)
    complete = [path for path in (tmp_path / "cache").iterdir() if not path.name.startswith(".")]
    assert len(complete) == 2 and all(read_entry(path)[0] is not None for path in complete)
    # a temporary folder left by a build process that is gone is removed
    abandoned = tmp_path / "cache" / f".img9.png-0123.{cache.host_name()}.999999999.tmp"
    abandoned.mkdir()
    built = count_builds(monkeypatch)
    data = datasets_of(config, print)
    assert len(built) == 3 and not abandoned.exists()
    assert not [path for path in (tmp_path / "cache").iterdir() if path.name.startswith(".")]
    assert len(data.train.images) + len(data.val.images) == 5


def test_many_images_are_built_in_worker_processes_with_the_same_result(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", count=cache.MIN_PARALLEL + 1, size=(40, 50))
    config = folder_config(tmp_path / "data", tmp_path / "parallel")
    samples, _ = list_samples(config.data, config.unet.num_classes, config.train.seed)
    settings = PreprocessingSettings.from_settings(config.unet.image_channels, config.unet.num_classes, config.data)
    parallel = prepare_images(samples, [1.0] * len(samples), settings, tmp_path / "parallel")
    monkeypatch.setattr(cache, "MIN_PARALLEL", 10**6)
    serial = prepare_images(samples, [1.0] * len(samples), settings, tmp_path / "serial")
    for a, b in zip(parallel, serial):
        assert a.name == b.name and a.folder.name == b.folder.name and a.folder.parent != b.folder.parent
        for array_a, array_b in zip(a.arrays(), b.arrays()):
            assert (array_a is None and array_b is None) or np.array_equal(array_a, array_b)


@pytest.mark.slow
def test_a_read_only_data_folder_trains_and_is_left_as_it_was(tmp_path):
    data = tmp_path / "data"
    make_folder(data)
    before = sorted((path.relative_to(data), path.stat().st_mtime_ns) for path in data.rglob("*"))
    for path in [data, *data.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        summary = train(
            folder_config(
                data,
                tmp_path / "cache",
                "train.max_epochs=1",
                "train.batch_size=2",
                f"train.save_path={tmp_path / 'w'}",
                f"train.log_path={tmp_path / 'l'}",
            )
        )
    finally:
        for path in [data, *data.rglob("*")]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert summary.progress.epoch == 1 and (summary.folders.weights / "last.pt").exists()
    assert sorted((path.relative_to(data), path.stat().st_mtime_ns) for path in data.rglob("*")) == before
    assert len([path for path in (tmp_path / "cache").iterdir()]) == 4


def test_a_cache_that_cannot_be_written_is_a_one_line_error(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", count=2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "save", disk_full)
    with pytest.raises(
        UserError,
        match=(
            r"^train.cache_dir: cannot write .*img\d.png-.* \(No space left on device\): free some space or set "
            r"train.cache_dir to another folder$"
        ),
    ):
        datasets_of(folder_config(tmp_path / "data", tmp_path / "cache"))
    assert not list((tmp_path / "cache").iterdir())  # no half entry


def test_processes_of_a_torchrun_launch_build_their_shares_and_wait_for_the_others(tmp_path, monkeypatch):
    make_folder(tmp_path / "data", count=6, size=(40, 50))
    config = folder_config(tmp_path / "data", tmp_path / "cache")
    samples, _ = list_samples(config.data, config.unet.num_classes, config.train.seed)
    settings = PreprocessingSettings.from_settings(config.unet.image_channels, config.unet.num_classes, config.data)
    built = []
    original = cache.build_entry
    monkeypatch.setattr(
        cache,
        "build_entry",
        lambda sample, *args: built.append((threading.current_thread().name, sample.name)) or original(sample, *args),
    )
    monkeypatch.setattr(cache, "POLL_SECONDS", 0.01)
    results = {}
    other = threading.Thread(
        target=lambda: results.update(
            rank1=prepare_images(samples, [1.0] * 6, settings, tmp_path / "cache", rank=1, world_size=2)
        ),
        name="rank1",
    )
    other.start()
    results["rank0"] = prepare_images(samples, [1.0] * 6, settings, tmp_path / "cache", rank=0, world_size=2)
    other.join()
    assert sorted(name for _, name in built) == sorted(sample.name for sample in samples)  # each image built once
    assert {thread for thread, _ in built} == {"MainThread", "rank1"}  # by both processes
    assert [entry.folder for entry in results["rank0"]] == [entry.folder for entry in results["rank1"]]


def test_a_process_that_starts_after_the_others_built_their_share_builds_the_rest(tmp_path, monkeypatch):
    # torchrun's processes start at different times: rank 1 may first look at the cache when rank 0
    # has built its images 0, 2, 4 and waits for 1, 3, 5. Rank 1 must then build all three, not a
    # share of the three it finds missing (which left two to nobody and hung both processes).
    make_folder(tmp_path / "data", count=6, size=(40, 50))
    config = folder_config(tmp_path / "data", tmp_path / "cache")
    samples, _ = list_samples(config.data, config.unet.num_classes, config.train.seed)
    settings = PreprocessingSettings.from_settings(config.unet.image_channels, config.unet.num_classes, config.data)
    monkeypatch.setattr(cache, "POLL_SECONDS", 0.01)
    results = {}

    def run(rank):
        results[rank] = prepare_images(samples, [1.0] * 6, settings, tmp_path / "cache", rank=rank, world_size=2)

    first = threading.Thread(
        target=run, args=(0,), daemon=True
    )  # daemons: a hang fails the test instead of blocking pytest
    first.start()
    deadline = time.monotonic() + 60
    while len(list((tmp_path / "cache").glob("img*"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(path.name.split("-")[0] for path in (tmp_path / "cache").glob("img*")) == [
        "img0.png",
        "img2.png",
        "img4.png",
    ]
    late = threading.Thread(target=run, args=(1,), daemon=True)
    late.start()
    late.join(timeout=60)
    first.join(timeout=60)
    assert not late.is_alive() and not first.is_alive(), "a process waits for an image nobody builds"
    assert [entry.folder for entry in results[0]] == [entry.folder for entry in results[1]]


def test_entries_written_from_arrays_keep_instances(tmp_path):
    ids = two_discs(gap=0)
    entry = write_entry(
        tmp_path / "e", "e", np.zeros((1, 32, 48), np.float32), (ids > 0).astype(np.uint8), None, 1, 2, ids, "instances"
    )
    assert entry.has_instances and entry.mask_read_as == "instances" and np.array_equal(entry.instances(), ids)


def test_the_code_that_reads_image_files_is_part_of_every_key(monkeypatch):
    read = []
    original = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda path: read.append(path.name) or original(path))
    cache.code_version.__wrapped__()
    # images.py decides what a TIFF's pages are and which files are refused: new code there, new entries
    assert {"images.py", "readers.py", "preprocess.py"} <= set(read)
