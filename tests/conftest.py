"""Make the root script test.py importable as ``test_script`` (the name ``test`` is a standard-library
package), and keep the tests' preprocessing cache out of the repository."""

import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from segmentation import config

_spec = importlib.util.spec_from_file_location("test_script", Path(__file__).resolve().parents[1] / "test.py")
test_script = importlib.util.module_from_spec(_spec)
sys.modules["test_script"] = test_script
_spec.loader.exec_module(test_script)


@pytest.fixture(autouse=True, scope="session")
def shared_cache(tmp_path_factory):
    """In-process configs preprocess into one temporary cache, shared by the tests as a user's runs
    share theirs, and never into the repository's cache/; tests that start training.py in a
    subprocess pass their own train.cache_dir."""
    folder = tmp_path_factory.mktemp("cache")
    option = config.SCHEMA["train"]["cache_dir"]
    config.SCHEMA["train"]["cache_dir"] = dataclasses.replace(option, default=str(folder))
    yield folder
    config.SCHEMA["train"]["cache_dir"] = option
