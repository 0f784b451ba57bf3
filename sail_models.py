"""Models of the kit: presets, device and precision, kit-built models (tiny ones of the released
architectures; the toy base named by folder), what a --model value names (`describe_model`),
loading, saving and exporting checkpoints with the rule that SDXL's VAE encodes in float32, and
the one generation loop (`draw_images`) that 01, 05 and the toy share.
"""
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from run_files import SailError, progress, relative_to, write_json_atomic

warnings.filterwarnings("ignore", category=FutureWarning)
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
CACHE_DIR = Path(os.environ.get("SAIL_CACHE", Path.home() / ".cache" / "sail-kit"))
TOY_BASE_NAME = "toy-base-v1"  # the toy world's base model, CACHE_DIR/TOY_BASE_NAME, made by toy_base.py


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
    # The CPU toy world (toy_world.py, toy.py): a briefly pretrained small model of the SD1.5 architecture.
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


def model_setting(spec, folder):
    """A model as a recorded setting: a path relative to `folder` where it is a folder (so a moved run
    folder still matches), else its name (a preset or hub id)."""
    return relative_to(spec, folder) if Path(spec).exists() else str(spec)


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


def tiny_model_dir(arch):
    """Where the tiny model of `arch` is cached: named by a hash of its configs, so a change builds anew."""
    import model_configs
    config = json.dumps(model_configs.tiny_configs(arch, 0), sort_keys=True, default=str)
    return CACHE_DIR / f"tiny-{arch}-{hashlib.sha1(config.encode()).hexdigest()[:8]}"


def resolve_model_path(model):
    """A preset's model name -> something from_pretrained accepts. Kit-built models are made
    (deterministically) on first use under $SAIL_CACHE."""
    if model in ("tiny:sd15", "tiny:sdxl"):
        path = tiny_model_dir(model.split(":")[1])
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


@dataclass(frozen=True)
class ModelDescription:
    """What a --model value names. base_model: the base as named (preset model, hub id or path),
    which checkpoints record so that a run folder moved to another machine still finds kit-built and
    hub models; base_path: what from_pretrained loads; unet: the checkpoint's UNet folder, or None
    for the base's own; ckpt: the checkpoint folder, or None."""
    base_model: str
    base_path: str
    arch: str
    unet: str = None
    preset: str = None
    iteration: int = None
    ckpt: str = None


def describe_model(spec):
    """A --model value (preset name, checkpoint folder or pipeline path) -> ModelDescription."""
    path = Path(spec)
    if (path / "sail.json").is_file():
        info = read_checkpoint_info(path)
        return ModelDescription(info["base_model"], resolve_model_path(info["base_model"]), info["arch"],
                                unet=str(path / "unet"), preset=info.get("preset"), iteration=info.get("iteration"),
                                ckpt=str(path))
    if spec in PRESETS:
        preset = get_preset(spec)
        return ModelDescription(preset["model"], resolve_model_path(preset["model"]), preset["arch"], preset=spec)
    if path.exists() and not (path / "model_index.json").is_file():
        raise SailError(f"{path} is neither a SAIL checkpoint (sail.json) nor a diffusers pipeline (model_index.json)")
    base = resolve_model_path(spec)
    return ModelDescription(spec, base, "sdxl" if _is_sdxl(base) else "sd15")


def _is_sdxl(model_path):
    index = Path(model_path) / "model_index.json"
    if index.is_file():
        return "text_encoder_2" in json.loads(index.read_text())
    return "xl" in model_path.lower()


def load_unet(desc, dtype=torch.float32):
    from diffusers import UNet2DConditionModel
    try:
        if desc.unet:
            return UNet2DConditionModel.from_pretrained(desc.unet, torch_dtype=dtype)
        return UNet2DConditionModel.from_pretrained(desc.base_path, subfolder="unet", torch_dtype=dtype)
    except (OSError, ValueError) as err:
        raise SailError(f"cannot load the UNet of {desc.unet or desc.base_path}: {err}") from None


def load_pipeline(desc, device, dtype, sampler=None, encoding=False):
    """The diffusers pipeline of the base model with the checkpoint's UNet swapped in. With
    encoding=True (the VAE encodes images for a loss or a reward) SDXL's VAE runs in float32: it
    overflows in half precision (its config sets force_upcast; the pipeline upcasts only to decode)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()
    cls = StableDiffusionXLPipeline if desc.arch == "sdxl" else StableDiffusionPipeline
    extra = {} if desc.arch == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = cls.from_pretrained(desc.base_path, unet=load_unet(desc, dtype), torch_dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise SailError(f"cannot load model {desc.base_path}: {err}") from None
    if encoding and desc.arch == "sdxl":
        pipe.vae.to(torch.float32)
    if sampler:
        use_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def use_sampler(pipe, sampler):
    """Swap in the preset's sampler ("ddpm" or "ddim"), made from the folder's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler
    pipe.scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler].from_config(pipe.scheduler.config)


def add_speed_flags(parser, training=False):
    """The flags that only pay on a GPU; outputs equal the plain path's up to round-off. Fused q/k/v
    projections replace the trained layers with new ones, so training offers the other two."""
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (pays on a GPU after a warm-up)")
    if not training:
        parser.add_argument("--fuse-qkv", action="store_true", help="fused q/k/v attention projections (inference)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format for the UNet")


def speed_up(unet, compile=False, fuse_qkv=False, channels_last=False):
    """The UNet with the speed options asked for (tests/test_speed_options.py: same outputs up to round-off).
    Compiled in place (nn.Module.compile): same class, same state-dict names, so saving and resuming
    do not change."""
    if fuse_qkv:
        unet.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile:
        unet.compile()
    return unet


def draw_images(pipe, prompts, seeds, steps, cfg, resolution, batch_size, label="generate"):
    """The kit's one generation loop (01, 05 and the toy): one image per (prompt, seed), drawn in
    batches of batch_size; yields (index of the batch's first image, its PIL images). Each image has
    its own generator seeded with its seed, so it does not depend on which other images share its
    batch (up to round-off)."""
    bar = progress(total=len(prompts), desc=label)
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start:start + batch_size]]
        with torch.inference_mode():
            images = pipe(prompt=list(prompts[start:start + batch_size]), generator=generators, num_inference_steps=steps,
                          guidance_scale=cfg, height=resolution, width=resolution).images
        bar.update(len(images))
        yield start, images
    bar.close()


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
