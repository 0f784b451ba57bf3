"""Preflight: one short pass of the whole loop on the real models, before a run of days.

Command:
    python -m tools.preflight --preset sdxl
is the same as
    bash run_all.sh sdxl 2 --check

It loads the preset's model (the hub cache, or SAIL_SD15_PATH / SAIL_SDXL_PATH), compares its
configs with the released ones (configs.py) and checks that losses and rewards noise with
DDPM's forward process whatever sampler the folder ships. Then, in a scratch run folder, it runs
the stages themselves at reduced size, each as its own process as run_all.sh starts it: 01
(2 prompts x 2 images from the base model), 00 (two DPO steps on two pairs made of those images),
a reload of the saved checkpoint, 02 (the self-reward with K = 2) and one score per evaluation
metric whose package is installed. It prints time and peak memory per unit (a stage's: its own
process's, from its timing file) and a rough estimate of the paper's run from the stages' rates
with bench/speed.py's FLOP table (bench/estimate.py): TFLOP/s and, on a GPU in the peak table,
MFU. It stops at the first problem with one message (exit 2).

Reads:  the model; the metric models of the installed metrics (--metrics chooses).
Writes: <out>/ (default runs/preflight-<preset>, replaced on each start): the scratch run, its
        logs, and preflight.json (checks, times, peak memory, estimate).
"""
import argparse
import gc
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import estimate, flops
from sail import common, configs, dpo, files, models
from sail.metrics import check_metric, load_scorer
from sail.settings import get_preset

log = logging.getLogger("sail")
REAL_METRICS = ("pickscore", "hpsv2", "hpsv2.1", "imagereward", "aesthetic")
TINY_METRICS = ("tiny-pickscore", "tiny-aesthetic", "tiny-imagereward")
PREFLIGHT_DRAWS = 2
KIT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red fox sitting in fresh snow, photograph", "an old lighthouse on a cliff at dusk, oil painting"]


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="sd15, sdxl, or a tiny preset (tests)")
    p.add_argument("--out", type=Path, help="scratch run folder (default runs/preflight-<preset>)")
    p.add_argument("--metrics", help="comma-separated metrics to try (default: every installed one)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: bench/flops.py's "
                                                     "table by device name)")
    return p


def peak_memory():
    """Peak GPU memory since the last reset, or the process's peak resident memory on the CPU (GiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Units:
    """Times each unit of work, records its peak memory, and turns the first failure into one message."""

    def __init__(self):
        self.rows = []

    def run(self, name, fn, peak=peak_memory):
        """fn(), timed; `peak` gives the unit's peak memory afterwards (default: this process's)."""
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        start = time.time()
        try:
            result = fn()
        except common.SailError as err:
            raise common.SailError(f"preflight stopped at '{name}': {err}") from None
        except Exception as err:  # an unexpected library error: still one line, with its kind
            raise common.SailError(f"preflight stopped at '{name}': {type(err).__name__}: {err}") from err
        seconds = time.time() - start
        self.rows.append(dict(unit=name, seconds=round(seconds, 2), peak_gib=round(peak(), 2)))
        log.info("ok  %-28s %8.1f s   peak %.2f GiB", name, seconds, self.rows[-1]["peak_gib"])
        return result


def config_differences(pipe, arch):
    """(setting, found, released) for every released setting the model folder does not keep."""
    released = configs.released_configs(arch)
    settings = [("scheduler", key, pipe.scheduler.config.get(key), value) for key, value in released["scheduler"].items()
                if not key.startswith("_")]
    settings += [("scheduler", "class", type(pipe.scheduler).__name__, released["scheduler"]["_class_name"])]
    settings += [("vae", key, pipe.vae.config.get(key), released["vae"][key])
                 for key in ("scaling_factor", "force_upcast", "latent_channels", "act_fn")]
    out = [(f"{part}.{key}", got, value) for part, key, got, value in settings if got != value]
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if arch == "sdxl" else [])
    for i, (encoder, text) in enumerate(zip(encoders, released["text"])):
        if encoder.config.hidden_act != text["hidden_act"]:
            out.append((f"text_encoder{'_2' if i else ''}.hidden_act", encoder.config.hidden_act, text["hidden_act"]))
    return out


def check_model(pipe, arch):
    """The settings the kit relies on. Differences from the released configs are listed (a fine-tune
    may change some on purpose); what would make training wrong stops the preflight."""
    differences = config_differences(pipe, arch)
    for setting, got, released in differences:
        log.info("note: %s is %r, the released model has %r", setting, got, released)
    unet = pipe.unet.config
    if arch == "sdxl":
        expected = configs.TIME_IDS * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
        if unet.projection_class_embeddings_input_dim != expected:
            raise common.SailError(f"the UNet takes {unet.projection_class_embeddings_input_dim} added inputs, not 6 time ids "
                               f"x {unet.addition_time_embed_dim} + the pooled text ({expected}): not an SDXL base UNet")
    noising = dpo.forward_process(pipe.scheduler)
    abar = noising.alphas_cumprod[999].item()
    noisy = noising.add_noise(torch.ones(1, 1), torch.zeros(1, 1), torch.tensor([999]))
    if abs(noisy.item() - math.sqrt(abar)) > 1e-6 or abar > 0.01:
        raise common.SailError(f"training would noise with {type(noising).__name__} (x0 scale {noisy.item():.4f} at t = 999, "
                           f"expected sqrt(abar) = {math.sqrt(abar):.4f} with abar < 0.01)")
    prediction = getattr(pipe.scheduler.config, "prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise common.SailError(f"prediction_type '{prediction}' is not supported (epsilon or v_prediction)")
    return dict(noising=type(noising).__name__, sampler_shipped=type(pipe.scheduler).__name__, prediction_type=prediction,
                differences=[dict(setting=s, found=str(g), released=str(r)) for s, g, r in differences])


def stage(script, *argv):
    """A stage as its own process, as run_all.sh starts it; its log goes to stdout as it runs, its
    error line (or the last line of a crash) becomes the preflight's."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(KIT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(KIT / script), *[str(a) for a in argv]], env=env, stderr=subprocess.PIPE,
                          text=True)
    sys.stderr.write(done.stderr)
    if done.returncode:
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
        raise common.SailError(errors[-1] if errors else f"{script} exited with status {done.returncode}"
                               f"{': ' + lines[-1] if lines else ''}")


def child_peak(timing):
    """A stage's peak memory in GiB: GPU memory where it used a GPU, else resident RAM, from its timing
    file; without one, the largest resident RAM of any finished child process."""
    if Path(timing).is_file():
        info = json.loads(Path(timing).read_text())
        return info.get("peak_gpu_gib", info["peak_ram_gib"])
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20


def installed_metrics(names):
    usable = []
    for name in names:
        try:
            check_metric(name)
            usable.append(name)
        except common.SailError as err:
            log.info("skip metric %s: %s", name, err)
    return usable


def score_images(metric, run, device):
    gens = files.read_jsonl(run / "base" / "generations.jsonl")
    images = [files.load_image(run / "base" / g["image"]) for g in gens]
    values = load_scorer(metric, device=device)([g["prompt"] for g in gens], images)
    bad = [g["image"] for g, v in zip(gens, values) if not math.isfinite(v)]
    if bad:
        raise common.SailError(f"{metric} gave a non-finite score to {bad[0]}")
    return values


def reload_checkpoint(ckpt, preset):
    desc = models.describe_model(ckpt)
    trained, base = models.load_unet(desc).state_dict(), models.load_unet(models.describe_model(preset)).state_dict()
    if not all(torch.isfinite(v).all() for v in trained.values()):
        raise common.SailError(f"{ckpt}: the saved UNet holds non-finite weights")
    if all(torch.equal(trained[k], base[k]) for k in base):
        raise common.SailError(f"{ckpt}: two DPO steps changed no weight")


def main(args):
    preset = get_preset(args.preset)
    run = Path(args.out or f"runs/preflight-{args.preset}")
    if run.is_dir() and any(run.iterdir()) and not (run / "preflight.args.json").is_file():
        raise common.SailError(f"{run} exists and is not a preflight folder; not replacing it (choose another --out)")
    shutil.rmtree(run, ignore_errors=True)
    common.setup_logging(run, "preflight")
    files.save_args(run, "preflight", args)
    device = models.pick_device()
    units = Units()
    log.info("preflight of preset %s (%s) on %s", args.preset, preset["model"],
             torch.cuda.get_device_name() if torch.cuda.is_available() else "the CPU")
    desc = units.run("load model", lambda: models.describe_model(args.preset))
    pipe = units.run("load pipeline", lambda: models.load_pipeline(desc, device, models.inference_dtype(device, preset["mixed_precision"])))
    checks = units.run("check configs and noising", lambda: check_model(pipe, desc.arch))
    shapes = flops.meta_pipeline(pipe)  # the models' shapes, for the FLOPs per unit at the end
    pipe = None  # frees it: the stages load their own
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    files.write_jsonl_atomic(run / "pools" / "base.jsonl", [dict(prompt_id=f"p{i}", prompt=p) for i, p in enumerate(PROMPTS)])
    units.run("01 generate 2x2 images", lambda: stage("01_generate.py", "--ckpt", args.preset, "--num-candidates", 2,
                                                        "--pool", run / "pools" / "base.jsonl", "--out", run / "base"),
              peak=lambda: child_peak(run / "base" / "generate.0.timing.json"))
    gens = files.read_jsonl(run / "base" / "generations.jsonl")
    files.write_jsonl_atomic(files.seed_pairs_path(run), [
        dict(prompt=g["prompt"], prompt_id=g["prompt_id"], image_w=f"../base/{g['image']}",
             image_l=f"../base/{h['image']}", source="human") for g, h in zip(gens[0::2], gens[1::2])])
    train_dir = files.iteration_dir(run, 0)
    units.run("00 seed DPO, 2 steps", lambda: stage("00_seed_dpo.py", "--run", run, "--preset", args.preset,
                                                      "--max-steps", 2, "--batch-size", 2, "--lr", 1e-5, "--save-every", 0),
              peak=lambda: child_peak(train_dir / "train.timing.json"))
    ckpt = files.checkpoint_dir(run, 0)
    units.run("reload the checkpoint", lambda: reload_checkpoint(ckpt, args.preset))
    units.run("02 self-reward, K=2", lambda: stage("02_self_reward.py", "--ckpt", ckpt, "--dir", run / "base",
                                                    "--draws", PREFLIGHT_DRAWS),
              peak=lambda: child_peak(run / "base" / "self_reward.0.timing.json"))
    tiny = args.preset.startswith("tiny")
    metrics = args.metrics.split(",") if args.metrics else installed_metrics(TINY_METRICS if tiny else REAL_METRICS)
    scores = {m: units.run(f"score {m}", lambda m=m: score_images(m, run, device)) for m in metrics}
    unit_flops = units.run("count FLOPs per unit", lambda: stage_flops(shapes, run))
    rough = rough_estimate(run, desc.arch, unit_flops, flops.device_peak(args.peak_tflops))
    files.write_json_atomic(run / "preflight.json", dict(preset=args.preset, model=preset["model"], checks=checks,
                                                       units=units.rows, scores=scores, estimate=rough))
    log.info("preflight passed: %d units; wrote %s", len(units.rows), run / "preflight.json")


def stage_flops(shapes, run):
    """bench/flops.py's FLOPs per unit at the settings the stages ran with (their args files)."""
    gen = json.loads((run / "base" / "generate.args.json").read_text())
    train = json.loads((files.iteration_dir(run, 0) / "train.args.json").read_text())
    return flops.unit_flops(shapes, gen["resolution"], gen["steps"], gen["cfg"], estimate.DRAWS,
                            bool(train["gradient_checkpointing"]))


def rough_estimate(run, arch, unit_flops, peak):
    """The paper's run from the rates the stages measured after loading their models: rough, since
    2 images and 2 steps carry the warm-up; `python -m bench.speed --preset <preset>` measures steady
    rates. peak: flops.device_peak's (TFLOP/s or None, device, source)."""
    rate = lambda name: json.loads((run / name).read_text())["rate"]
    rates = dict(gen=rate("base/generate.0.timing.json"), train=rate(f"{files.iteration_name(0)}/train.timing.json"),
                 reward=rate("base/self_reward.0.timing.json") * PREFLIGHT_DRAWS / estimate.DRAWS)  # UNet passes scale with K
    peak_tflops, device, source = peak
    log.info("rates of the stages on %s (%s):", device, f"peak {peak_tflops:g} TFLOP/s, {source}" if peak_tflops else source)
    for line in estimate.rate_lines(rates, unit_flops, peak_tflops):
        log.info("%s", line)
    lines, summary = estimate.estimate_lines(arch, rates, unit_flops, peak_tflops, label="the stages' rates (rough)")
    for line in lines:
        log.info("%s", line)
    log.info("estimate total on one device: %s (rough; steady rates: python -m bench.speed)",
             estimate.duration(summary["total_seconds"]))
    utilisation = {key: dict(zip(("tflops", "mfu"), flops.utilisation(unit_flops[key], rates[key], peak_tflops)))
                   for key in rates}
    return dict(summary, rates=rates, tflop_per_unit={k: v / 1e12 for k, v in unit_flops.items()},
                utilisation=utilisation, peak_tflops=peak_tflops)


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
