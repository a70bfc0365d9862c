"""Make the root script test.py importable as ``test_script`` (the name ``test`` is a standard-library package)."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location("test_script", Path(__file__).resolve().parents[1] / "test.py")
test_script = importlib.util.module_from_spec(_spec)
sys.modules["test_script"] = test_script
_spec.loader.exec_module(test_script)
