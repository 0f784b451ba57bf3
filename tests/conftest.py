"""Test set-up: the kit's folder on sys.path (also for the commands the tests start, `python -m tools.label`
and the like), kit-built models cached in a temporary folder, and `load_stage("04_train")` to import the
stage scripts, whose names start with a digit."""
import importlib
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
_CACHE = tempfile.TemporaryDirectory(prefix="sail-test-cache-")
os.environ["SAIL_CACHE"] = _CACHE.name
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def load_stage(name):
    return importlib.import_module(name)  # a plain import: the name is no identifier, so not an import statement


@pytest.fixture(scope="session")
def root():
    return ROOT


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests: their models are tiny, so a second thread gains
    nothing, and on cores shared with other work it waits for them."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
