"""Speed of the kit's own code next to a straightforward implementation of the same work.

Prints, for one preset:
  * DPO training pairs/s of 04_train.py's own `train_step` (on the job its `setup` builds from a
    pair file of noise images, one micro batch per step) against a straightforward step on the same
    batch (per side: images VAE-encoded, prompts encoded, trained UNet and reference called). Latent
    cache off in both (one epoch, the paper's setting, reuses nothing); the cached step is its own
    row. Then where a step's time goes: text encoders, VAE, reference, trained UNet forward, the rest.
  * generation images/s (batched prompts vs one image per call) and self-reward rewards/s (batched
    draws vs one UNet call per image and draw); peak memory (GPU: per row; CPU: the process's).
  * --speed-flags [NAME ...]: the options that only pay on a GPU, each added to those before it.
Then an estimate of the paper's full run per stage, on 1 and on 8 such devices.

    python -m bench.speed                       # tiny-sd15 on the CPU
    python -m bench.speed --preset toy --steps 5   # the toy world's model (python -m toy.base builds it)
    python -m bench.speed --preset sd15         # on a GPU, with the real weights (or $SAIL_SD15_PATH)
    python -m bench.speed --preset sdxl --random-weights --speed-flags   # on a GPU, no download

--random-weights saves the preset's released architecture with random weights as a pipeline folder
that the job loads like any other: the real model's work, no download. Timings are never asserted.
"""
import argparse
import copy
import importlib
import itertools
import json
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sail import batches, common, configs, dpo, files, models, self_reward, settings, tiny, training

train = importlib.import_module("04_train")
PROMPT = "a red square on the left"
SPEED_FLAGS = {"channels-last": dict(channels_last=True), "fuse-qkv": dict(fuse_qkv=True), "compile": dict(compile=True)}


# The released architectures (configs.py); tests/test_bench.py checks their parameter counts.
architecture = configs.released_configs  # arch -> configs; the tests swap in smaller ones

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
        tiny.write_byte_tokenizer(Path(folder))
        tokenizers = [CLIPTokenizer(f"{folder}/vocab.json", f"{folder}/merges.txt", **t)
                      for t in configs.TOKENIZERS[arch]]
    torch.manual_seed(0)
    with torch.device(device):
        unet, vae, encoders = full_size_models(arch)
    scheduler = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[sampler].from_config(configs.SCHEDULERS[arch])
    frozen = dict(vae=vae.to(dtype), unet=copy.deepcopy(unet).to(dtype), tokenizer=tokenizers[0], scheduler=scheduler)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder=encoders[0].to(dtype), text_encoder_2=encoders[1].to(dtype),
                                         tokenizer_2=tokenizers[1], **frozen)
    else:
        pipe = StableDiffusionPipeline(text_encoder=encoders[0].to(dtype), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **frozen)
    pipe.set_progress_bar_config(disable=True)
    return pipe, unet


def write_random_pipeline(arch, folder, device, dtype, sampler):
    """The released architecture with random weights, saved as a diffusers pipeline folder."""
    pipe, _ = random_weights_pipeline(arch, device, dtype, sampler)
    pipe.save_pretrained(folder, safe_serialization=True)
    return str(folder)


def training_job(init, args, folder):
    """04_train.py's own job (its setup: models, optimizer, accelerate, mixed precision) on a pair file of
    noise images at the preset's resolution, --batch-size = one micro batch, nothing saved while timed."""
    preset = settings.get_preset(args.preset)
    res, pairs = preset["resolution"], args.pairs or preset["micro_batch"]
    rng, rows = np.random.default_rng(0), []
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(pairs):
        for side in "wl":
            Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)).save(folder / "images" / f"{i}{side}.png")
        rows.append(dict(prompt=PROMPT, image_w=f"images/{i}w.png", image_l=f"images/{i}l.png", source="human"))
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["--init", init, "--preset", args.preset, "--pairs", folder / "pairs.jsonl", "--out", folder / "ckpt",
            "--batch-size", pairs, "--micro-batch", pairs, "--max-steps", 10_000, "--save-every", 0, "--log-every", 10_000,
            "--lr", 1e-9, "--empty-prompt-prob", 0, *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    logger, level = logging.getLogger("sail"), logging.getLogger("sail").level
    logger.setLevel(logging.WARNING)  # the stage's own log lines would interleave with the table
    try:
        return train.setup(train.build_parser().parse_args([str(a) for a in argv]))
    finally:
        logger.setLevel(level)


def straightforward_step(job, step):
    """The same batch's DPO step written plainly: per side, the images VAE-encoded and the prompts
    encoded, then the trained UNet and the reference each called on that side alone."""
    args, device = job.args, job.device
    rows = [job.pairs[i] for i in job.order[step * args.batch_size:(step + 1) * args.batch_size]]
    gen = torch.Generator().manual_seed(step)
    t = torch.randint(0, 1000, (len(rows),), generator=gen).to(device)
    errors, noise = [], None
    for side in (0, 1):
        images = [batches.load_pair_pixels(r, args.resolution, args.seed, False, False)[side] for r in rows]
        latents = batches.encode_images(job.pipe.vae, images, device).float()
        cond = batches.encode_prompts(job.pipe, [r["prompt"] for r in rows], device)
        noise = torch.randn(latents.shape, generator=gen).to(device) if noise is None else noise
        noisy = job.noise_scheduler.add_noise(latents, noise, t)
        with training.autocast(job):
            with torch.no_grad():
                ref = dpo.unet_call(job.ref_unet, noisy.to(job.ref_dtype), t,
                                          {k: v.to(job.ref_dtype) for k, v in cond.items()}, args.resolution)
            pred = dpo.unet_call(job.unet, noisy, t, {k: v.float() for k, v in cond.items()}, args.resolution)
        errors.append(dpo.per_sample_error(pred, noise) - dpo.per_sample_error(ref, noise))
    loss = -torch.nn.functional.logsigmoid(-0.5 * args.beta * (errors[0] - errors[1])).mean()
    job.accelerator.backward(loss)
    job.accelerator.clip_grad_norm_(job.unet.parameters(), args.max_grad_norm)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def step_breakdown(job, steps, repeats):
    """Seconds per step of 04's train_step spent in each part (forward hooks; the rest is backward,
    optimizer and reading images)."""
    parts = {"text encoders": [job.pipe.text_encoder, getattr(job.pipe, "text_encoder_2", None)],
             "VAE encoding": [job.pipe.vae.encoder], "reference UNet": [job.ref_unet],
             "trained UNet forward": [job.accelerator.unwrap_model(job.unet)]}
    spent, started, handles = dict.fromkeys(parts, 0.0), {}, []

    def before(module, _):
        sync()
        started[module] = time.perf_counter()

    def after(module, _, __, name):
        sync()
        spent[name] += time.perf_counter() - started[module]
    for name, modules in parts.items():
        for module in filter(None, modules):
            handles += [module.register_forward_pre_hook(before),
                        module.register_forward_hook(lambda *hook_args, name=name: after(*hook_args, name))]
    total = timed(lambda: train.train_step(job, next(steps)), repeats)
    for handle in handles:
        handle.remove()
    spent = {name: seconds / (repeats + 1) for name, seconds in spent.items()}  # the warm-up step counted too
    return dict(spent, **{"backward, optimizer, images": total - sum(spent.values())}), total


def peak_memory_mb():
    """GPU memory allocated where there is a GPU, else the process's resident RAM (files.peak_memory)."""
    memory = files.peak_memory()
    return 1024 * memory.get("peak_gpu_gib", memory["peak_ram_gib"])


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

class Table:
    """Rows of (work, unit, ours per second, naive per second, peak MiB), each printed when measured."""

    def __init__(self):
        self.rows = []
        print(f"{'work':34s} {'unit':10s} {'ours':>10s} {'naive':>10s} {'ratio':>7s} {'peak MiB':>9s}", flush=True)

    def measure(self, work, unit, count, fn_ours, fn_naive, repeats):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        try:
            a, b = timed(fn_ours, repeats), timed(fn_naive, repeats) if fn_naive else None
        except torch.cuda.OutOfMemoryError:
            raise common.SailError(f"out of GPU memory in {work}: use fewer --pairs / --images, "
                                      "or --gradient-checkpointing") from None
        a, b, peak = count / a, b and count / b, peak_memory_mb()
        self.rows.append((work, unit, a, b, peak))
        naive, ratio = (f"{b:10.2f}", f"{a / b:6.2f}x") if b else (f"{'':10s}", f"{'':7s}")
        print(f"{work:34s} {unit:10s} {a:10.2f} {naive} {ratio} {peak:9.0f}", flush=True)
        return a


def bench_training(job, table, args):
    """04's train_step against the straightforward step, cache off, then cached, then the breakdown and
    (--speed-flags) channels-last and compile added in turn, on the same job."""
    pairs, steps = job.args.batch_size, itertools.count()
    job.latent_cache = batches.LatentCache([], 0)
    rates = dict(train=table.measure("DPO step (04 train_step)", "pairs/s", pairs,
                                     lambda: train.train_step(job, next(steps)),
                                     lambda: straightforward_step(job, next(steps)), args.steps))
    job.latent_cache = batches.LatentCache([r["_index"] for r in job.pairs] * 10_000, 2**40)  # every pair comes back
    table.measure("DPO step, latents cached", "pairs/s", pairs, lambda: train.train_step(job, next(steps)),
                  lambda: straightforward_step(job, next(steps)), args.steps)
    job.latent_cache = batches.LatentCache([], 0)
    parts, total = step_breakdown(job, steps, args.steps)
    for name in (n for n in args.speed_flags if n != "fuse-qkv"):  # fusing replaces trained layers: inference only
        for unet in (job.accelerator.unwrap_model(job.unet), job.ref_unet):
            models.speed_up(unet, **SPEED_FLAGS[name])
        table.measure(f"DPO step + {name}", "pairs/s", pairs, lambda: train.train_step(job, next(steps)), None, args.steps)
    return rates, parts, total


def bench_inference(job, table, args, preset, dtype):
    """Generation and self-reward with the start model's pipeline; the trained UNet is scored against it."""
    device, res, n_img = job.device, preset["resolution"], args.images or preset["gen_batch"]
    pipe, scored = job.pipe, job.accelerator.unwrap_model(job.unet).to(dtype).eval().requires_grad_(False)
    models.use_sampler(pipe, preset["sampler"])
    gen = lambda batch: pipe(prompt=[PROMPT] * batch, num_inference_steps=preset["steps"], guidance_scale=preset["cfg"],
                             height=res, width=res, output_type="latent")
    with torch.inference_mode():
        rates = dict(gen=table.measure("generation", "images/s", n_img, lambda: gen(n_img),
                                       lambda: [gen(1) for _ in range(n_img)], 1))
        noise_scheduler = dpo.forward_process(pipe.scheduler)
        lat = torch.randn(N_IMAGES, 4, res // 8, res // 8, device=device, dtype=dtype)
        noise = torch.randn_like(lat[:1])
        one = batches.encode_prompts(pipe, [PROMPT], device)

        def score_naive():
            for i in range(lat.shape[0]):
                for _ in range(DRAWS):
                    cond = batches.encode_prompts(pipe, [PROMPT], device)
                    t = torch.randint(0, 1000, (1,), device=device)
                    x = noise_scheduler.add_noise(lat[i:i + 1], noise, t)
                    for unet in (scored, pipe.unet):
                        dpo.per_sample_error(dpo.unet_call(unet, x, t, cond, res), noise)
        rates["reward"] = table.measure(f"self-reward (K={DRAWS})", "rewards/s", N_IMAGES,
                                        lambda: self_reward.self_rewards(scored, pipe.unet, pipe.scheduler, lat, one, res, DRAWS,
                                                                       batch_size=preset["reward_batch"]), score_naive, 1)
        for name in args.speed_flags:
            models.speed_up(pipe.unet, **SPEED_FLAGS[name])
            table.measure(f"generation + {name}", "images/s", n_img, lambda: gen(n_img), None, 1)
    return rates


def main(args):
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    device = models.pick_device()
    preset = settings.get_preset(args.preset)
    dtype = models.inference_dtype(device, preset["mixed_precision"])
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        init = (write_random_pipeline(preset["arch"], folder / "model", device, dtype, preset["sampler"])
                if args.random_weights else args.preset)
        job = training_job(init, args, folder / "run")
        name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
        weights = "random weights, released architecture" if args.random_weights else "weights of the preset"
        unet_params = sum(p.numel() for p in job.ref_unet.parameters())
        print(f"preset {args.preset} ({weights}) on {name}; UNet {unet_params / 1e6:.1f} M parameters at {preset['resolution']} "
              f"px; DPO step of {job.args.batch_size} pairs ({job.args.optimizer}, {job.args.mixed_precision} mixed precision"
              f"{', gradient checkpointing' if job.args.gradient_checkpointing else ''}), {args.images or preset['gen_batch']} "
              f"images, {N_IMAGES} images x {DRAWS} draws", flush=True)
        table = Table()
        rates, parts, step_seconds = bench_training(job, table, args)
        rates.update(bench_inference(job, table, args, preset, dtype))
    print(f"peak memory {max(r[4] for r in table.rows):.0f} MiB")
    print(f"\nwhere a DPO step's {step_seconds * 1000:.0f} ms go (04 train_step, cache off):")
    for part, seconds in parts.items():
        print(f"  {part:30s} {seconds * 1000:9.1f} ms {100 * seconds / step_seconds:5.1f}%")
    print_estimate(preset, args.preset, rates)


def print_estimate(preset, name, rates):
    estimate = paper_run_estimate(preset["arch"], rates, preset.get("epochs", 1))
    print(f"\nESTIMATE from the rates above (ours), not a measurement: the paper's {preset['arch']} run, "
          f"{len(PAPER_RUNS[preset['arch']])} iterations after the seed DPO, at {name}'s resolution and steps.")
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
    p.add_argument("--speed-flags", nargs="*", choices=SPEED_FLAGS, help="also time these options (all when none are "
                   "named), each added to those before it: " + ", ".join(SPEED_FLAGS))
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.speed_flags = list(SPEED_FLAGS) if args.speed_flags == [] else args.speed_flags or []
    return args


if __name__ == "__main__":
    common.run_stage(main, parse_args())
