"""The DPO maths of the kit: DiffusionDPO's per-image training transform, prompt conditioning and
the UNet call, DDPM noising, the DiffusionDPO loss, one training micro-batch (`dpo_micro_batch`,
which 04_train.py and bench.py both run), the implicit reward of SAIL (Eq. 8) over random draws,
and the optimizers; written from the paper and checked against DiffusionDPO's train.py
(tests/test_parity_train.py).

With e_m(x) the mean squared error of model m's prediction over the latent's elements, for the
same timestep t and noise on both images of a pair (Eq. 3 with Eq. 8/9 of the SAIL paper):

    inside = -beta/2 * [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))]
    loss   = -log sigmoid(inside)

averaged over the batch; the implicit reward of one image is r = -beta/2 * (e_theta - e_ref).
Default beta = 5000, the value of the official DiffusionDPO training script and of the paper.
The diffusers research script for SD1.5 writes `-logsigmoid(beta_dpo * (ref_diff - model_diff))`
without the 1/2, so its `beta_dpo` is half of this beta (its 2500 equals our 5000).
"""
import contextlib
import math
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from run_files import SailError, load_image
from sail_models import derive_seed

BETA = 5000.0  # the paper's and DiffusionDPO's beta (see above)


# ---------------------------------------------------------------- DiffusionDPO's per-image training transform
def load_pair_pixels(row, resolution, seed, random_crop, flip):
    """Both images of a pair, each transformed on its own as DiffusionDPO's training transform does
    (torchvision Resize on the short side, bilinear; CenterCrop or RandomCrop; RandomHorizontalFlip):
    images of one pair may differ in size and aspect ratio (Pick-a-Pic pairs come from different models)."""
    rng = random.Random(derive_seed(seed, "augment", row["_index"]))
    out = []
    for side in ("_image_w", "_image_l"):
        img = load_image(row[side], where=f"{row['_file']}:{row['_line']}")
        img = resize_short_side(img, resolution)
        w, h = img.size
        if random_crop:
            left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
        else:  # torchvision's CenterCrop rounds, it does not floor
            left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(img.transpose(Image.FLIP_LEFT_RIGHT) if flip and rng.random() < 0.5 else img)
    return out


def resize_short_side(img, size):
    """torchvision's Resize(size) on a PIL image: short side to size, long side truncated, PIL bilinear
    (antialiased). Written out so the kit does not need torchvision for this one call."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


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



class DPOOutput(NamedTuple):
    loss: torch.Tensor            # scalar, what to backpropagate
    implicit_acc: torch.Tensor    # share of pairs with inside > 0 (ties count as wrong)
    reward_margin: torch.Tensor   # mean of inside = r(w) - r(l)
    model_err_w: torch.Tensor     # mean error of the model on preferred / dispreferred images
    model_err_l: torch.Tensor
    ref_err_w: torch.Tensor
    ref_err_l: torch.Tensor


def per_sample_error(pred, target):
    """Mean squared error over all but the batch dimension, computed in float32."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def implicit_reward(model_err, ref_err, beta=BETA):
    """Eq. 8: r = -beta/2 * (e_theta - e_ref), per image (any shape of errors)."""
    return -0.5 * beta * (model_err - ref_err)


def dpo_loss(model_pred, ref_pred, target, beta=BETA):
    """DiffusionDPO loss. The batch holds all preferred samples first and all dispreferred
    samples second: row i and row i + B/2 are one pair, noised with the same t and noise.
    Returns a DPOOutput whose first item is the loss."""
    if model_pred.shape[0] % 2:
        raise ValueError(f"the batch must hold pairs (even size), got {model_pred.shape[0]}")
    model_err = per_sample_error(model_pred, target)
    with torch.no_grad():
        ref_err = per_sample_error(ref_pred.detach(), target)
    model_w, model_l = model_err.chunk(2)
    ref_w, ref_l = ref_err.chunk(2)
    # the official step's order of operations, (e_w - e_l) - (ref_w - ref_l): at beta/2 = 2500 one
    # float32 ulp of the errors shows in the gradient, so the same order gives the same bits
    inside = -0.5 * beta * ((model_w - model_l) - (ref_w - ref_l))
    loss = -F.logsigmoid(inside).mean()
    return DPOOutput(loss, (inside > 0).float().mean().detach(), inside.mean().detach(),
                     model_w.mean().detach(), model_l.mean().detach(), ref_w.mean(), ref_l.mean())


def dpo_micro_batch(unet, ref_unet, noise_scheduler, latents, noise, t, cond, resolution, beta, ref_dtype=torch.float32,
                    lora_reference=False):
    """DiffusionDPO's loss on one micro-batch of B pairs. latents: (2B, ...) all preferred first, then all
    dispreferred; noise (B, ...) and t (B,): one draw per pair, shared by its two images; cond: the text
    conditioning of the B prompts (encode_prompts). ref_unet runs without gradients; with
    lora_reference it is the trained UNet itself, with its adapter switched off."""
    noise, t = noise.repeat(2, *([1] * (noise.ndim - 1))), t.repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = prediction_target(noise_scheduler, latents, noise, t)
    cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    with torch.no_grad(), adapters_off(ref_unet) if lora_reference else contextlib.nullcontext():
        ref_pred = unet_call(ref_unet, noisy.to(ref_dtype), t, {k: v.to(ref_dtype) for k, v in cond.items()}, resolution)
    model_pred = unet_call(unet, noisy, t, {k: v.float() for k, v in cond.items()}, resolution)
    return dpo_loss(model_pred, ref_pred, target, beta)


DRAW_SCHEMES = ("iid", "stratified", "antithetic", "stratified-antithetic")


def reward_draws(k, shape, n_timesteps, gen, scheme="iid"):
    """K (t, noise) draws. iid: the paper's, t uniform on [0, T) and noise Gaussian, independently.
    stratified: one t in each of K equal strata of [0, T). antithetic: the noise of the second half
    of the draws is minus that of the first (each with its own t, so the timesteps stay as many; an
    odd K keeps one plain draw). stratified-antithetic: both."""
    if scheme not in DRAW_SCHEMES:
        raise ValueError(f"draw scheme {scheme!r}: choose one of {', '.join(DRAW_SCHEMES)}")
    if scheme.startswith("stratified"):
        t = ((torch.arange(k) + torch.rand(k, generator=gen)) * n_timesteps / k).long().clamp(max=n_timesteps - 1)
    else:
        t = torch.randint(0, n_timesteps, (k,), generator=gen)
    if "antithetic" in scheme:
        noise = torch.randn((math.ceil(k / 2), *shape), generator=gen)
        return t, torch.cat([noise, -noise[:k // 2]])
    return t, torch.randn((k, *shape), generator=gen)


@torch.no_grad()
def self_rewards(unet, ref_unet, scheduler, latents, cond, resolution, draws=10, beta=BETA, seed=0,
                 common_draws=True, batch_size=64, scheme="iid"):
    """The implicit reward of Eq. 8 for N images of ONE prompt, averaged over `draws` random
    (t, noise) draws: r = -beta/2 * mean_k (e_theta - e_ref). With common_draws, every image uses
    the same K draws (common random numbers: the comparison between images is what matters, and
    sharing the draws removes most of its variance). `scheme` picks how the draws are made
    (reward_draws; "iid" is the paper's). `cond` is the prompt's conditioning (batch 1);
    `scheduler` is the model's, whatever its class: the draws noise with its DDPM forward process.
    Returns (reward, standard error over the draws), each a float64 tensor of shape (N,)."""
    n_images, k = latents.shape[0], draws
    scheduler = forward_process(scheduler)
    gen = torch.Generator().manual_seed(seed)
    n_timesteps = scheduler.config.num_train_timesteps
    shape = latents.shape[1:]
    if common_draws:
        t, noise = reward_draws(k, shape, n_timesteps, gen, scheme)
        t, noise = t.repeat(n_images), noise.repeat(n_images, 1, 1, 1)
    elif scheme == "iid":  # all t first, then all noise: the draws the kit has always made
        t = torch.randint(0, n_timesteps, (n_images * k,), generator=gen)
        noise = torch.randn((n_images * k, *shape), generator=gen)
    else:
        t, noise = (torch.cat(d) for d in zip(*[reward_draws(k, shape, n_timesteps, gen, scheme) for _ in range(n_images)]))
    device = latents.device
    x0 = latents.repeat_interleave(k, dim=0)
    noise, t = noise.to(device=device, dtype=latents.dtype), t.to(device)
    diffs = []
    for start in range(0, n_images * k, batch_size):
        sl = slice(start, start + batch_size)
        noisy = scheduler.add_noise(x0[sl], noise[sl], t[sl])
        target = prediction_target(scheduler, x0[sl], noise[sl], t[sl])
        c = {name: v.expand(noisy.shape[0], *v.shape[1:]) for name, v in cond.items()}
        err = per_sample_error(unet_call(unet, noisy, t[sl], c, resolution), target)
        ref_err = per_sample_error(unet_call(ref_unet, noisy, t[sl], c, resolution), target)
        diffs.append(implicit_reward(err.double(), ref_err.double(), beta))
    per_draw = torch.cat(diffs).view(n_images, k).cpu()
    se = per_draw.std(dim=1) / math.sqrt(k) if k > 1 else torch.zeros(n_images, dtype=torch.float64)
    return per_draw.mean(dim=1), se


@contextlib.contextmanager
def adapters_off(unet):
    """The LoRA-trained UNet as its own reference: the start model is the UNet without its adapter."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def make_optimizer(name, params, lr, weight_decay):
    """adamw (SD1.5 in the paper), adafactor (SDXL, DiffusionDPO's settings), or bitsandbytes' 8-bit
    AdamW (a quarter of AdamW's state memory; optional)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise SailError("--optimizer adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes") from None
        return bitsandbytes.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
