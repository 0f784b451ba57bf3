"""FLOPs of the kit's work and how close a device runs to its limit (model FLOP utilisation, MFU).

FLOPs are counted by torch's FlopCounterMode: matrix products, convolutions and attention, forward
and backward (elementwise work, norms and the optimizer's arithmetic are not counted). Two ways,
which the tests hold equal:
  * `count_flops(fn)`: the FLOPs of one call of the very function a benchmark row times;
  * `unit_flops(pipe, ...)`: per unit of each workload (an image generated, an image's self-reward,
    a pair trained), from the pipeline's models rebuilt on the meta device (no memory, no arithmetic)
    and composed as the stages run them. bench/speed.py and tools/preflight.py both estimate the
    paper's run from it (bench/estimate.py).
The fused attention kernels count their backward's recomputed scores (torch's formulas, which
`cpu_attention_formulas` gives the CPU's kernels too); on the meta device attention runs as plain matrix
products, whose backward recomputes nothing: so a timed DPO step counts half an attention forward per
trained image more than `unit_flops`, and generation and the self-reward count the same.
MFU = counted FLOPs per second / the device's dense bf16 peak (`device_peak`; --peak-tflops overrides).
"""
from types import SimpleNamespace

import torch

from sail.dpo import unet_call

# Dense bf16 tensor-core TFLOP/s (no 2:4 structured sparsity) by device name, the more specific
# names first. NVIDIA's datasheets print the figure with sparsity, twice the dense one.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)
PEAK_SOURCE = ("NVIDIA datasheets (H100 and H200 Tensor Core GPU, A100, L40S, L4): the bf16 tensor-core figure "
               "without sparsity")


def peak_for(device_name):
    """The dense bf16 peak of a device by its name (torch.cuda.get_device_name()), or None."""
    for fragment, tflops in PEAK_BF16_TFLOPS:
        if fragment.lower() in device_name.lower():
            return tflops
    return None


def device_peak(override=None):
    """(peak TFLOP/s or None, device name, where the peak comes from) for this process's device."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    if override:
        return float(override), name, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, name, "no peak on the CPU: TFLOP/s only"
    peak = peak_for(name)
    return peak, name, PEAK_SOURCE if peak else "not in the table of bench/flops.py: give --peak-tflops for MFU"


def count_flops(fn):
    """(fn's result, the FLOPs of that one call)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_formulas()) as counter:
        result = fn()
    return result, counter.get_total_flops()


def cpu_attention_formulas():
    """torch counts the GPU's fused attention kernels but not the CPU's, which do the same arithmetic:
    the same formulas for them, so that a count does not depend on the device."""
    aten = torch.ops.aten
    pairs = [("_scaled_dot_product_flash_attention_for_cpu", _attention),
             ("_scaled_dot_product_flash_attention_for_cpu_backward", _attention_backward)]
    return {getattr(aten, name): formula for name, formula in pairs if hasattr(aten, name)}


def _attention(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_backward_flop_count
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def utilisation(flops_per_unit, units_per_s, peak_tflops):
    """(TFLOP/s, MFU as a fraction or None without a peak)."""
    tflops = flops_per_unit * units_per_s / 1e12
    return tflops, (tflops / peak_tflops if peak_tflops else None)


def meta_models(pipe):
    """The pipeline's UNet, VAE and text encoders rebuilt from their configs on the meta device."""
    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    with torch.device("meta"):
        unet = type(pipe.unet).from_config(pipe.unet.config)
        vae = type(pipe.vae).from_config(pipe.vae.config)
        encoders = [type(e)(e.config) for e in encoders]
    return unet, vae, encoders


def meta_pipeline(pipe):
    """What unit_flops reads of a pipeline (its models' shapes and its config), on the meta device: the
    pipeline itself can then be freed."""
    unet, vae, encoders = meta_models(pipe)
    return SimpleNamespace(unet=unet, vae=vae, text_encoder=encoders[0], text_encoder_2=(encoders[1:] or [None])[0],
                           config=pipe.config)


def unet_inputs(unet, vae, resolution, batch=1):
    """Latents, timesteps and conditioning for one UNet call at `resolution` px, on the meta device."""
    cfg, size = unet.config, resolution // 2 ** (len(vae.config.block_out_channels) - 1)  # the VAE's downsampling
    latents = torch.zeros(batch, cfg.in_channels, size, size, device="meta")
    cond = {"embeds": torch.zeros(batch, 77, cfg.cross_attention_dim, device="meta")}
    if cfg.addition_embed_type == "text_time":  # SDXL: the pooled text embedding beside the 6 time ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        cond["pooled"] = torch.zeros(batch, pooled, device="meta")
    return latents, torch.zeros(batch, dtype=torch.long, device="meta"), cond


def unet_pass_flops(unet, vae, resolution, train=False, checkpointing=False):
    """FLOPs of one image through the UNet: a forward, or (train) a forward and backward, with gradient
    checkpointing's recomputed forward if asked."""
    latents, t, cond = unet_inputs(unet, vae, resolution)
    if not train:
        with torch.no_grad():
            return count_flops(lambda: unet_call(unet, latents, t, cond, resolution))[1]
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return count_flops(lambda: unet_call(unet, latents, t, cond, resolution).float().pow(2).mean().backward())[1]


def component_flops(pipe, resolution, checkpointing):
    """FLOPs per image (per prompt for the text encoders) of each part, counted on the meta device:
    unet (a forward), unet_train (forward and backward, with gradient checkpointing's recomputed
    forward if asked), vae_encode, text (every text encoder, 77 tokens)."""
    unet, vae, encoders = meta_models(pipe)
    with torch.no_grad():
        _, encode = count_flops(lambda: vae.encode(torch.zeros(1, 3, resolution, resolution, device="meta")))
        ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
        text = sum(count_flops(lambda e=e: e(ids))[1] for e in encoders)
    return dict(unet=unet_pass_flops(unet, vae, resolution), vae_encode=encode, text=text,
                unet_train=unet_pass_flops(unet, vae, resolution, train=True, checkpointing=checkpointing))


def unit_flops(pipe, resolution, steps, cfg, draws, checkpointing, parts=None):
    """FLOPs per unit of the kit's three workloads, as the stages run them:
    gen:    one image of a pipeline call: `steps` UNet forwards, two with guidance (cfg > 1), and its
            prompt's text encoding (the empty negative prompt too, unless the pipeline zeros it);
            no VAE decoding;
    reward: one image's implicit reward, K = `draws` draws through the trained UNet and the reference;
    train:  one pair of a DPO step with the latent cache off: per image a VAE encoding, the reference's
            forward and the trained UNet's forward and backward; the prompt encoded once."""
    parts = parts or component_flops(pipe, resolution, checkpointing)
    guided = cfg > 1
    negative = guided and not getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    return dict(gen=steps * (2 if guided else 1) * parts["unet"] + (1 + negative) * parts["text"],
                reward=2 * draws * parts["unet"],
                train=2 * (parts["vae_encode"] + parts["unet"] + parts["unet_train"]) + parts["text"])

