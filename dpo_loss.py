"""The DiffusionDPO loss and the implicit reward of SAIL, written from the paper.

With e_m(x) the mean squared error of model m's prediction over the latent's elements, for the
same timestep t and noise on both images of a pair (Eq. 3 with Eq. 8/9 of the SAIL paper):

    inside = -beta/2 * [(e_theta(w) - e_ref(w)) - (e_theta(l) - e_ref(l))]
    loss   = -log sigmoid(inside)

averaged over the batch; the implicit reward of one image is r = -beta/2 * (e_theta - e_ref).
Default beta = 5000, the value of the official DiffusionDPO training script and of the paper.
The diffusers research script for SD1.5 writes `-logsigmoid(beta_dpo * (ref_diff - model_diff))`
without the 1/2, so its `beta_dpo` is half of this beta (its 2500 equals our 5000).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F


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
