"""Test set-up: the kit's folder on sys.path, kit-built models cached in a temporary folder,
and `load_stage("04_train")` to import the stage scripts, whose names start with a digit."""
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_CACHE = tempfile.TemporaryDirectory(prefix="sail-test-cache-")
os.environ["SAIL_CACHE"] = _CACHE.name
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def load_stage(name):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def root():
    return ROOT
