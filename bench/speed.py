"""Speed of the kit's own code next to a straightforward implementation of the same work, with the
FLOPs of each timed unit and the share of the device's peak they reach (MFU).

Prints, for one preset, one row per timed work: units/s (ours, and the straightforward code where
there is one), peak memory (GPU: per row; CPU: the process's), TFLOP per unit (counted once with
FlopCounterMode on the very function timed, bench/flops.py), TFLOP/s and MFU against the device's
dense bf16 peak (a table by device name; --peak-tflops overrides it; on the CPU TFLOP/s only):
  * DPO training with the step 04_train.py runs (sail/trainer.py: `train_step` on the job `start` builds) on a pair file of
    noise images. One micro batch per step against a straightforward step on the same batch (per
    side: images VAE-encoded, prompts encoded, trained UNet and reference called), latent cache off
    in both (one epoch, the paper's setting, reuses nothing); the cached step is its own row; then
    where a micro-batch step's time goes. Then a whole optimizer step at the preset's effective batch
    (--batch-size pairs in micro batches accumulated by accelerate, as the run trains).
  * generation images/s (--gen-batch prompts per pipeline call vs one image per call) and self-reward
    rewards/s (--reward-batch draws per UNet call vs one UNet call per image and draw).
  * --speed-flags [NAME ...]: the options that only pay on a GPU, each added to those before it.
  * --profile DIR: a torch profiler trace of one micro-batch training step (Chrome trace JSON, for
    Perfetto or chrome://tracing).
Then an estimate of the paper's full run per stage, on 1 and on 8 such devices, with its MFU.

    python -m bench.speed                       # tiny-sd15 on the CPU
    python -m bench.speed --preset toy --steps 5   # the toy world's model (python -m toy.base builds it)
    python -m bench.speed --preset sd15         # on a GPU, with the real weights (or $SAIL_SD15_PATH)
    python -m bench.speed --preset sdxl --random-weights --speed-flags   # on a GPU, no download

--random-weights saves the preset's released architecture with random weights as a pipeline folder
that the job loads like any other (bench/random_weights.py). Timings are never asserted.
"""
import argparse
import dataclasses
import gc
import itertools
import os
import tempfile
from pathlib import Path

import torch

from bench import estimate, flops, random_weights
from bench.rows import Table, sync
from bench.steps import (
    inference_fns,
    step_breakdown,
    straightforward_step,
    write_pair_files,
)
from sail import batches, common, models, settings, trainer

SPEED_FLAGS = {"channels-last": dict(channels_last=True), "fuse-qkv": dict(fuse_qkv=True),
               "compile-regional": dict(compile="regional"), "compile": dict(compile=True)}
DEFAULT_SPEED_FLAGS = ["channels-last", "fuse-qkv", "compile-regional"]  # --speed-flags alone; compile by name


def training_args(argv, **paths):
    """04_train.py's arguments: its settings, parsed from the very declaration 04's parser adds
    (sail/settings.py), and the paths it resolves."""
    args = settings.add_arguments(argparse.ArgumentParser(), "train").parse_args([str(a) for a in argv])
    return argparse.Namespace(**vars(args), run=None, iter=None, export_pipeline=None, **paths)


def training_job(init, args, folder, name, batch, micro):
    """04_train.py's own job (sail/trainer.py's start: models, optimizer, accelerate, mixed precision) on `batch` pairs
    of noise images at the preset's resolution, trained in micro batches of `micro` pairs (None: the
    run's default); nothing saved (folder/name/ckpt) while timed."""
    preset = settings.get_preset(args.preset)
    pairs = write_pair_files(folder, preset["resolution"], batch, min(batch, micro or preset["micro_batch"]))
    argv = ["--batch-size", batch, *(["--micro-batch", micro] if micro else []), "--max-steps", 10_000,
            "--save-every", 0, "--log-every", 10_000, "--lr", 1e-9, "--empty-prompt-prob", 0,
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    level = common.log.level
    common.log.setLevel("WARNING")  # the stage's own log lines would interleave with the table
    try:
        job = trainer.start(training_args(argv, init=str(init), preset=args.preset, pairs=pairs,
                                          out=folder / name / "ckpt"))
    finally:
        common.log.setLevel(level)
    job.latent_cache = batches.LatentCache([], 0)  # cache off: at one epoch no pair comes back
    return job


def release(job):
    """Frees a job's models before the next is built (one job's memory at a time)."""
    job.accelerator.free_memory()
    for field in dataclasses.fields(job):
        setattr(job, field.name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_micro_batch(job, table, args):
    """04's train_step (sail/trainer.py) on one micro batch per step against the straightforward step, cache off, then
    cached, then the breakdown, the profile and (--speed-flags) each option added in turn."""
    pairs, steps = job.args.batch_size, itertools.count()
    ours = lambda: trainer.train_step(job, next(steps))
    naive = (lambda: straightforward_step(job, next(steps))) if args.naive else None
    table.measure("DPO micro batch (04 train_step)", "pairs/s", pairs, ours, naive, args.steps)
    job.latent_cache = batches.LatentCache([r["_index"] for r in job.pairs] * 10_000, 2**40)  # every pair comes back
    ours()  # fills the cache, so that the counted warm-up step reads it too
    table.measure("DPO micro batch, latents cached", "pairs/s", pairs, ours, naive, args.steps)
    job.latent_cache = batches.LatentCache([], 0)
    parts, total = step_breakdown(job, ours, args.steps)
    if args.profile:
        write_profile(ours, args.profile / profile_name(args.preset))
    plain = table.row("DPO micro batch (04 train_step)").flops
    for name in (n for n in args.speed_flags if n != "fuse-qkv"):  # fusing replaces trained layers: inference only
        for unet in (job.accelerator.unwrap_model(job.unet), job.ref_unet):
            models.speed_up(unet, **SPEED_FLAGS[name])
        table.measure(f"DPO micro batch + {name}", "pairs/s", pairs, ours, None, args.steps, flops=plain)
    return parts, total


def bench_step(job, table, args):
    """A whole optimizer step at the effective batch, as the run trains it: the run's rate."""
    steps, batch = itertools.count(), job.args.batch_size
    name = f"DPO step, {batch} pairs = {batch // job.micro} x {job.micro}"
    return table.measure(name, "pairs/s", batch, lambda: trainer.train_step(job, next(steps)), None, args.step_repeats)


def bench_inference(job, table, args, preset, dtype):
    """Generation and self-reward with the start model's pipeline; the trained UNet is scored against it."""
    pipe, scored = job.pipe, job.accelerator.unwrap_model(job.unet).to(dtype).eval().requires_grad_(False)
    models.use_sampler(pipe, preset["sampler"])
    gen_batch, reward_batch = args.gen_batch or preset["gen_batch"], args.reward_batch or preset["reward_batch"]
    with torch.inference_mode():
        fns = inference_fns(pipe, scored, preset, job.device, dtype, gen_batch, reward_batch, args.reward_images)
        naive = lambda pair: pair if args.naive else (pair[0], None)
        rates = dict(gen=table.measure("generation", "images/s", gen_batch, *naive(fns["gen"]), 1),
                     reward=table.measure(f"self-reward (K={estimate.DRAWS})", "rewards/s", args.reward_images,
                                          *naive(fns["reward"]), 1))
        plain = {"gen": table.rows[-2].flops, "reward": table.rows[-1].flops}
        for name in args.speed_flags:
            for unet in (pipe.unet, scored):
                models.speed_up(unet, **SPEED_FLAGS[name])
            table.measure(f"generation + {name}", "images/s", gen_batch, fns["gen"][0], None, 1, flops=plain["gen"])
            table.measure(f"self-reward + {name}", "rewards/s", args.reward_images, fns["reward"][0], None, 1,
                          flops=plain["reward"])
    return rates


def profile_name(preset):
    return f"train_step-{preset}.json"


def write_profile(fn, path):
    """A torch profiler trace of one call of fn (Chrome trace JSON), written under a temporary name."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        sync()
    tmp = path.with_name(path.name + ".tmp")
    prof.export_chrome_trace(str(tmp))
    os.replace(tmp, path)
    print(f"wrote {path} (a torch profiler trace of one training step: Perfetto or chrome://tracing)", flush=True)


def main(args):
    """Every row of the table, then the breakdown and the estimate; returns the table (the tests read it)."""
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    device = models.pick_device()
    preset = settings.get_preset(args.preset)
    dtype = models.inference_dtype(device, preset["mixed_precision"])
    peak, device_name, peak_source = flops.device_peak(args.peak_tflops)
    micro, batch = args.micro_batch or preset["micro_batch"], args.batch_size or preset["batch_size"]
    check_args(args)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        init = (random_weights.write_random_pipeline(preset["arch"], folder / "model", device, dtype, preset["sampler"])
                if args.random_weights else args.preset)
        job = training_job(init, args, folder / "run", "micro", micro, micro)
        print_header(args, preset, job, device_name, peak, peak_source)
        table = Table(peak)
        parts, step_seconds = bench_micro_batch(job, table, args)
        release(job)
        job = training_job(init, args, folder / "run", "step", batch, args.micro_batch)
        rates = dict(train=bench_step(job, table, args))
        rates.update(bench_inference(job, table, args, preset, dtype))
        unit_flops = flops.unit_flops(job.pipe, preset["resolution"], preset["steps"], preset["cfg"], estimate.DRAWS,
                                      job.args.gradient_checkpointing)
        release(job)
    print(f"peak memory {max(r.peak for r in table.rows):.0f} MiB")
    print(f"\nwhere a DPO micro-batch step's {step_seconds * 1000:.0f} ms go (04 train_step, cache off):")
    for part, seconds in parts.items():
        print(f"  {part:30s} {seconds * 1000:9.1f} ms {100 * seconds / step_seconds:5.1f}%")
    print("\nthe rates of the estimate, with the FLOPs per unit of bench/flops.py's table:")
    print("\n".join(estimate.rate_lines(rates, unit_flops, peak)))
    lines, _ = estimate.estimate_lines(preset["arch"], rates, unit_flops, peak, preset.get("epochs", 1))
    print("\n" + "\n".join(lines))
    table.unit_flops = unit_flops
    return table


def check_args(args):
    if {"compile", "compile-regional"} <= set(args.speed_flags):
        raise common.SailError("--speed-flags: compile and compile-regional are two ways to compile the same UNet; "
                               "name one")
    if args.profile:
        if (args.profile / profile_name(args.preset)).exists():
            raise common.SailError(f"{args.profile / profile_name(args.preset)} exists; not overwriting it (delete it "
                                   "or choose another --profile folder)")
        args.profile.mkdir(parents=True, exist_ok=True)


def print_header(args, preset, job, device_name, peak, peak_source):
    weights = "random weights, released architecture" if args.random_weights else "weights of the preset"
    unet_params = sum(p.numel() for p in job.ref_unet.parameters())
    a = job.args
    print(f"preset {args.preset} ({weights}) on {device_name}; UNet {unet_params / 1e6:.1f} M parameters at "
          f"{preset['resolution']} px; DPO ({a.optimizer}, {a.mixed_precision} mixed precision"
          f"{', gradient checkpointing' if a.gradient_checkpointing else ''}) in micro batches of {job.micro} pairs, "
          f"steps of {args.batch_size or preset['batch_size']} pairs; generation {args.gen_batch or preset['gen_batch']} "
          f"images per call; self-reward {args.reward_images} images x {estimate.DRAWS} draws, "
          f"{args.reward_batch or preset['reward_batch']} per call", flush=True)
    print(f"peak {peak:g} TFLOP/s dense bf16 ({peak_source})" if peak else f"no MFU: {peak_source}", flush=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-sd15")
    p.add_argument("--random-weights", action="store_true", help="the preset's released architecture, random weights")
    p.add_argument("--micro-batch", type=int, help="pairs per micro batch (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="pairs per optimizer step of the effective-batch row "
                                                  "(default: the preset's, 128 for sd15 and sdxl)")
    p.add_argument("--gen-batch", type=int, help="images per generation call (default: the preset's)")
    p.add_argument("--reward-batch", type=int, help="UNet inputs per self-reward call (default: the preset's)")
    p.add_argument("--reward-images", type=int, default=estimate.N_IMAGES, help="images scored per self-reward row "
                   "(default: one prompt's candidates, N)")
    p.add_argument("--no-naive", dest="naive", action="store_false", help="time only the kit's code, not the "
                   "straightforward implementation beside it")
    p.add_argument("--steps", type=int, default=3, help="timed micro-batch steps")
    p.add_argument("--step-repeats", type=int, default=1, help="timed optimizer steps at the effective batch")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak (default: bench/flops.py's table)")
    p.add_argument("--profile", type=Path, help="write a torch profiler trace of one training step into this folder")
    p.add_argument("--speed-flags", nargs="*", choices=SPEED_FLAGS, help="also time these options, each added to those "
                   f"before it (none named: {', '.join(DEFAULT_SPEED_FLAGS)}); compile: torch.compile of the whole UNet, "
                   "compile-regional: of its repeated transformer blocks")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.speed_flags = list(DEFAULT_SPEED_FLAGS) if args.speed_flags == [] else args.speed_flags or []
    return args


if __name__ == "__main__":
    common.run_stage(main, parse_args())
