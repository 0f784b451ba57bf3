"""Tiny models of the released SD1.5 and SDXL for tests and CPU runs: the released configs
(sail/configs.py) with only widths, depths and the vocabulary shrunk, built offline and cached.
"""
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from sail.common import CACHE_DIR, SailError


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
    """Save a randomly initialised pipeline of the released SD1.5 or SDXL (configs.py), small
    enough for a CPU, to out_dir (diffusers layout): only widths, depths and the vocabulary shrink;
    scheduler, activations, VAE scaling factor, token ids and time-id layout are the released ones.
    Same seed, same weights."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sail import configs

    if arch not in configs.SCHEDULERS:
        raise SailError(f"unknown architecture '{arch}' (sd15 or sdxl)")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp{os.getpid()}")  # several processes may build it at once
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    vocab_size = write_byte_tokenizer(tmp / "_tok")
    cfg = configs.tiny_configs(arch, vocab_size)
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
    from sail import configs
    config = json.dumps(configs.tiny_configs(arch, 0), sort_keys=True, default=str)
    return CACHE_DIR / f"tiny-{arch}-{hashlib.sha1(config.encode()).hexdigest()[:8]}"
