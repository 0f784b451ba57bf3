"""The optimizers of DiffusionDPO training: AdamW (SD1.5 in the paper), Adafactor (SDXL), 8-bit AdamW,
and torch's Adafactor.
"""
import torch

from sail.common import SailError


def make_optimizer(name, params, lr, weight_decay):
    """adamw (SD1.5 in the paper), adafactor (SDXL: transformers' Adafactor with DiffusionDPO's settings),
    bitsandbytes' 8-bit AdamW (a quarter of AdamW's state memory; optional), or adafactor-torch:
    torch.optim.Adafactor, which updates many tensors per kernel (foreach) but scales each step by the
    tensor's root mean square (at least 1e-3), so it is another optimizer, not a faster transformers' one."""
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
    if name == "adafactor-torch":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay, foreach=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
