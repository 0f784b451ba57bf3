"""Memory-aware defaults of DPO training: the micro batch and gradient checkpointing chosen from the
GPU's memory by a model of what a whole-UNet step holds, and the message of a step that runs out of it.

What a step holds: the trained UNet's float32 weights and gradients and the optimizer's state (per
parameter), the frozen models (the reference UNet, text encoders, VAE) in half precision, and per pair
of the micro batch the activations kept for the backward pass (far fewer with gradient checkpointing,
which recomputes them at the cost of a second forward pass). Without checkpointing a step computes
less, so the choice is: no checkpointing where the preset's micro batch fits without it, else
checkpointing; then the largest micro batch that fits and divides the pairs of a step and process.
"""
import torch

# The released architectures at the preset's resolution, bf16 or fp16 mixed precision (docs/training.md,
# "Memory-aware defaults", says where each number comes from). params: the UNet's parameters; frozen: GiB
# of the reference UNet, text encoders and VAE; pair / pair_checkpointed: GiB one pair (two images) adds
# without / with gradient checkpointing, a quarter added: from a step's peak measured on a GPU less the rest
# where there is one (sd15 without, sdxl with checkpointing), else from the activations the UNet saves for
# the backward pass, counted on the meta device (tests/sail/test_memory.py).
MEMORY_MODEL = {
    "sd15": dict(params=0.86e9, frozen=2.0, pair=2.9, pair_checkpointed=0.9, resolution=512),
    "sdxl": dict(params=2.57e9, frozen=6.6, pair=26.5, pair_checkpointed=2.5, resolution=1024),
}
# Bytes of optimizer state per parameter (Adafactor keeps factored second moments: rows and columns only).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "adafactor": 0, "adafactor-torch": 0}
HEADROOM = 0.85  # the share of the GPU's memory a plan may fill: the CUDA context, allocator slack, workspaces


def step_gib(arch, micro, checkpointing, optimizer, resolution):
    """GiB a whole-UNet DPO step of `micro` pairs is planned to hold (None for an architecture not in the table)."""
    model = MEMORY_MODEL.get(arch)
    if model is None:
        return None
    fixed = model["params"] * (8 + OPTIMIZER_STATE_BYTES.get(optimizer, 8)) / 2**30 + model["frozen"]
    per_pair = model["pair_checkpointed" if checkpointing else "pair"] * (resolution / model["resolution"]) ** 2
    return fixed + micro * per_pair


def choose(arch, memory_gib, per_process, preset_micro, preset_checkpointing, optimizer, resolution, mixed_precision,
           micro=None, checkpointing=None):
    """(micro batch, gradient checkpointing) for a GPU of memory_gib GiB; micro and checkpointing, where
    given, stay as given. The preset's where memory_gib is None (the CPU), the architecture is not in the
    table, or training runs in float32."""
    if memory_gib is None or arch not in MEMORY_MODEL or mixed_precision not in ("bf16", "fp16"):
        return micro or preset_micro, preset_checkpointing if checkpointing is None else checkpointing
    sizes = [micro] if micro else [m for m in range(per_process, 0, -1) if per_process % m == 0]
    wanted = micro or min(preset_micro, per_process)
    options = (False, True) if checkpointing is None else (checkpointing,)
    for option in options:
        fits = [m for m in sizes if step_gib(arch, m, option, optimizer, resolution) <= HEADROOM * memory_gib]
        if fits and (option or fits[0] >= wanted or len(options) == 1):
            return fits[0], option
    return sizes[-1], options[-1]  # nothing fits by the table: the smallest step; out_of_memory_message says what else


def out_of_memory_message(step, micro, checkpointing):
    """What to change when a step runs out of GPU memory: the flags, in the order they save the most."""
    said = f"out of GPU memory at step {step} (micro batch {micro}, gradient checkpointing {'on' if checkpointing else 'off'}): "
    if not checkpointing:
        fix = "add --gradient-checkpointing" + (f", or lower --micro-batch (e.g. --micro-batch {micro // 2})" if micro > 1 else "")
    elif micro > 1:
        fix = f"lower --micro-batch (e.g. --micro-batch {micro // 2})"
    else:
        fix = ("even one pair with gradient checkpointing does not fit: train a LoRA (--lora-rank 8), use --optimizer "
               "adafactor or adamw8bit, or shard the UNet over several GPUs (FSDP or DeepSpeed, docs/training.md)")
    return said + fix + " (a rerun continues from the last resumable state)"


def device_memory_gib(device):
    """Total memory of a CUDA device in GiB, None for any other device."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / 2**30

