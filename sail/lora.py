"""LoRA through peft for 04_train.py: the adapter on the UNet's attention projections, and the
adapter alone saved in the layout `pipe.load_lora_weights(folder)` reads. peft is needed only here."""
import torch

from sail.common import SailError, derive_seed

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the attention projections of every transformer block


def lora_config(rank, alpha):
    """peft's LoraConfig for the attention projections; peft is only needed here."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise SailError(f"--lora-rank {rank} trains a LoRA through peft, which is not installed: pip install peft") from None
    # init_lora_weights=True: B starts at zero, so the UNet starts equal to its reference
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS, init_lora_weights=True)


def add_lora(unet, config, seed):
    """Freeze the UNet and put a fresh LoRA on it (diffusers' peft integration)."""
    unet.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # the same initial A matrices in every run and process
        torch.manual_seed(derive_seed(seed, "lora"))
        unet.add_adapter(config)
    return unet


def save_lora(unet, folder, arch):
    """The adapter alone, in the layout `pipe.load_lora_weights(folder)` reads. The scale alpha / rank
    is folded into the up matrices, so that a loader's default alpha (the rank) gives the trained model."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    config = unet.peft_config["default"]
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    state = {k: v * (config.lora_alpha / config.r) if ".lora.up." in k else v for k, v in state.items()}
    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    cls.save_lora_weights(folder, unet_lora_layers=state)
