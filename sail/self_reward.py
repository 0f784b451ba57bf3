"""SAIL's implicit reward (Eq. 8) of N candidate images of one prompt, averaged over K random
(t, noise) draws, with common random numbers across the candidates and optional variance-reducing
draw schemes.

    r(x) = -beta/2 * mean over K draws of ( e_theta(x_t, y, t) - e_ref(x_t, y, t) )

with e_m the mean squared error of model m's noise prediction over the latent's elements.
"""
import math

import torch

from sail.dpo import (
    forward_process,
    implicit_reward,
    per_sample_error,
    prediction_target,
    unet_call,
)
from sail.settings import BETA, DRAW_SCHEMES


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
    elif scheme == "iid":  # one stream for all N x K draws: every timestep, then every noise
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
