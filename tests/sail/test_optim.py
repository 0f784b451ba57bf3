"""sail/optim.py: torch's foreach Adafactor (--optimizer adafactor-torch) against transformers' Adafactor
with DiffusionDPO's settings (--optimizer adafactor, the default for SDXL), one step from the same
gradients on the tiny SDXL UNet's tensors."""
import pytest
import torch

from sail import models, optim

LR, WEIGHT_DECAY = 1e-2, 1e-2  # a large lr, so that the weights' round-off is small beside a step


def one_step(name, params, grads):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    optim.make_optimizer(name, params, LR, WEIGHT_DECAY).step()
    return [p.detach() for p in params]


def test_torch_adafactor_moves_each_tensor_as_transformers_does_scaled_by_its_size():
    """The same factored second moments and update clipping, so the same direction for every tensor; but
    torch's step is lr x max(1e-3, RMS of the tensor) where transformers' (relative_step=False,
    scale_parameter=False) is lr, and torch floors the second moments' row means at float32's epsilon
    (transformers at 1e-30), which moves the steps of gradients below about 3e-4 (here none are): not
    numerically DiffusionDPO's optimizer, hence an option."""
    unet = models.load_unet(models.describe_model("tiny-sdxl"))
    params = [p.detach() for p in unet.parameters()]
    generator = torch.Generator().manual_seed(0)
    grads = [(lambda g: g.sign() * (g.abs() + 1e-2))(torch.randn(p.shape, generator=generator)) for p in params]
    theirs, ours = one_step("adafactor", params, grads), one_step("adafactor-torch", params, grads)
    factored = 0
    for p, t, o in zip(params, theirs, ours):
        decay = -LR * WEIGHT_DECAY * p  # both decay the weights by lr x weight decay first
        step_t, step_o = t - p - decay, o - p - decay
        scale = max(1e-3, p.pow(2).mean().sqrt().item())
        ulp = torch.finfo(torch.float32).eps * p.abs().max().item()  # the weights' round-off, in each step read back
        torch.testing.assert_close(step_o, step_t * scale, rtol=1e-4, atol=4 * ulp)
        factored += p.ndim > 1
    assert factored > 10  # the factored (matrix and convolution) path is covered, not only vectors
    ratio = torch.cat([(o - p).flatten() for p, o in zip(params, ours)]).norm() / \
        torch.cat([(t - p).flatten() for p, t in zip(params, theirs)]).norm()
    assert ratio < 0.5  # the weights' RMS is well below 1: torch's steps are smaller at the same lr


def test_unknown_optimizers_are_refused_by_the_flag():
    from conftest import load_stage
    with pytest.raises(SystemExit):
        load_stage("04_train").build_parser().parse_args(["--optimizer", "lion"])
