"""Every preset of the kit in one table: the model, its generation settings and its training
settings, as in the paper (section 5.1) for sd15 and sdxl.
"""
import os

from sail.common import SailError

# Generation and training defaults follow the paper (section 5.1); `model` is a hub id, a local
# folder, or a kit-built model ("tiny:sd15", "tiny:sdxl", "toy"). SAIL_SD15_PATH / SAIL_SDXL_PATH
# point the real presets at a local copy of the weights.
PRESETS = {
    "sd15": dict(model=os.environ.get("SAIL_SD15_PATH", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                 arch="sd15", resolution=512, sampler="ddpm", steps=50, cfg=7.5, optimizer="adamw",
                 mixed_precision="bf16", gen_batch=16, reward_batch=32, micro_batch=8, batch_size=128, epochs=1),
    "sdxl": dict(model=os.environ.get("SAIL_SDXL_PATH", "stabilityai/stable-diffusion-xl-base-1.0"),
                 arch="sdxl", resolution=1024, sampler="ddim", steps=20, cfg=5.0, optimizer="adafactor",
                 mixed_precision="bf16", gen_batch=8, reward_batch=16, micro_batch=2, batch_size=128, epochs=1,
                 gradient_checkpointing=True),  # as DiffusionDPO's SDXL training
    # tiny-*: the plumbing on random weights; lr 1e-4 so that two steps move the self-reward above
    # round-off (ties give no pair)
    "tiny-sd15": dict(model="tiny:sd15", arch="sd15", resolution=32, sampler="ddim", steps=4, cfg=3.0,
                      optimizer="adamw", mixed_precision="no", gen_batch=16, reward_batch=32, micro_batch=4,
                      max_steps=2, batch_size=8, lr=1e-4),
    "tiny-sdxl": dict(model="tiny:sdxl", arch="sdxl", resolution=32, sampler="ddim", steps=4, cfg=3.0,
                      optimizer="adafactor", mixed_precision="no", gen_batch=16, reward_batch=32, micro_batch=4,
                      max_steps=2, batch_size=8, lr=1e-4),
    # The CPU toy world (toy/world.py, toy/data.py): a briefly pretrained small model of the SD1.5 architecture.
    "toy": dict(model="toy", arch="sd15", resolution=32, sampler="ddim", steps=20, cfg=1.0, flip=False,
                optimizer="adamw", mixed_precision="no", gen_batch=64, reward_batch=160, micro_batch=32,
                lr=1e-6, batch_size=32, max_steps=300),
}


def get_preset(name):
    if name not in PRESETS:
        raise SailError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def fill_defaults(args, preset, names):
    """Set each args.<name> that is None from the preset (argparse defaults stay None for these)."""
    for name in names:
        if getattr(args, name, None) is None and name in preset:
            setattr(args, name, preset[name])
    return args
