"""What the SAIL stages share: presets and model loading, device/dtype/seed, JSONL and
pair files, images, prompt pools, checkpoints, logging and run-folder locks.

Nothing here runs on its own except `python sail_common.py check-pools RUN_DIR`, which
refuses (exit 2) when the prompt pools of a run overlap each other or the seed prompts.
"""
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger("sail")
warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
CACHE_DIR = Path(os.environ.get("SAIL_CACHE", Path.home() / ".cache" / "sail-kit"))
TOY_BASE_NAME = "toy-base-v1"  # the toy world's base model, CACHE_DIR/TOY_BASE_NAME, made by toy_base.py


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


# ---------------------------------------------------------------- presets
# Generation and training defaults follow the paper (section 5.1); `model` is a hub id, a local
# folder, or a kit-built model ("tiny:sd15", "tiny:sdxl", "toy"). SAIL_SD15_PATH / SAIL_SDXL_PATH
# point the real presets at a local copy of the weights.
PRESETS = {
    "sd15": dict(model=os.environ.get("SAIL_SD15_PATH", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                 arch="sd15", resolution=512, sampler="ddpm", steps=50, cfg=7.5, optimizer="adamw",
                 mixed_precision="bf16", gen_batch=16, reward_batch=32, micro_batch=8, batch_size=128, epochs=1),
    "sdxl": dict(model=os.environ.get("SAIL_SDXL_PATH", "stabilityai/stable-diffusion-xl-base-1.0"),
                 arch="sdxl", resolution=1024, sampler="ddim", steps=20, cfg=5.0, optimizer="adafactor",
                 mixed_precision="bf16", gen_batch=8, reward_batch=16, micro_batch=2, batch_size=128, epochs=1,
                 gradient_checkpointing=True),  # as DiffusionDPO's SDXL training
    # tiny-*: the plumbing on random weights; lr 1e-4 so that two steps move the self-reward above
    # round-off (ties give no pair)
    "tiny-sd15": dict(model="tiny:sd15", arch="sd15", resolution=32, sampler="ddim", steps=4, cfg=3.0,
                      optimizer="adamw", mixed_precision="no", gen_batch=16, reward_batch=32, micro_batch=4,
                      max_steps=2, batch_size=8, lr=1e-4),
    "tiny-sdxl": dict(model="tiny:sdxl", arch="sdxl", resolution=32, sampler="ddim", steps=4, cfg=3.0,
                      optimizer="adafactor", mixed_precision="no", gen_batch=16, reward_batch=32, micro_batch=4,
                      max_steps=2, batch_size=8, lr=1e-4),
    # The CPU toy world (toy_world.py): a briefly pretrained small model of the SD1.5 architecture.
    "toy": dict(model="toy", arch="sd15", resolution=32, sampler="ddim", steps=20, cfg=1.0, flip=False,
                optimizer="adamw", mixed_precision="no", gen_batch=64, reward_batch=160, micro_batch=32,
                lr=1e-6, batch_size=32, max_steps=300),
}


def get_preset(name):
    if name not in PRESETS:
        raise SailError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def fill_defaults(args, preset, names):
    """Set each args.<name> that is None from the preset (argparse defaults stay None for these)."""
    for name in names:
        if getattr(args, name, None) is None and name in preset:
            setattr(args, name, preset[name])
    return args


# ---------------------------------------------------------------- device, dtype, seeds
def pick_device(name=None):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def process_state():
    """accelerate's view of this process (rank, world size, device). Under torchrun or
    `accelerate launch` on a machine without CUDA, the processes talk over gloo."""
    from accelerate import PartialState
    return PartialState(cpu=not torch.cuda.is_available())


def torch_dtype(name):
    table = {"no": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise SailError(f"unknown precision '{name}'; choose one of: {', '.join(table)}")
    return table[name]


def inference_dtype(device, mixed_precision):
    """Frozen models run in half precision on a GPU, in float32 on the CPU."""
    return torch.float32 if device.type == "cpu" else torch_dtype(mixed_precision if mixed_precision != "no" else "fp32")


def derive_seed(*parts):
    """A stable 63-bit seed from any parts, e.g. (run seed, prompt_id, sample index)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ---------------------------------------------------------------- logging and args
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


def save_args(out_dir, stage, args, **extra):
    """Write <out_dir>/<stage>.args.json: the arguments and where the stage ran."""
    info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    info.update(extra, _host=socket.gethostname(), _time=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json_atomic(Path(out_dir) / f"{stage}.args.json", info)


def save_timing(out_dir, stage, count, unit, seconds):
    """Write <out_dir>/<stage>.timing.json: the work done after the models were loaded, its time and
    rate, and the process's peak memory (GPU where there is one, else resident RAM)."""
    info = dict(count=count, unit=unit, seconds=round(seconds, 3), rate=round(count / max(seconds, 1e-9), 4))
    if torch.cuda.is_available():
        info["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    info["peak_ram_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    write_json_atomic(Path(out_dir) / f"{stage}.timing.json", info)
    return info


def model_setting(spec, folder):
    """A model as a recorded setting: a path relative to `folder` where it is a folder (so a moved run
    folder still matches), else its name (a preset or hub id)."""
    return relative_to(spec, folder) if Path(spec).exists() else str(spec)


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


def progress(iterable=None, **kwargs):
    """A tqdm progress bar on a terminal, silent in logs and tests."""
    from tqdm.auto import tqdm
    kwargs.setdefault("disable", not sys.stderr.isatty())
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


# ---------------------------------------------------------------- atomic files, JSONL
def write_json_atomic(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
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


# ---------------------------------------------------------------- images
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


# ---------------------------------------------------------------- the run folder
# The on-disk contract between the stages: the only place in the code that spells its names
# (run_all.sh states the pool file's name once more).
ITERATION_PREFIX = "iter_"


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


def pool_paths(run):
    return sorted((Path(run) / "pools").glob(f"{ITERATION_PREFIX}*.jsonl"))


def iteration_checkpoints(run):
    """The finished checkpoints of a run's iterations, in order."""
    return sorted(p for p in Path(run).glob(f"{ITERATION_PREFIX}*/ckpt") if (p / "sail.json").is_file())


def iteration_number(name):
    """iter_XX -> XX; None for any other name."""
    match = re.fullmatch(rf"{ITERATION_PREFIX}(\d+)", name)
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------- pairs and prompts
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


# ---------------------------------------------------------------- run-folder lock
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


# ---------------------------------------------------------------- tiny models (tests, CPU runs)
def write_byte_tokenizer(folder):
    """A CLIP byte-level BPE vocabulary with no merges: every byte is a token."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for c in cs]
    vocab = {}
    for ch in chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab[ch] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def build_tiny_pipeline(arch, out_dir, seed=0):
    """Save a randomly initialised pipeline of the released SD1.5 or SDXL (model_configs.py), small
    enough for a CPU, to out_dir (diffusers layout): only widths, depths and the vocabulary shrink;
    scheduler, activations, VAE scaling factor, token ids and time-id layout are the released ones.
    Same seed, same weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    import model_configs

    if arch not in model_configs.SCHEDULERS:
        raise SailError(f"unknown architecture '{arch}' (sd15 or sdxl)")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")  # several processes may build it at once
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    vocab_size = write_byte_tokenizer(tmp / "_tok")
    cfg = model_configs.tiny_configs(arch, vocab_size)
    tokenizers = [CLIPTokenizer(str(tmp / "_tok" / "vocab.json"), str(tmp / "_tok" / "merges.txt"), **t)
                  for t in cfg["tokenizers"]]
    parts = dict(vae=diffusers.AutoencoderKL(**cfg["vae"]), unet=diffusers.UNet2DConditionModel(**cfg["unet"]),
                 scheduler=getattr(diffusers, cfg["scheduler"]["_class_name"]).from_config(cfg["scheduler"]),
                 text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["text"][0])), tokenizer=tokenizers[0])
    if arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text"][1])),
                                                   tokenizer_2=tokenizers[1], **parts)
    else:
        pipe = diffusers.StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                                                 **parts)
    pipe.save_pretrained(tmp)
    shutil.rmtree(tmp / "_tok")
    if out_dir.exists() and not (out_dir / "model_index.json").is_file():
        shutil.rmtree(out_dir)  # a broken earlier build
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished the same (deterministic) build first
        if not (out_dir / "model_index.json").is_file():
            raise
        shutil.rmtree(tmp)
    return out_dir


def resolve_model_path(model):
    """A preset's model name -> something from_pretrained accepts. Kit-built models are made
    (deterministically) on first use under $SAIL_CACHE."""
    if model in ("tiny:sd15", "tiny:sdxl"):
        path = CACHE_DIR / model.replace(":", "-")
        if not (path / "model_index.json").is_file():
            build_tiny_pipeline(model.split(":")[1], path)
        return str(path)
    if model == "toy":  # built by toy_base.py, which the core does not import (it needs the toy world)
        path = CACHE_DIR / TOY_BASE_NAME
        if not (path / "model_index.json").is_file():
            raise SailError(f"the toy base model is not built yet ({path}): run `python toy_base.py` once (about 4 "
                            f"minutes on 2 cores); `bash run_all.sh toy 2` does it first")
        return str(path)
    if model.startswith((".", "/", "~")) or Path(model).exists():  # a local folder, not a hub id
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise SailError(f"model path {path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    return model  # a hub id; from_pretrained downloads or uses its cache


# ---------------------------------------------------------------- checkpoints
def read_checkpoint_info(ckpt):
    ckpt = Path(ckpt)
    info_path = ckpt / "sail.json"
    if not info_path.is_file() or not (ckpt / "unet" / "config.json").is_file():
        raise SailError(f"{ckpt} is not a finished SAIL checkpoint (needs sail.json and unet/)")
    try:
        return json.loads(info_path.read_text())
    except json.JSONDecodeError as err:
        raise SailError(f"{info_path}: malformed JSON ({err.msg})") from None


def describe_model(spec):
    """A --model value (preset name, checkpoint folder or pipeline path) -> dict(base_model=<as
    named: preset model, hub id or path>, base_path=<what from_pretrained loads>, arch, unet=<folder
    or None>, preset, iteration, ckpt). Checkpoints record the base model as named, so a run
    folder that moves to another machine still finds kit-built and hub models."""
    path = Path(spec)
    if (path / "sail.json").is_file():
        info = read_checkpoint_info(path)
        return dict(base_model=info["base_model"], base_path=resolve_model_path(info["base_model"]), arch=info["arch"],
                    unet=str(path / "unet"), preset=info.get("preset"), iteration=info.get("iteration"), ckpt=str(path))
    if spec in PRESETS:
        preset = get_preset(spec)
        return dict(base_model=preset["model"], base_path=resolve_model_path(preset["model"]), arch=preset["arch"],
                    unet=None, preset=spec, iteration=None, ckpt=None)
    if path.exists() and not (path / "model_index.json").is_file():
        raise SailError(f"{path} is neither a SAIL checkpoint (sail.json) nor a diffusers pipeline (model_index.json)")
    base = resolve_model_path(spec)
    arch = "sdxl" if _is_sdxl(base) else "sd15"
    return dict(base_model=spec, base_path=base, arch=arch, unet=None, preset=None, iteration=None, ckpt=None)


def _is_sdxl(model_path):
    index = Path(model_path) / "model_index.json"
    if index.is_file():
        return "text_encoder_2" in json.loads(index.read_text())
    return "xl" in model_path.lower()


def load_unet(desc, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    try:
        if desc["unet"]:
            return UNet2DConditionModel.from_pretrained(desc["unet"], torch_dtype=dtype)
        return UNet2DConditionModel.from_pretrained(desc["base_path"], subfolder="unet", torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise SailError(f"cannot load the UNet of {desc['unet'] or desc['base_path']}: {err}") from None


def load_pipeline(desc, device, dtype, sampler=None):
    """The diffusers pipeline of the base model with the checkpoint's UNet swapped in."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()
    cls = StableDiffusionXLPipeline if desc["arch"] == "sdxl" else StableDiffusionPipeline
    extra = {} if desc["arch"] == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(desc["base_path"], unet=load_unet(desc, dtype), torch_dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise SailError(f"cannot load model {desc['base_path']}: {err}") from None
    if sampler:
        sched_cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler]
        pipe.scheduler = sched_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def save_checkpoint(unet, ckpt, info):
    """Write ckpt/unet (diffusers safetensors) and ckpt/sail.json under a temporary name, then
    rename, so a checkpoint folder that exists is always complete."""
    ckpt = Path(ckpt)
    if ckpt.exists():
        raise SailError(f"{ckpt} exists already; not overwriting it")
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    write_json_atomic(tmp / "sail.json", info)
    os.replace(tmp, ckpt)


def export_pipeline(ckpt, out_dir):
    """A full pipeline folder that plain `DiffusionPipeline.from_pretrained(out_dir)` loads."""
    desc = describe_model(ckpt)
    pipe = load_pipeline(desc, torch.device("cpu"), torch.float32)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")  # several processes may build it at once
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, out_dir)
    return out_dir


# ---------------------------------------------------------------- text conditioning and UNet calls
@torch.no_grad()
def encode_prompts(pipe, prompts, device):
    """Text conditioning for a list of prompts, without guidance: a dict that unet_call takes."""
    if hasattr(pipe, "text_encoder_2"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"embeds": embeds, "pooled": pooled}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"embeds": embeds}


def unet_call(unet, latents, timesteps, cond, resolution):
    """The UNet's noise prediction; SDXL also takes pooled text embeddings and size/crop ids."""
    kwargs = {}
    if "pooled" in cond:
        ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=latents.device,
                           dtype=cond["pooled"].dtype)
        kwargs["added_cond_kwargs"] = {"text_embeds": cond["pooled"], "time_ids": ids.repeat(latents.shape[0], 1)}
    return unet(latents, timesteps, encoder_hidden_states=cond["embeds"], **kwargs).sample


def prediction_target(scheduler, latents, noise, timesteps):
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def forward_process(scheduler):
    """The noising used by every loss and reward: DDPM's forward process, sqrt(abar_t) x0 +
    sqrt(1 - abar_t) eps, built from the model's scheduler config whatever sampler the folder ships.
    (SDXL ships EulerDiscreteScheduler, whose add_noise is x0 + sigma_t eps: the sampler's scaling,
    not the training distribution. DiffusionDPO and the diffusers scripts noise with DDPM too.)"""
    from diffusers import DDPMScheduler
    if type(scheduler) is DDPMScheduler:
        return scheduler
    return DDPMScheduler.from_config(scheduler.config)


@torch.no_grad()
def encode_images(vae, images, device, sample_generator=None):
    """PIL images -> scaled VAE latents (the posterior mean, or a sample with a generator)."""
    # torchvision's ToTensor then Normalize(0.5, 0.5), as DiffusionDPO, to the last bit
    arr = np.stack([(np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5 for img in images])
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device=device, dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latents = dist.sample(sample_generator) if sample_generator is not None else dist.mean
    return latents * vae.config.scaling_factor


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "check-pools":
        try:
            sets = check_pools_disjoint(sys.argv[2])
        except SailError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        print(f"prompt sets disjoint: {', '.join(f'{Path(k).name} ({len(v)})' for k, v in sets.items())}")
    else:
        print(__doc__)
        sys.exit(1)


if __name__ == "__main__":
    main()
