"""The on-disk contract of a SAIL run: the run folder's layout (the only place its names are
spelled), JSONL, pair and prompt files, images, atomic writes, settings recorded beside work,
arguments and timings, run-folder locks, the disk check and the pool check.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import socket
import sys
import time
from pathlib import Path

from PIL import Image

from sail.common import SailError


def save_args(out_dir, stage, args, **extra):
    """Write <out_dir>/<stage>.args.json: the arguments and where the stage ran."""
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info.update(extra, _host=socket.gethostname(), _time=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json_atomic(Path(out_dir) / f"{stage}.args.json", info)


def peak_memory():
    """Peak resident RAM of this process and, on CUDA, peak GPU memory allocated, in GiB."""
    info = dict(peak_ram_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
    torch = sys.modules.get("torch")  # a process that never imported torch (the labelling server) used no GPU
    if torch is not None and torch.cuda.is_available():
        info["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return info


def save_timing(out_dir, stage, count, unit, seconds):
    """Write <out_dir>/<stage>.timing.json: the work done after the models were loaded, its time and
    rate, and the process's peak memory (GPU where there is one, else resident RAM)."""
    info = dict(count=count, unit=unit, seconds=round(seconds, 3), rate=round(count / max(seconds, 1e-9), 4),
                **peak_memory())
    write_json_atomic(Path(out_dir) / f"{stage}.timing.json", info)
    return info


def check_settings(path, settings, start_over):
    """Settings are part of what is finished. `path` records the settings that decide a stage's
    outputs the first time it writes any; a rerun that would continue that work with other settings
    stops, naming each setting that differs, its old and new value, and `start_over` (how to begin
    afresh)."""
    path = Path(path)
    settings = json.loads(json.dumps(settings, default=str))
    if path.is_file():
        old = json.loads(path.read_text())
        differ = [key for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key)]
        if differ:
            was = ", ".join(f"{key} = {old.get(key)!r}" for key in differ)
            now = ", ".join(f"{key} = {settings.get(key)!r}" for key in differ)
            raise SailError(f"{path.parent} holds work made with {was}, and this run has {now}: "
                            f"rerun with the former to continue, or {start_over}")
    else:
        write_json_atomic(path, settings)


def _jsonable(obj):
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else str(obj)


def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")
    os.replace(tmp, path)


def write_jsonl_atomic(path, rows):
    """Write rows to a temporary name and rename it into place, so readers see all or nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_jsonl(path, required=(), types=None, allow_truncated_tail=False):
    """Read a JSONL file; a malformed line, a missing field or a field of the wrong type stops
    with a SailError naming file and line. `types` maps field -> type or tuple of types.
    With allow_truncated_tail, an unterminated last line (a killed writer) is dropped."""
    path = Path(path)
    if not path.is_file():
        raise SailError(f"{path}: file not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if allow_truncated_tail and lineno == len(lines) and not line.endswith("\n"):
                break
            raise SailError(f"{path}:{lineno}: malformed JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise SailError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise SailError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        for key, kind in (types or {}).items():
            if key in row and (isinstance(row[key], bool) or not isinstance(row[key], kind)):
                raise SailError(f"{path}:{lineno}: field '{key}' has the wrong type ({type(row[key]).__name__})")
        row["_line"] = lineno
        rows.append(row)
    return rows


def strip_private(row):
    return {k: v for k, v in row.items() if not k.startswith("_")}


def load_image(path, where=""):
    """Open an image as RGB; a missing or unreadable file stops with a message naming it."""
    path = Path(path)
    prefix = f"{where}: " if where else ""
    if not path.is_file():
        raise SailError(f"{prefix}image not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:  # PIL raises many kinds for a corrupt file
        raise SailError(f"{prefix}unreadable image {path} ({type(err).__name__}: {err})") from None


def image_name(prompt_id, index):
    """File name of image `index` of a prompt: the id where it is a safe file name, else the id
    made safe plus a short hash, so that different ids never share a name."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", prompt_id)
    if safe != prompt_id:
        safe += "-" + hashlib.sha1(prompt_id.encode()).hexdigest()[:8]
    return f"{safe}_{index}.png"


def save_image_atomic(image, path):
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    image.save(tmp)
    os.replace(tmp, path)


def image_is_complete(path):
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except Exception:
        return False


# The on-disk contract between the stages: the only place in the code that spells its names
# (run_all.sh states the pool file's name once more).
ITERATION_PREFIX = "iter_"


TRACKER_DIR, VALIDATION_DIR = "tracker", "validation"  # beside an iteration's checkpoint: 04's tracker logs, validation images


def iteration_name(i):
    return f"{ITERATION_PREFIX}{i:02d}"


def iteration_dir(run, i):
    """runs/<run>/iter_XX: an iteration's candidates, rewards, pairs and checkpoint."""
    return Path(run) / iteration_name(i)


def checkpoint_dir(run, i):
    return iteration_dir(run, i) / "ckpt"


def pool_path(run, i):
    return Path(run) / "pools" / f"{iteration_name(i)}.jsonl"


def seed_pairs_path(run):
    return Path(run) / "seed" / "pairs.jsonl"


def val_pairs_path(run):
    """Held-out human pairs, never trained on (reward accuracy, the drift guard); images beside them."""
    return Path(run) / "val" / "pairs.jsonl"


def pool_paths(run):
    return sorted((Path(run) / "pools").glob(f"{ITERATION_PREFIX}*.jsonl"))


def iteration_checkpoints(run):
    """The finished checkpoints of a run's iterations, in order."""
    return sorted(p for p in Path(run).glob(f"{ITERATION_PREFIX}*/ckpt") if (p / "sail.json").is_file())


def iteration_number(name):
    """iter_XX -> XX; None for any other name."""
    match = re.fullmatch(rf"{ITERATION_PREFIX}(\d+)", name)
    return int(match.group(1)) if match else None


PAIR_FIELDS = ("prompt", "image_w", "image_l", "source")


PAIR_TYPES = {"prompt": str, "image_w": str, "image_l": str, "source": str, "p": (int, float),
              "reward_w": (int, float), "reward_l": (int, float), "prompt_id": str}


def read_pairs(path, check_images=True):
    """Read a pair file. Image paths are relative to the file's folder; the returned rows carry
    absolute paths in `_image_w`/`_image_l`. Every problem names the file and line."""
    path = Path(path)
    rows = read_jsonl(path, required=PAIR_FIELDS, types=PAIR_TYPES)
    if not rows:
        raise SailError(f"{path}: no pairs in file")
    for row in rows:
        where = f"{path}:{row['_line']}"
        if row["source"] not in ("human", "self"):
            raise SailError(f"{where}: source must be 'human' or 'self', got '{row['source']}'")
        if row["image_w"] == row["image_l"]:
            raise SailError(f"{where}: image_w and image_l are the same file ({row['image_w']})")
        for side in ("image_w", "image_l"):
            full = (path.parent / row[side]).resolve()
            if check_images and not full.is_file():
                raise SailError(f"{where}: image not found: {full}")
            row["_" + side] = full
    return rows


def relative_to(target, folder):
    """Path of target relative to folder, for portable JSONL files."""
    return os.path.relpath(Path(target).resolve(), Path(folder).resolve())


def read_prompts(path):
    """A prompt pool: {"prompt_id": str, "prompt": str} per line, ids and prompts unique."""
    path = Path(path)
    rows = read_jsonl(path, required=("prompt_id", "prompt"), types={"prompt_id": str, "prompt": str})
    if not rows:
        raise SailError(f"{path}: empty prompt file")
    seen_ids, seen_prompts = {}, {}
    for row in rows:
        where = f"{path}:{row['_line']}"
        if not row["prompt"].strip():
            raise SailError(f"{where}: empty prompt")
        if row["prompt_id"] in seen_ids:
            raise SailError(f"{where}: duplicate prompt_id '{row['prompt_id']}' (first on line {seen_ids[row['prompt_id']]})")
        if row["prompt"] in seen_prompts:
            raise SailError(f"{where}: duplicate prompt (first on line {seen_prompts[row['prompt']]}): {row['prompt'][:80]!r}")
        seen_ids[row["prompt_id"]] = seen_prompts[row["prompt"]] = row["_line"]
    return rows


def normalise_prompt(text):
    return " ".join(text.lower().split())


def check_pools_disjoint(run_dir):
    """Pools of different iterations must share no prompt with each other, with the seed pairs, or
    with the evaluation prompts of the run (eval/prompts.jsonl). Raises naming the overlap."""
    run_dir = Path(run_dir)
    sets = {}
    for pool in pool_paths(run_dir):
        sets[str(pool)] = {normalise_prompt(r["prompt"]) for r in read_prompts(pool)}
    seed = seed_pairs_path(run_dir)
    if seed.is_file():
        sets[str(seed)] = {normalise_prompt(r["prompt"]) for r in read_jsonl(seed, required=("prompt",))}
    evals = run_dir / "eval" / "prompts.jsonl"
    if evals.is_file():
        sets[str(evals)] = {normalise_prompt(r["prompt"]) for r in read_prompts(evals)}
    names = list(sets)
    pools = {name for name in names if Path(name).parent.name == "pools"}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a not in pools and b not in pools:
                continue  # seed and eval prompts are the data importer's business
            common = sets[a] & sets[b]
            if common:
                example = sorted(common)[:3]
                raise SailError(f"prompt sets overlap: {a} and {b} share {len(common)} prompt(s), e.g. {example}")
    return sets


def check_free_space(folder, need_bytes, what):
    """Stop before starting work whose outputs would not fit on the disk."""
    folder = Path(folder)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise SailError(f"not enough disk space in {folder} for {what}: about {need_bytes / 2**30:.1f} GiB needed, "
                        f"{free / 2**30:.1f} GiB free")


@contextlib.contextmanager
def folder_lock(folder, stage, wait=False):
    """Refuse a second stage writing into the same folder at once (with wait=True, wait for it
    instead). The lock is the kernel's (flock on <folder>/.lock), not the file's existence: it ends
    with its process, killed or not, so there is no stale lock that two processes could take over."""
    if os.environ.get("RANK", "0") != "0":  # only the main process of a multi-process launch locks
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read_text().strip() or "a process starting this instant"
            raise SailError(f"{folder} is locked by another stage ({holder}); wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()} {stage}".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def write_text_atomic(path, text):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
