"""Models of the kit: what a --model value names (`describe_model`: a preset, a checkpoint folder or a
pipeline; a hub model not on this machine stops with how to get it), loading the pipeline and UNet
(and the precision the VAE encodes in), device and precision, the speed options, and checkpoints:
saving them with where they came from, exporting a full pipeline.
"""
import contextlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sail.common import CACHE_DIR, SailError
from sail.files import relative_to, write_json_atomic
from sail.settings import PRESETS, get_preset
from sail.tiny import build_tiny_pipeline, tiny_model_dir

TOY_BASE_NAME = "toy-base-v1"  # the toy world's base model, CACHE_DIR/TOY_BASE_NAME, made by toy/base.py


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


def encoding_vae_dtype(arch, dtype, fp32=None):
    """The precision the VAE encodes training images in, beside frozen models of precision `dtype`:
    float32 with fp32=True or where they run in float32; the frozen models' precision with fp32=False.
    Not given: float32 for SDXL, whose VAE overflows in fp16 (its config sets force_upcast), the frozen
    models' precision for SD1.5. bf16 has float32's exponent range, so --no-vae-fp32 is safe there."""
    if fp32 or dtype == torch.float32 or (fp32 is None and arch == "sdxl"):
        return torch.float32
    return dtype


def model_setting(spec, folder):
    """A model as a recorded setting: a path relative to `folder` where it is a folder (so a moved run
    folder still matches), else its name (a preset or hub id)."""
    return relative_to(spec, folder) if Path(spec).exists() else str(spec)


def resolve_model_path(model):
    """A preset's model name -> something from_pretrained accepts. Kit-built models are made
    (deterministically) on first use under $SAIL_CACHE."""
    if model in ("tiny:sd15", "tiny:sdxl"):
        path = tiny_model_dir(model.split(":")[1])
        if not (path / "model_index.json").is_file():
            build_tiny_pipeline(model.split(":")[1], path)
        return str(path)
    if model == "toy":  # built by toy/base.py, which the core does not import (it needs the toy world)
        path = CACHE_DIR / TOY_BASE_NAME
        if not (path / "model_index.json").is_file():
            raise SailError(f"the toy base model is not built yet ({path}): run `python -m toy.base` once (about 4 "
                            f"minutes on 2 cores); `bash run_all.sh toy 2` does it first")
        return str(path)
    if model.startswith((".", "/", "~")) or Path(model).exists():  # a local folder, not a hub id
        path = Path(model).expanduser()
        if not (path / "model_index.json").is_file():
            raise SailError(f"model path {path} is not a diffusers pipeline folder (no model_index.json)")
        return str(path)
    return hub_model(model)


def hub_model(model):
    """A hub id that from_pretrained can load: in the local Hugging Face cache, or fetched on first
    load. One that is neither stops here with one message saying how to get it, instead of a
    loader's error after its retries."""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError
    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return model
    if constants.HF_HUB_OFFLINE:
        named = next((v for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if os.environ.get(v)), "offline mode")
        raise SailError(missing_model(model, f"{named} is set"))
    try:
        model_info(model, timeout=10)  # one request: an unreachable hub answers at once, without the loader's retries
    except HfHubHTTPError as err:  # the hub answered: no such model, or one that needs a login
        raise SailError(f"{model} is not in the local Hugging Face cache and the hub refuses it ({err}): check the "
                        f"name, or log in with `hf auth login`") from None
    except Exception:  # no network, no name resolution, a proxy: the hub cannot be reached
        raise SailError(missing_model(model, "the hub cannot be reached: offline or no network")) from None
    return model


def missing_model(model, reason):
    """The one line that says a hub model is not on this machine and how to get it."""
    from huggingface_hub import constants
    variable = next((v for name, v in (("sd15", "SAIL_SD15_PATH"), ("sdxl", "SAIL_SDXL_PATH"))
                     if PRESETS[name]["model"] == model), None)
    local = f"point ${variable} at a local copy of it" if variable else "give the folder of a local copy instead"
    return (f"{model} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and cannot be fetched "
            f"({reason}): download it where there is a network with `hf download {model}` (into that cache), or {local}")


@contextlib.contextmanager
def quiet_loading():
    """diffusers passes huggingface_hub an argument it deprecated; its warning says nothing to the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        yield


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
        with quiet_loading():
            if desc.unet:
                return UNet2DConditionModel.from_pretrained(desc.unet, torch_dtype=dtype)
            return UNet2DConditionModel.from_pretrained(desc.base_path, subfolder="unet", torch_dtype=dtype)
    except (OSError, ValueError) as err:
        if not desc.unet and not Path(desc.base_path).exists():
            hub_model(desc.base_path)  # a hub id not on this machine: that message
        raise SailError(f"cannot load the UNet of {desc.unet or desc.base_path}: {err}") from None


def load_pipeline(desc, device, dtype, sampler=None, encoding=False, vae_fp32=None):
    """The diffusers pipeline of the base model with the checkpoint's UNet swapped in. With
    encoding=True (the VAE encodes images for a loss or a reward) the VAE runs in the precision
    encoding_vae_dtype gives (vae_fp32: --vae-fp32 / --no-vae-fp32): float32 for SDXL unless asked
    otherwise, whose VAE overflows in half precision (the pipeline upcasts it only to decode)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.disable_progress_bar()
    cls = StableDiffusionXLPipeline if desc.arch == "sdxl" else StableDiffusionPipeline
    extra = {} if desc.arch == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    unet = load_unet(desc, dtype)
    try:
        with quiet_loading():
            pipe = cls.from_pretrained(desc.base_path, unet=unet, torch_dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        if not Path(desc.base_path).exists():
            hub_model(desc.base_path)
        raise SailError(f"cannot load model {desc.base_path}: {err}") from None
    vae_dtype = encoding_vae_dtype(desc.arch, dtype, vae_fp32) if encoding else dtype
    if pipe.vae.dtype != vae_dtype:
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # its warning about fp32 modules is meant for half precision casts
        try:
            pipe.vae.to(vae_dtype)
        finally:
            diffusers_logging.set_verbosity(verbosity)
    if sampler:
        use_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def use_sampler(pipe, sampler):
    """Swap in the preset's sampler ("ddpm" or "ddim"), made from the folder's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler
    pipe.scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler].from_config(pipe.scheduler.config)


def speed_up(unet, compile=False, fuse_qkv=False, channels_last=False):
    """The UNet with the speed options asked for (--compile, --fuse-qkv, --channels-last: they pay on a GPU;
    tests/stages/test_speed_options.py: same outputs up to round-off). compile=True compiles the whole UNet, compile="regional" only its repeated transformer
    blocks (diffusers' compile_repeated_blocks: one compiled block reused, so a shorter warm-up), both in
    place (nn.Module.compile): same class, same state-dict names, so saving and resuming do not change."""
    if fuse_qkv:
        unet.fuse_qkv_projections()
    if channels_last:
        unet.to(memory_format=torch.channels_last)
    if compile == "regional" and hasattr(unet, "compile_repeated_blocks"):
        unet.compile_repeated_blocks()
    elif compile:
        unet.compile()
    return unet


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
