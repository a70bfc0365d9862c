"""What several test files share: tiny configs, the shipped data's place, a whole config's data sets and predictor."""

import csv
from pathlib import Path

import numpy as np
import pytest
import skimage.io
import tifffile
import torch
import torch.nn.functional as F

from dataset import DataSets, build_datasets, prepare_data
from model import UNet
from segmentation.config import Config, load_config
from segmentation.data.synthetic import clumped_nuclei
from segmentation.inference.infer import Predictor
from segmentation.plan import Plan, decide_plan

# tests of the CUDA paths: marked cuda (python -m pytest -m cuda runs them) and skipped without a GPU
NEEDS_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
real_conv2d = torch.nn.functional.conv2d  # run_out_of_memory replaces F.conv2d and calls this
TILE = 60  # a valid input of a depth-2, padding-0 U-Net (tiny_unet); its output is 20x20
ROOT = Path(__file__).resolve().parents[1]  # the repository
SHARED = ROOT.parent / "shared" / "data"  # the real ISBI 2012 and Penn-Fudan, where this machine has them

# A tiny U-Net (widths 4, 8; depth 2 with valid convolutions: 60 px in, 20 px out) on small synthetic
# images: 4 training images x 2 tiles = 4 steps of 2 tiles per epoch, 2 validation images.
TINY = [
    "unet.input_channels=[4, 8]",
    "unet.padding=0",
    "train.synthetic_images=6",
    "train.synthetic_size=64",
    "train.val_fraction=0.34",
    "train.tile_size=60",
    "train.samples_per_image=2",
    "train.batch_size=2",
    "train.warmup_epochs=0.5",
    "train.device=cpu",
]

# A tiny 3D U-Net (widths 4, 8; same-size convolutions) on 4 synthetic volumes of 16 x 32 x 32 voxels, spacing
# (5, 1, 1): one training volume's 2 tiles per epoch, volume 2 validates, volume 3 is the test volume.
TINY_3D = [
    "unet.dims=3",
    "unet.input_channels=[4, 8]",
    "unet.padding=1",
    "train.synthetic_images=4",
    "train.synthetic_size=32",
    "train.val_images=[2]",
    "train.test_images=[3]",
    "train.batch_size=2",
    "train.samples_per_image=2",
    "train.max_epochs=1",
    "train.device=cpu",
]


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    paths = [f"train.save_path={tmp_path / 'weights'}", f"train.log_path={tmp_path / 'logs'}"]
    return load_config(None, TINY + paths + list(overrides))


def read_rows(run_log: Path) -> list[dict]:
    with (run_log / "metrics.csv").open() as file:
        return list(csv.DictReader(file))


# The configuration block of the seed repository's README, verbatim (device overridden below).
SEED_README_CONFIG = """
unet:
  input_channels: [64, 128, 256, 512]
  # input_shape: [570, 282, 138, 66, 30, 54, 102, 198, 390]
  input_shape: [320, 160, 80, 40, 20]
  num_classes: 2
  image_channels: 3
  dropout: 0.1
  use_ln: True
  padding: 1

train:
  data: 'data'
  batch_size: 8
  scheduler_type: 'warmup-cosine'
  max_epochs: 50
  warmup_epochs: 4
  use_bitsandbytes: True
  optim: 'adamw'
  lr: 1e-5
  device: 'cuda'
  save_path: 'weights'
  eval_epoch: 1
  log_epoch: 1
  save_epoch: 3
  log_path: 'logs'
  early_stopping: 50
  w_0: 1.1
  dataset_name: "pedestrian"
"""


CUDA_SIZE = 92  # a valid input of a depth-2, padding-0 U-Net: 52 px output
SLICES = [f"slice{index:02d}.png" for index in range(6)]  # the files of the image_folder fixture (conftest.py)


def folder_overrides(root: Path) -> list[str]:
    """A tiny U-Net (widths 4, 8; 60 px tiles) on the folder ``root`` (images/ + masks/), its runs written
    under ``root``, as ``section.key=value`` overrides."""
    return [
        "unet.input_channels=[4, 8]",
        "train.tile_size=60",
        "train.batch_size=2",
        "train.samples_per_image=2",
        "train.device=cpu",
        "predict.tile_size=100",
        "train.dataset_name=folder",
        f"train.data={root}",
        f"train.save_path={root / 'weights'}",
        f"train.log_path={root / 'logs'}",
        f"train.cache_dir={root / 'cache'}",  # config.yaml names cache/, which training.main would read
    ]


def folder_config(root: Path, *overrides: str) -> Config:
    """The config of ``folder_overrides(root)`` and ``overrides``."""
    return load_config(None, [*folder_overrides(root), *overrides])


def assert_same_weights(a: dict, b: dict) -> None:
    """Two state dicts hold the same tensors, bit for bit."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def plain_folder_config(root: Path, *overrides: str) -> Config:
    """The default config on the folder ``root`` (images/ + masks/), with ``overrides``."""
    return load_config(None, ["train.dataset_name=folder", f"train.data={root}", *overrides])


def datasets_of(config: Config, note=lambda message: None, rank: int = 0, world_size: int = 1) -> DataSets:
    """The datasets of a new run of ``config``, as training builds them (``prepare_data``, ``decide_plan``,
    ``build_datasets``), notes dropped unless given."""
    return planned_data(config, note, rank, world_size)[1]


def planned_data(
    config: Config, note=lambda message: None, rank: int = 0, world_size: int = 1
) -> tuple[Plan, DataSets]:
    """The plan and datasets of a new run of ``config``, as training decides and builds them."""
    unet, data, seed = config.unet, config.data, config.train.seed
    prepared = prepare_data(data, unet.image_channels, unet.num_classes, seed, note, rank, world_size, unet.dims)
    plan = decide_plan(unet, data, config.predict, prepared.train, note)
    return plan, build_datasets(prepared, plan, data.samples_per_image, seed, note)


def plan_of(config: Config) -> Plan:
    """The plan of a run of ``config`` whose decisions take no data (no images read: no class weights from
    them, masks as classes), for models built in a test."""
    return decide_plan(config.unet, config.data, config.predict, [], lambda message: None)


def predictor_of(model, config: Config, tta: bool = False, plan: Plan | None = None) -> Predictor:
    """The predictor of a model trained with ``config`` (and ``plan``, default ``plan_of(config)``), as
    training builds it."""
    plan = plan or plan_of(config)
    return Predictor.from_plan(model, plan, config.predict, config.augment, config.data.image_scale, tta)


def logged_row(result, epoch: int) -> dict:
    with (result.folders.log / "metrics.csv").open() as file:
        return next(row for row in csv.DictReader(file) if int(row["epoch"]) == epoch)


def two_discs(gap: int) -> np.ndarray:
    """Object ids (sparse, as labelling tools leave them) of two discs of radius 9 px in a 32x48 uint16
    image, their rims ``gap`` px apart along row 16 (negative: the second overlaps the first, which it
    covers, so that they touch along a curve)."""
    rows, cols = np.indices((32, 48))
    ids = np.zeros((32, 48), np.uint16)
    ids[(rows - 16) ** 2 + (cols - 13) ** 2 <= 81] = 1000
    ids[(rows - 16) ** 2 + (cols - 32 - gap) ** 2 <= 81] = 2000
    return ids


def learnable_batch(device: torch.device, count: int = 4, size: int = CUDA_SIZE, seed: int = 0) -> list[torch.Tensor]:
    """Random images whose label is where the (smoothed) image is positive: a task a U-Net learns in steps."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.nn.functional.avg_pool2d(torch.randn(count, 1, size + 4, size + 4, generator=generator), 5, stride=1)
    return [image.to(device), (image[:, 0] > 0).long().to(device), torch.ones(count, size, size, device=device)]


def small_unet(device: torch.device, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(1, 2, [8, 16], padding=0, norm="batch").to(device)


def run_out_of_memory(monkeypatch, above_batch: int = 0) -> list:
    """Make every convolution of a batch larger than ``above_batch`` raise as CUDA does when full;
    returns the batch sizes the convolutions were called with."""
    sizes = []

    def conv2d(input, *args, **kwargs):
        sizes.append(input.shape[0])
        if input.shape[0] > above_batch:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_conv2d(input, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", conv2d)
    return sizes


def write_image(path: Path, array: np.ndarray) -> None:
    """Save ``array`` to ``path`` (TIFF or any format scikit-image writes), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, array, photometric="minisblack")
    else:
        skimage.io.imsave(path, array, check_contrast=False)


def blobs_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A mask with a few rectangles of ids 1..3 (instance ids)."""
    mask = np.zeros((height, width), np.uint8)
    for instance in (1, 2, 3):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        mask[top : top + 8, left : left + 8] = instance
    return mask


def make_rgb_folder(root: Path, count: int = 4, size: tuple[int, int] = (40, 48), rgb: bool = True) -> None:
    """``root/images`` of random RGB (or gray) 8-bit images and ``root/masks`` of 0/255 masks of 8 px squares."""
    rng = np.random.default_rng(0)
    for index in range(count):
        mask = (blobs_mask(rng, *size) > 0).astype(np.uint8) * 255
        image = rng.integers(0, 255, size + ((3,) if rgb else ()), dtype=np.uint8)
        write_image(root / "images" / f"img{index}.png", image)
        write_image(root / "masks" / f"img{index}.png", mask)


def make_id_folder(root: Path, count: int = 6, size: int = 96, seed: int = 4) -> list[np.ndarray]:
    """``root/images`` of generated clumped nuclei (``synthetic.clumped_nuclei``, 8-bit) and ``root/masks`` of
    their object ids (uint16 TIFF); returns the ids."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    every = []
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(count)):
        image, ids = clumped_nuclei(size, np.random.default_rng(child))
        write_image(root / "images" / f"n{index}.png", (image * 255).astype(np.uint8))
        tifffile.imwrite(root / "masks" / f"n{index}.tif", ids, photometric="minisblack")
        every.append(ids)
    return every


def tiny_unet(image_channels=1, padding=0, seed=0, norm="batch", upsample="transpose"):
    """A depth-2 U-Net; BatchNorm's running statistics are not the identity, so eval mode matters."""
    torch.manual_seed(seed)
    model = UNet(image_channels, 2, (4, 8), padding=padding, norm=norm, upsample=upsample)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def sample(image_channels=1, size=TILE, seed=1, dtype=torch.float32):
    """(image (1, C, H, W), label (1, H, W) int64, weight (1, H, W)) drawn from a fixed generator."""
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(1, image_channels, size, size, generator=generator, dtype=dtype)
    label = torch.randint(0, 2, (1, size, size), generator=generator)
    weight = 0.5 + torch.rand(1, size, size, generator=generator, dtype=dtype)
    return image, label, weight


def modes(model) -> list[bool]:
    """The train/eval flag of every module, to check that a function restores them."""
    return [module.training for module in model.modules()]


def segment(checkpoint, images, output, *options: str) -> int:
    """``python test.py --checkpoint CHECKPOINT --input IMAGES --output OUTPUT [options]``, run in this process
    (conftest.py makes test.py importable as ``test_script``); returns its exit code."""
    import test_script

    return test_script.main(
        ["--checkpoint", str(checkpoint), "--input", str(images), "--output", str(output), *options]
    )
