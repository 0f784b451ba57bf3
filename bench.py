"""Speed of the kit's hot loops next to a straightforward implementation of the same work.

Prints, for one preset: DPO training pairs/s (ours: preferred and dispreferred halves in one
UNet batch, one reference pass, latents encoded once; naive: separate passes for w and l, the
reference run twice, VAE encoding every step), generation images/s (ours: batched prompts;
naive: one image per pipeline call) and self-reward rewards/s (ours: batched draws, text
encoded once per prompt; naive: one UNet call per image and draw), as ratios, with peak memory
(on a GPU per measurement; on the CPU the process's peak so far). Then an estimate of the
paper's full run (seed DPO on 50K human pairs, then iterations on pools of 10K, 20K, 20K
prompts: 3 for SD1.5, 2 for SDXL) per stage, on 1 and on 8 such devices, from the rates measured.

    python bench.py                       # tiny-sd15 on the CPU
    python bench.py --preset toy --steps 5
    python bench.py --preset sd15         # on a GPU, with the real weights (or $SAIL_SD15_PATH)
    python bench.py --preset sdxl --random-weights   # on a GPU, no download

--random-weights builds the released architecture of the preset (SD1.5 or SDXL: UNet, VAE, CLIP
text encoders, configs below) with random weights in memory: the same shapes and the same work
as the real model, nothing to download. The training step uses the preset's optimizer and micro
batch (--pairs overrides it; add --gradient-checkpointing if it runs out of memory).

Timings are printed, never asserted; run on an otherwise idle machine.
"""
import argparse
import copy
import math
import resource
import tempfile
import time
from pathlib import Path

import torch

import model_configs
import dpo_maths
import run_files
import sail_models as models


# The released architectures come from model_configs.py. Parameters: SD1.5 UNet 859,520,964,
# SDXL UNet 2,567,463,684, VAE 83,653,863, CLIP ViT-L/14 text 123,060,480, OpenCLIP ViT-bigG/14
# text with projection 694,659,840 (tests/test_bench.py checks them).
architecture = model_configs.released_configs  # arch -> configs; the tests swap in smaller ones

# The paper's runs (section 5.1): seed DPO on 50K human pairs, then one pool of prompts per
# iteration, N = 8 images each, K = 10 reward draws, 25% human pairs in each training mix.
PAPER_RUNS = {"sd15": [10_000, 20_000, 20_000], "sdxl": [10_000, 20_000]}
SEED_PAIRS, N_IMAGES, DRAWS, HUMAN_SHARE = 50_000, 8, 10, 0.25


def full_size_models(arch):
    """UNet, VAE and text encoder(s) of the released architecture, randomly initialised where
    torch puts new tensors (a `with torch.device(...)` block, or accelerate.init_empty_weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = architecture(arch)
    encoders = [(CLIPTextModelWithProjection if i == 1 else CLIPTextModel)(CLIPTextConfig(**text))  # SDXL's second projects
                for i, text in enumerate(cfg["text"])]
    return UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"]), encoders


def random_weights_pipeline(arch, device, dtype, sampler):
    """A pipeline of the released architecture with random weights, made on the device, and a
    float32 copy of its UNet to train; the tokenizer is the kit's byte-level one (its
    <|endoftext|> is the highest id, as in CLIP's vocabulary, where the text encoders pool)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory() as folder:
        models.write_byte_tokenizer(Path(folder))
        tokenizers = [CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", **t)
                      for t in model_configs.TOKENIZERS[arch]]
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, encoders = full_size_models(arch)
    scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler].from_config(model_configs.SCHEDULERS[arch])
    frozen = dict(vae=vae.to(dtype), unet=copy.deepcopy(unet).to(dtype), tokenizer=tokenizers[0], scheduler=scheduler)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder=encoders[0].to(dtype), text_encoder_2=encoders[1].to(dtype),
                                         tokenizer_2=tokenizers[1], **frozen)
    else:
        pipe = StableDiffusionPipeline(text_encoder=encoders[0].to(dtype), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **frozen)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet


def timed(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def paper_run_estimate(arch, rates, epochs, batch=128):
    """(stage, work, seconds on one device) for the paper's run of `arch`, from measured rates."""
    steps = lambda pairs: math.ceil(pairs * epochs / batch)
    rows = [("iter 0 DPO (seed)", f"{steps(SEED_PAIRS):,} steps x {batch} pairs", steps(SEED_PAIRS) * batch / rates["train"])]
    for i, prompts in enumerate(PAPER_RUNS[arch], 1):
        images = prompts * N_IMAGES
        pairs = prompts + round(prompts * HUMAN_SHARE / (1 - HUMAN_SHARE))  # a pair per prompt, plus human pairs
        rows += [(f"iter {i} generation", f"{prompts:,} prompts x {N_IMAGES} images", images / rates["gen"]),
                 (f"iter {i} self-reward", f"{images:,} images x K={DRAWS} x 2 UNets", images / rates["reward"]),
                 (f"iter {i} DPO", f"{steps(pairs):,} steps x {batch} pairs", steps(pairs) * batch / rates["train"])]
    return rows


def main(args):
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    device = models.pick_device()
    preset = models.get_preset(args.preset)
    dtype = models.inference_dtype(device, preset["mixed_precision"])
    if args.random_weights:
        pipe, unet = random_weights_pipeline(preset["arch"], device, dtype, preset["sampler"])
    else:
        desc = models.describe_model(args.preset)
        pipe = models.load_pipeline(desc, device, dtype, sampler=preset["sampler"])
        unet = models.load_unet(desc, torch.float32).to(device)
    res, pairs, n_img = preset["resolution"], args.pairs or preset["micro_batch"], args.images or preset["gen_batch"]
    unet.train()
    if args.gradient_checkpointing or preset.get("gradient_checkpointing"):  # on for sdxl, as in 04_train.py
        unet.enable_gradient_checkpointing()
    ref = pipe.unet.eval()
    opt = dpo_maths.make_optimizer(preset["optimizer"], unet.parameters(), 1e-9, 0.0)
    pixels = torch.rand(2 * pairs, 3, res, res, device=device) * 2 - 1
    cond = dpo_maths.encode_prompts(pipe, ["a red square on the left"] * pairs, device)
    with torch.no_grad():
        cached = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
    t = torch.randint(0, 1000, (pairs,), device=device)
    noise = torch.randn_like(cached[:pairs])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    noise_scheduler = dpo_maths.forward_process(pipe.scheduler)

    def ours():  # the micro-batch step 04_train.py runs
        with autocast:
            loss = dpo_maths.dpo_micro_batch(unet, ref, noise_scheduler, cached.float(), noise, t, cond, res, dpo_maths.BETA, dtype).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    def naive():
        with torch.no_grad():
            lat = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
        errs = []
        for half in (lat[:pairs], lat[pairs:]):
            x = noise_scheduler.add_noise(half.float(), noise, t)
            with autocast:
                with torch.no_grad():
                    ref_err = dpo_maths.per_sample_error(dpo_maths.unet_call(ref, x.to(dtype), t, {k: v.to(dtype) for k, v in cond.items()}, res), noise)
                errs.append((dpo_maths.per_sample_error(dpo_maths.unet_call(unet, x, t, cond, res), noise), ref_err))
        inside = -2500.0 * ((errs[0][0] - errs[0][1]) - (errs[1][0] - errs[1][1]))
        (-torch.nn.functional.logsigmoid(inside).mean()).backward()
        opt.step()
        opt.zero_grad()

    rows = []

    def measure(work, unit, count, fn_ours, fn_naive, repeats=1):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            a, b = timed(fn_ours, repeats), timed(fn_naive, repeats)
        except torch.cuda.OutOfMemoryError:
            raise run_files.SailError(f"out of GPU memory in {work} ({pairs} pairs, {n_img} images): "
                               "use fewer --pairs / --images, or --gradient-checkpointing") from None
        rows.append((work, unit, count / a, count / b, peak_memory_mb()))

    measure("DPO training", "pairs/s", pairs, ours, naive, args.steps)
    opt = None  # frees the optimizer state; the trained UNet, in inference precision, is scored against its reference as in 02
    scored = unet.to(dtype).eval().requires_grad_(False)

    gen = lambda batch: pipe(prompt=["a red square on the left"] * batch, num_inference_steps=preset["steps"],
                             guidance_scale=preset["cfg"], height=res, width=res, output_type="latent")
    with torch.inference_mode():
        measure("generation", "images/s", n_img, lambda: gen(n_img), lambda: [gen(1) for _ in range(n_img)])

    lat = cached[:1].repeat(N_IMAGES, 1, 1, 1)
    with torch.inference_mode():
        one = dpo_maths.encode_prompts(pipe, ["a red square on the left"], device)

        def score_naive():
            for i in range(lat.shape[0]):
                for k in range(DRAWS):
                    c = dpo_maths.encode_prompts(pipe, ["a red square on the left"], device)
                    tk = torch.randint(0, 1000, (1,), device=device)
                    x = noise_scheduler.add_noise(lat[i:i + 1].to(dtype), noise[:1].to(dtype), tk)
                    dpo_maths.per_sample_error(dpo_maths.unet_call(scored, x, tk, c, res), noise[:1])
                    dpo_maths.per_sample_error(dpo_maths.unet_call(ref, x, tk, c, res), noise[:1])
        measure(f"self-reward (K={DRAWS})", "rewards/s", lat.shape[0],
                lambda: dpo_maths.self_rewards(scored, ref, pipe.scheduler, lat.to(dtype), one, res, DRAWS,
                                        batch_size=preset["reward_batch"]), score_naive)

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    weights = "random weights, released architecture" if args.random_weights else "weights of the preset"
    print(f"preset {args.preset} ({weights}) on {name}, {dtype}; DPO batch {pairs} pairs ({preset['optimizer']}), "
          f"{n_img} images, {N_IMAGES} images x {DRAWS} draws")
    print(f"{'work':22s} {'unit':10s} {'ours':>10s} {'naive':>10s} {'ratio':>7s} {'peak MiB':>9s}")
    for work, unit, a, b, peak in rows:
        print(f"{work:22s} {unit:10s} {a:10.2f} {b:10.2f} {a / b:6.2f}x {peak:9.0f}")
    print(f"peak memory {max(r[4] for r in rows):.0f} MiB")

    rates = dict(train=rows[0][2], gen=rows[1][2], reward=rows[2][2])
    estimate = paper_run_estimate(preset["arch"], rates, preset.get("epochs", 1))
    print(f"\nESTIMATE from the rates above (ours), not a measurement: the paper's {preset['arch']} run, "
          f"{len(PAPER_RUNS[preset['arch']])} iterations after the seed DPO, at {args.preset}'s resolution and steps.")
    print("UNet work only (no VAE decoding or encoding, files, model loading); 8 devices assume linear scaling.")
    print(f"{'stage':22s} {'work':34s} {'1 device':>10s} {'8 devices':>10s}")
    for stage, work, seconds in estimate:
        print(f"{stage:22s} {work:34s} {duration(seconds):>10s} {duration(seconds / 8):>10s}")
    total = sum(r[2] for r in estimate)
    print(f"{'total':22s} {'':34s} {duration(total):>10s} {duration(total / 8):>10s}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sd15")
    p.add_argument("--random-weights", action="store_true", help="the preset's released architecture, random weights")
    p.add_argument("--pairs", type=int, help="pairs per training step (default: the preset's micro batch)")
    p.add_argument("--images", type=int, help="images to generate (default: the preset's generation batch)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps")
    p.add_argument("--gradient-checkpointing", action="store_true")
    return p


if __name__ == "__main__":
    run_files.run_stage(main, build_parser().parse_args())
