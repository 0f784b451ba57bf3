"""The DPO loss against a plain transcription of the paper's formula, and its properties; the self-reward's draws."""
import math
from types import SimpleNamespace

import pytest
import torch

from sail import self_reward
from sail.dpo import dpo_loss, implicit_reward


def reference_loss(model_pred, ref_pred, target, beta):
    """Eq. 3 with Eq. 9, one pair at a time, in float64 with Python scalars."""
    half = model_pred.shape[0] // 2
    total = 0.0
    for i in range(half):
        def err(pred, j):
            return ((pred[j].double() - target[j].double()) ** 2).mean().item()
        inside = -beta / 2 * ((err(model_pred, i) - err(ref_pred, i)) - (err(model_pred, half + i) - err(ref_pred, half + i)))
        total += -math.log(1 / (1 + math.exp(-inside)))
    return total / half


def batch(seed, pairs=3, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * pairs, 4, 8, 8, generator=g)
    model = target + scale * torch.randn(2 * pairs, 4, 8, 8, generator=g)
    ref = target + scale * torch.randn(2 * pairs, 4, 8, 8, generator=g)
    return model, ref, target


@pytest.mark.parametrize("beta", [1.0, 100.0, 5000.0])
def test_matches_the_formula(beta):
    model, ref, target = batch(0, scale=0.05)
    out = dpo_loss(model, ref, target, beta)
    assert out.loss.item() == pytest.approx(reference_loss(model, ref, target, beta), rel=1e-4, abs=1e-6)


def test_first_item_is_the_loss_and_stats_agree():
    model, ref, target = batch(1, scale=0.05)
    out = dpo_loss(model, ref, target, 5000.0)
    assert out[0] is out.loss and out.loss.ndim == 0
    err = ((model - target) ** 2).mean(dim=(1, 2, 3))
    ref_err = ((ref - target) ** 2).mean(dim=(1, 2, 3))
    inside = implicit_reward(err[:3], ref_err[:3], 5000.0) - implicit_reward(err[3:], ref_err[3:], 5000.0)
    assert out.implicit_acc.item() == pytest.approx((inside > 0).float().mean().item())
    assert out.reward_margin.item() == pytest.approx(inside.mean().item(), rel=1e-5)


def test_model_equal_to_reference_gives_log2():
    model, _, target = batch(2)
    out = dpo_loss(model, model.clone(), target, 5000.0)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.implicit_acc.item() == 0.0  # ties count as wrong


def test_lowering_the_preferred_error_lowers_the_loss():
    model, ref, target = batch(3, scale=0.05)
    model = model.clone().requires_grad_(True)
    out = dpo_loss(model, ref, target, 5000.0)
    out.loss.backward()
    direction_w = (model[:3] - target[:3]).detach()  # gradient step along this raises the error of w
    assert (model.grad[:3] * direction_w).sum() > 0
    assert (model.grad[3:] * (model[3:] - target[3:]).detach()).sum() < 0
    closer = model.detach().clone()
    closer[:3] = target[:3] + 0.5 * (closer[:3] - target[:3])
    assert dpo_loss(closer, ref, target, 5000.0).loss < out.loss


def test_beta_to_zero_limit():
    model, ref, target = batch(4)
    assert dpo_loss(model, ref, target, 1e-9).loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_reference_gets_no_gradient():
    model, ref, target = batch(5, scale=0.05)
    ref = ref.clone().requires_grad_(True)
    dpo_loss(model.requires_grad_(True), ref, target, 5000.0).loss.backward()
    assert ref.grad is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype):
    model, ref, target = batch(6, scale=0.05)
    full = dpo_loss(model, ref, target, 50.0).loss
    half = dpo_loss(model.to(dtype), ref.to(dtype), target.to(dtype), 50.0)
    assert half.loss.dtype == torch.float32 and torch.isfinite(half.loss)
    assert half.loss.item() == pytest.approx(full.item(), rel=0.05)


def test_odd_batch_is_refused():
    model, ref, target = batch(7)
    with pytest.raises(ValueError):
        dpo_loss(model[:5], ref[:5], target[:5])


@pytest.mark.parametrize("k", [4, 5, 10])
def test_reward_draws_schemes(k):
    gen = lambda: torch.Generator().manual_seed(3)
    t, noise = self_reward.reward_draws(k, (2, 3, 3), 1000, gen(), "iid")
    assert t.shape == (k,) and noise.shape == (k, 2, 3, 3)
    t, _ = self_reward.reward_draws(k, (2, 3, 3), 1000, gen(), "stratified")
    assert (t * k // 1000).tolist() == list(range(k))  # one timestep in each of k equal strata
    for scheme in ("antithetic", "stratified-antithetic"):
        t, noise = self_reward.reward_draws(k, (2, 3, 3), 1000, gen(), scheme)
        first = k - k // 2  # an odd K keeps one plain draw
        assert torch.equal(noise[first:], -noise[:k // 2]) and len(set(t.tolist())) > 1
        if scheme.startswith("stratified"):
            assert (t * k // 1000).tolist() == list(range(k))
    with pytest.raises(ValueError, match="draw scheme 'sobol'"):
        self_reward.reward_draws(k, (1,), 1000, gen(), "sobol")


class TimeScaledUNet(torch.nn.Module):
    """Predicts (t / 1000) x_t: its error against the noise depends mostly on t."""

    def forward(self, latents, timesteps, encoder_hidden_states=None):
        return SimpleNamespace(sample=latents * (timesteps.float() / 1000).view(-1, 1, 1, 1))


class ConstantUNet(torch.nn.Module):
    """Predicts a fixed tensor v (zero: the reference): the error difference ||v||^2 - 2 eps.v is odd in the noise."""

    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, latents, timesteps, encoder_hidden_states=None):
        return SimpleNamespace(sample=torch.full_like(latents, self.scale))


def reward_spread(unet, scheme, seeds=300):
    from diffusers import DDPMScheduler
    latents, cond = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), {"embeds": torch.zeros(1, 1, 1)}
    rewards = torch.stack([self_reward.self_rewards(unet, ConstantUNet(0.0), DDPMScheduler(num_train_timesteps=1000), latents,
                                                  cond, 32, draws=4, seed=s, scheme=scheme)[0][0] for s in range(seeds)])
    return rewards.mean().item(), rewards.std().item()


@pytest.mark.parametrize("unet, helps", [(TimeScaledUNet(), "stratified"), (ConstantUNet(0.3), "antithetic")])
def test_variance_reduction_schemes_reduce_the_spread_of_the_reward(unet, helps):
    """Over many seeds, the K = 4 reward of one image varies less with stratified timesteps where the
    error depends on t, with antithetic noise where it is odd in the noise, and with both in either
    case, than with the paper's i.i.d. draws; every scheme estimates the same mean."""
    spread = {scheme: reward_spread(unet, scheme) for scheme in self_reward.DRAW_SCHEMES}
    (mean_iid, std_iid) = spread["iid"]
    for mean, std in spread.values():
        assert mean == pytest.approx(mean_iid, abs=4 * std_iid / 300 ** 0.5)
    assert spread[helps][1] < 0.5 * std_iid and spread["stratified-antithetic"][1] < 0.5 * std_iid, spread
