"""Make the root script test.py importable as ``test_script`` (the name ``test`` is a standard-library
package), keep the tests' preprocessing cache out of the repository, and train the run that the
tests of test.py and of segmenting files look at."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.io

from segmentation import config
from segmentation.config import load_config
from segmentation.data.synthetic import synthetic_em_set
from segmentation.inference import trained as trained_models
from tests.helpers import SLICES
from training import train

_spec = importlib.util.spec_from_file_location("test_script", Path(__file__).resolve().parents[1] / "test.py")
test_script = importlib.util.module_from_spec(_spec)
sys.modules["test_script"] = test_script
_spec.loader.exec_module(test_script)


@pytest.fixture(autouse=True, scope="session")
def shared_cache(tmp_path_factory):
    """In-process configs preprocess into one temporary cache, shared by the tests as a user's runs
    share theirs, and never into the repository's cache/ (test.py takes its cache folder from the config in
    force, the shipped config.yaml's ``cache``, unless a test gives one); tests that start training.py in
    a subprocess pass their own train.cache_dir."""
    folder = tmp_path_factory.mktemp("cache")
    option = config.SCHEMA["train"]["cache_dir"]
    config.SCHEMA["train"]["cache_dir"] = dataclasses.replace(option, default=str(folder))
    in_force = trained_models.config_in_force
    trained_models.config_in_force = lambda overrides: in_force([f"train.cache_dir={folder}", *overrides])
    yield folder
    config.SCHEMA["train"]["cache_dir"] = option
    trained_models.config_in_force = in_force


@pytest.fixture
def image_folder(tmp_path):
    """Six synthetic EM slices as files, slice00..slice05 (``helpers.SLICES``), with 0/255 masks."""
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for index, (image, label, _) in enumerate(synthetic_em_set(6, 80, seed=3)):
        skimage.io.imsave(tmp_path / "images" / SLICES[index], (image * 255).astype(np.uint8), check_contrast=False)
        skimage.io.imsave(tmp_path / "masks" / SLICES[index], label * 255, check_contrast=False)
    return tmp_path


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """A tiny U-Net trained for 2 epochs on synthetic EM images saved as files (0/255 masks),
    validated on a separate folder of 3 images."""
    root = tmp_path_factory.mktemp("predict")
    for part, seed, count in (("train", 0, 4), ("val", 1, 3)):
        for index, (image, label, _) in enumerate(synthetic_em_set(count, 80, seed)):
            (root / part / "images").mkdir(parents=True, exist_ok=True)
            (root / part / "masks").mkdir(parents=True, exist_ok=True)
            skimage.io.imsave(
                root / part / "images" / f"slice{index:02d}.png", (image * 255).astype(np.uint8), check_contrast=False
            )
            skimage.io.imsave(root / part / "masks" / f"slice{index:02d}.png", label * 255, check_contrast=False)
    config = load_config(
        None,
        [
            "unet.input_channels=[4, 8]",
            "train.tile_size=60",
            "train.batch_size=2",
            "train.max_epochs=2",
            "train.device=cpu",
            "train.dataset_name=folder",
            f"train.data={root / 'train'}",
            f"train.val_data={root / 'val'}",
            "predict.tile_size=100",
            f"train.save_path={root / 'weights'}",
            f"train.log_path={root / 'logs'}",
        ],
    )
    summary = train(config)
    return root, summary


@pytest.fixture
def tiny_cells():
    """(label, instances) of 28x32 px: four cells with non-consecutive ids, two of them close together."""
    instances = np.zeros((28, 32), dtype=np.int32)
    instances[2:10, 3:12] = 4  # ids need not be consecutive
    instances[2:10, 14:20] = 9
    instances[13:25, 4:9] = 2
    rows, cols = np.indices(instances.shape)
    instances[(rows - 18) ** 2 + (cols - 21) ** 2 <= 25] = 5
    label = (instances > 0).astype(np.uint8)
    return label, instances
