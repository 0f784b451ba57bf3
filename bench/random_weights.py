"""The released SD1.5 and SDXL architectures (sail/configs.py) with random weights, as a pipeline folder
that the stages load like any other: the real models' work with no download. `python -m bench.speed
--random-weights` uses them.
"""
import copy
import tempfile
from pathlib import Path

import torch

from sail import configs, tiny

architecture = configs.released_configs  # arch -> configs; the tests swap in smaller ones


def full_size_models(arch):
    """UNet, VAE and text encoder(s) of the released architecture, randomly initialised where
    torch puts new tensors (a `with torch.device(...)` block, or accelerate.init_empty_weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = architecture(arch)
    encoders = [(CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**text))  # SDXL's second projects
                for i, text in enumerate(cfg["text"])]
    return UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"]), encoders


def random_weights_pipeline(arch, device, dtype, sampler):
    """A pipeline of the released architecture with random weights, made on the device, and a
    float32 copy of its UNet to train; the tokenizer is the kit's byte-level one (its
    <|endoftext|> is the highest id, as in CLIP's vocabulary, where the text encoders pool)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as folder:
        tiny.write_byte_tokenizer(Path(folder))
        tokenizers = [CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", **t)
                      for t in configs.TOKENIZERS[arch]]
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, encoders = full_size_models(arch)
    scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler].from_config(configs.SCHEDULERS[arch])
    frozen = dict(vae=vae.to(dtype), unet=copy.deepcopy(unet).to(dtype), tokenizer=tokenizers[0], scheduler=scheduler)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder=encoders[0].to(dtype), text_encoder_2=encoders[1].to(dtype),
                                         tokenizer_2=tokenizers[1], **frozen)
    else:
        pipe = StableDiffusionPipeline(text_encoder=encoders[0].to(dtype), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **frozen)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet


def write_random_pipeline(arch, folder, device, dtype, sampler):
    """The released architecture with random weights, saved as a diffusers pipeline folder (written
    under a temporary name, then renamed)."""
    folder = Path(folder)
    pipe, _ = random_weights_pipeline(arch, device, dtype, sampler)
    tmp = folder.with_name(folder.name + ".tmp")
    pipe.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(folder)
    return str(folder)

