"""The toy world's base model: the real architectures (AutoencoderKL, CLIPTextModel with a
tokenizer that has one token per word of the world, UNet2DConditionModel, DDIMScheduler) at CPU
size, briefly pretrained on the world's messy "web" pictures, deterministically, and
cached. Brief pretraining on messy data leaves it imperfect, as a base model should be.

Command:
    python -m toy.base            # build (once) and print the cached pipeline folder

Reads:  nothing (the pictures come from toy/world.py's renderer).
Writes: $SAIL_CACHE/toy-base-v1/ (default ~/.cache/sail-kit): a StableDiffusionPipeline folder that
        loads with plain diffusers, with toy_base.json (the build's settings, final loss, seconds).
"""
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sail import common, files, models, tiny
from toy.world import RES, all_captions, render_web

log = logging.getLogger("sail")

TOY_BASE_NAME = models.TOY_BASE_NAME
TEXT_CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                projection_dim=64, max_position_embeddings=77)
VAE_CFG = dict(block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, layers_per_block=1,
               norm_num_groups=8, sample_size=RES, mid_block_add_attention=False)
UNET_CFG = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=RES // 4, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16,
                attention_head_dim=8, cross_attention_dim=64,
                # a pooled text embedding added to the time embedding, besides cross-attention:
                # the caption then reaches every block, and a short pretraining follows it more
                addition_embed_type="text", addition_embed_type_num_heads=4)


def _bpe(word, ranks):
    """CLIP's byte-pair encoding of one lowercase word (the last symbol carries '</w>')."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def write_world_tokenizer(folder):
    """A CLIP tokenizer whose vocabulary is every byte plus one token per word of the world's
    captions (built with BPE merges), so "a small red circle" is five tokens, not fifteen."""
    tiny.write_byte_tokenizer(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    words = sorted({w for c in all_captions() for w in c.split()})
    ranks, merges = {}, []
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:  # join left to right; a new merge never outranks the older ones
            merge = (parts[0], parts[1])
            ranks[merge] = len(merges)
            merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    special = [t for t in ("<|startoftext|>", "<|endoftext|>")]
    for t in special:  # keep the special tokens last, where the text encoder config expects them
        vocab.pop(t)
        vocab[t] = len(vocab)
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    assert all(_bpe(w, ranks) == [w + "</w>"] for w in words)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def _scheduler():
    from diffusers import DDIMScheduler
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def pretraining_set(n, seed):
    """n web pictures and their captions, the same for the same seed."""
    rng = np.random.default_rng(seed)
    images, captions = zip(*(render_web(rng) for _ in range(n)))
    return np.stack(images), list(captions)


def _to_pixels(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_autoencoder(vae, images, steps, seed, batch_size=32, lr=3e-3, kl_weight=1e-4, log_every=100):
    """Fit the autoencoder: reconstruction of a posterior sample plus a light KL term. The log
    variance starts at -4 (std 0.14) rather than 0, so the short fit starts near a plain autoencoder;
    the sampling noise keeps the decoder tolerant of small latent errors, as diffusion needs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.encoder.conv_out.bias[vae.config.latent_channels:] = -4.0
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    vae.train()
    start, running = time.time(), None
    for step in range(steps):
        x = _to_pixels(images[torch.randint(0, len(images), (batch_size,), generator=gen).numpy()])
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x) + kl_weight * dist.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            log.info("toy base: autoencoder step %d/%d  loss %.4f  (%.0f s)", step + 1, steps, running, time.time() - start)
    return vae.eval().requires_grad_(False)


def train_denoiser(unet, text_encoder, latents, ids, empty_id, steps, seed, batch_size=64, lr=2e-3, train_text=True,
                   log_every=100):
    """Epsilon-prediction training on the latents, 20% of the captions replaced by the empty one
    so classifier-free guidance works; the text encoder learns along (or stays frozen)."""
    scheduler = _scheduler()
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    text_encoder.requires_grad_(train_text).train(train_text)
    unet.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * (0.55 + 0.45 * math.cos(math.pi * s / max(steps, 1))))
    start, running = time.time(), None
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        tok = ids[idx].clone()
        tok[torch.rand(batch_size, generator=gen) < 0.2] = empty_id
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        with torch.set_grad_enabled(train_text):
            cond = text_encoder(tok)[0]
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if log_every and (step + 1) % log_every == 0:
            log.info("toy base: denoiser step %d/%d  loss %.4f  (%.0f s)", step + 1, steps, running, time.time() - start)
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return running


def build_toy_base(out_dir, seed=0, n_images=16384, vae_steps=400, unet_steps=500, batch_size=64, lr=2e-3,
                   train_text=True, log_every=100):
    """Pretrain the toy base model and save it as a StableDiffusionPipeline at out_dir (written to a
    temporary folder, then renamed). Same arguments, same weights (fixed seeds, deterministic ops)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    start = time.time()
    try:
        torch.manual_seed(seed)
        vocab_size = write_world_tokenizer(tmp / "_tok")
        tokenizer = CLIPTokenizer(str(tmp / "_tok" / "vocab.json"), str(tmp / "_tok" / "merges.txt"), model_max_length=77)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, bos_token_id=vocab_size - 2,
                                                    eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, **TEXT_CFG))
        vae = AutoencoderKL(**VAE_CFG)
        unet = UNet2DConditionModel(**UNET_CFG)
        images, captions = pretraining_set(n_images, seed)
        log.info("toy base: %d pretraining pictures rendered (%.0f s)", n_images, time.time() - start)
        # 1. the autoencoder: 32x32x3 pixels <-> 8x8x4 latents
        train_autoencoder(vae, images, vae_steps, seed + 1, log_every=log_every)
        with torch.no_grad():
            latents = torch.cat([vae.encode(_to_pixels(images[i:i + 512])).latent_dist.mean for i in range(0, n_images, 512)])
        scale = 1.0 / latents.std().item()
        vae.register_to_config(scaling_factor=scale)
        # 2. the denoiser and the text encoder
        ids = tokenizer(captions + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        loss = train_denoiser(unet, text_encoder, latents * scale, ids[:-1], ids[-1], unet_steps, seed + 2, batch_size, lr,
                              train_text, log_every)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "_tok")
        files.write_json_atomic(tmp / "toy_base.json", dict(
            seed=seed, n_images=n_images, vae_steps=vae_steps, unet_steps=unet_steps, batch_size=batch_size, lr=lr,
            train_text=train_text, final_loss=loss, seconds=round(time.time() - start, 1)))
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
    log.info("toy base: built %s in %.0f s", out_dir, time.time() - start)
    return out_dir


def ensure_toy_base(cache_dir):
    """The toy base model's pipeline folder, cache_dir/toy-base-v1: built on first use (the same
    weights every time), then reused."""
    path = Path(cache_dir) / TOY_BASE_NAME
    if (path / "model_index.json").is_file():
        return path
    log.info("toy base: not in %s yet; pretraining it now (once, deterministic)", path.parent)
    with files.folder_lock(path.parent, "toy-base build", wait=True):
        if not (path / "model_index.json").is_file():  # another process may have built it meanwhile
            build_toy_base(path)
    return path


if __name__ == "__main__":
    common.setup_logging(common.CACHE_DIR, "toy_base")
    print(ensure_toy_base(common.CACHE_DIR))
