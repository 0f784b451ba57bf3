"""What every command of the kit shares: the one error type (SailError: a clear message and exit
status 2), the stage runner that turns it into one line on stderr, plain logs to stdout and log.txt,
progress bars, stable seeds derived from names, and where kit-built models are cached ($SAIL_CACHE).
"""
import hashlib
import logging
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
log = logging.getLogger("sail")


class SailError(Exception):
    """Bad input or a refused action: the stage prints the message and exits with status 2."""


def run_stage(main, args):
    """Run a stage's main(args); turn a SailError into one clear line on stderr and exit 2."""
    try:
        main(args)
    except SailError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.stream.write(f"error: {err}\n")
                handler.flush()
        sys.exit(2)


def setup_logging(out_dir, stage):
    """Plain logs to stdout and to <out_dir>/log.txt (appended, one header line per start)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    fmt = logging.Formatter(f"%(asctime)s {stage} %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(out_dir / "log.txt")):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for noisy in ("diffusers", "transformers", "accelerate", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("transformers.utils.import_utils").addFilter(_without_torchvision_fallback)


def _without_torchvision_fallback(record):
    """Drops transformers 5's warning that, without torchvision, diffusers' pipelines get the PIL
    CLIPImageProcessor: the kit's scorers use that one anyway, so it is noise in every stage's log."""
    return "requires torchvision (not installed)" not in record.getMessage()


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on a terminal, silent in logs and tests."""
    from tqdm.auto import tqdm
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


CACHE_DIR = Path(os.environ.get("SAIL_CACHE", Path.home() / ".cache" / "sail-kit"))


def derive_seed(*parts):
    """A stable 63-bit seed from any parts, e.g. (run seed, prompt_id, sample index)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)
