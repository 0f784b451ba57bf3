"""The DPO maths of the kit: DiffusionDPO's per-image training transform, prompt conditioning and
the UNet call, DDPM noising, the DiffusionDPO loss, one training micro-batch (`dpo_micro_batch`,
which 04_train.py and bench/speed.py both run), the implicit reward of SAIL (Eq. 8) over random draws,
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
from typing import NamedTuple

import torch
import torch.nn.functional as F

from sail.settings import BETA  # the paper's and DiffusionDPO's beta (see above)


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


@contextlib.contextmanager
def adapters_off(unet):
    """The LoRA-trained UNet as its own reference: the start model is the UNet without its adapter."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
