"""The DPO maths of the kit: the DiffusionDPO loss, one training micro-batch, the implicit reward
of SAIL (Eq. 8) over random draws, and the optimizers; written from the paper and checked against
DiffusionDPO's train.py (tests/test_parity_train.py).

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
from typing import NamedTuple

import torch
import torch.nn.functional as F

import sail_common as sc


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


def implicit_reward(model_err, ref_err, beta=5000.0):
    """Eq. 8: r = -beta/2 * (e_theta - e_ref), per image (any shape of errors)."""
    return -0.5 * beta * (model_err - ref_err)


def dpo_loss(model_pred, ref_pred, target, beta=5000.0):
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
    conditioning of the B prompts (sc.encode_prompts). ref_unet runs without gradients; with
    lora_reference it is the trained UNet itself, with its adapter switched off."""
    noise, t = noise.repeat(2, *([1] * (noise.ndim - 1))), t.repeat(2)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    target = sc.prediction_target(noise_scheduler, latents, noise, t)
    cond = {k: torch.cat([v, v]) for k, v in cond.items()}
    with torch.no_grad(), adapters_off(ref_unet) if lora_reference else contextlib.nullcontext():
        ref_pred = sc.unet_call(ref_unet, noisy.to(ref_dtype), t, {k: v.to(ref_dtype) for k, v in cond.items()}, resolution)
    model_pred = sc.unet_call(unet, noisy, t, {k: v.float() for k, v in cond.items()}, resolution)
    return dpo_loss(model_pred, ref_pred, target, beta)


@torch.no_grad()
def self_rewards(unet, ref_unet, scheduler, latents, cond, resolution, draws=10, beta=5000.0, seed=0,
                 common_draws=True, batch_size=64):
    """The implicit reward of Eq. 8 for N images of ONE prompt, averaged over `draws` random
    (t, noise) draws: r = -beta/2 * mean_k (e_theta - e_ref). With common_draws, every image uses
    the same K draws (common random numbers: the comparison between images is what matters, and
    sharing the draws removes most of its variance). `cond` is the prompt's conditioning (batch 1);
    `scheduler` is the model's, whatever its class: the draws noise with its DDPM forward process.
    Returns (reward, standard error over the draws), each a float64 tensor of shape (N,)."""
    n_images, k = latents.shape[0], draws
    scheduler = sc.forward_process(scheduler)
    gen = torch.Generator().manual_seed(seed)
    n_timesteps = scheduler.config.num_train_timesteps
    shape = latents.shape[1:]
    if common_draws:
        t = torch.randint(0, n_timesteps, (k,), generator=gen).repeat(n_images)
        noise = torch.randn((k, *shape), generator=gen).repeat(n_images, 1, 1, 1)
    else:
        t = torch.randint(0, n_timesteps, (n_images * k,), generator=gen)
        noise = torch.randn((n_images * k, *shape), generator=gen)
    device = latents.device
    x0 = latents.repeat_interleave(k, dim=0)
    noise, t = noise.to(device=device, dtype=latents.dtype), t.to(device)
    diffs = []
    for start in range(0, n_images * k, batch_size):
        sl = slice(start, start + batch_size)
        noisy = scheduler.add_noise(x0[sl], noise[sl], t[sl])
        target = sc.prediction_target(scheduler, x0[sl], noise[sl], t[sl])
        c = {name: v.expand(noisy.shape[0], *v.shape[1:]) for name, v in cond.items()}
        err = per_sample_error(sc.unet_call(unet, noisy, t[sl], c, resolution), target)
        ref_err = per_sample_error(sc.unet_call(ref_unet, noisy, t[sl], c, resolution), target)
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
    if name == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, weight_decay=weight_decay, clip_threshold=1.0,
                         scale_parameter=False, relative_step=False, warmup_init=False)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
