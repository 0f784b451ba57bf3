"""The optimizers of DiffusionDPO training: AdamW (SD1.5 in the paper), Adafactor (SDXL) and 8-bit AdamW.
"""
import torch

from sail.common import SailError


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
