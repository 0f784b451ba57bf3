"""The paper's full run estimated from measured rates: per stage, its work, time on 1 and on 8 devices,
and with FLOPs per unit (bench/flops.py) the TFLOP/s it runs at and its MFU. bench/speed.py prints it
from steady rates, tools/preflight.py logs it from its short stage runs: the same rates (pairs/s of
a whole optimizer step, images/s of a pipeline call, rewards/s at K = 10) and the same FLOP table.
"""
import math

from bench.flops import utilisation

# The paper's runs (section 5.1): seed DPO on 50K human pairs, then one pool of prompts per
# iteration, N = 8 images each, K = 10 reward draws, 25% human pairs in each training mix.
PAPER_RUNS = {"sd15": [10_000, 20_000, 20_000], "sdxl": [10_000, 20_000]}
SEED_PAIRS, N_IMAGES, DRAWS, HUMAN_SHARE = 50_000, 8, 10, 0.25
WORKLOADS = {"train": "DPO", "gen": "generation", "reward": "self-reward"}


def paper_run_estimate(arch, rates, epochs, batch=128):
    """(stage, work, seconds on one device, workload) for the paper's run of `arch`, from measured rates
    (rates: train pairs/s, gen images/s, reward rewards/s with K = DRAWS)."""
    steps = lambda pairs: math.ceil(pairs * epochs / batch)
    rows = [("iter 0 DPO (seed)", f"{steps(SEED_PAIRS):,} steps x {batch} pairs", steps(SEED_PAIRS) * batch / rates["train"],
             "train")]
    for i, prompts in enumerate(PAPER_RUNS[arch], 1):
        images = prompts * N_IMAGES
        pairs = prompts + round(prompts * HUMAN_SHARE / (1 - HUMAN_SHARE))  # a pair per prompt, plus human pairs
        rows += [(f"iter {i} generation", f"{prompts:,} prompts x {N_IMAGES} images", images / rates["gen"], "gen"),
                 (f"iter {i} self-reward", f"{images:,} images x K={DRAWS} x 2 UNets", images / rates["reward"],
                  "reward"),
                 (f"iter {i} DPO", f"{steps(pairs):,} steps x {batch} pairs", steps(pairs) * batch / rates["train"],
                  "train")]
    return rows


def duration(seconds):
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def percent(mfu):
    return f"{100 * mfu:.1f}%" if mfu is not None else "-"


def rate_lines(rates, flops, peak):
    """One line per workload: its rate, TFLOP per unit, TFLOP/s and MFU."""
    units = {"train": "pairs/s", "gen": "images/s", "reward": "rewards/s"}
    lines = []
    for key, name in WORKLOADS.items():
        tflops, mfu = utilisation(flops[key], rates[key], peak)
        lines.append(f"  {name:12s} {rates[key]:10.3f} {units[key]:10s} {flops[key] / 1e12:10.4g} TFLOP/unit "
                     f"{tflops:10.4g} TFLOP/s  MFU {percent(mfu)}")
    return lines


def estimate_lines(arch, rates, flops, peak, epochs=1, label="the rates above"):
    """The estimate as printable lines (a header, one line per stage, the total with its overall MFU)."""
    rows = paper_run_estimate(arch, rates, epochs)
    lines = [f"ESTIMATE from {label}, not a measurement: the paper's {arch} run, {len(PAPER_RUNS[arch])} iterations "
             "after the seed DPO.",
             "Counted FLOPs: UNets, text encoders and (DPO) VAE encoding; no VAE decoding, files or model loading. "
             "8 devices assume linear scaling."]
    lines.append(f"{'stage':22s} {'work':34s} {'TFLOP/s':>9s} {'MFU':>6s} {'1 device':>10s} {'8 devices':>10s}")
    total_seconds = total_flops = 0.0
    for stage, work, seconds, key in rows:
        tflops, mfu = utilisation(flops[key], rates[key], peak)
        total_seconds, total_flops = total_seconds + seconds, total_flops + tflops * 1e12 * seconds
        lines.append(f"{stage:22s} {work:34s} {tflops:9.4g} {percent(mfu):>6s} {duration(seconds):>10s} "
                     f"{duration(seconds / 8):>10s}")
    tflops, mfu = utilisation(total_flops, 1 / total_seconds, peak)
    lines.append(f"{'total':22s} {'':34s} {tflops:9.4g} {percent(mfu):>6s} {duration(total_seconds):>10s} "
                 f"{duration(total_seconds / 8):>10s}")
    return lines, dict(total_seconds=round(total_seconds), total_tflop=round(total_flops / 1e12, 3),
                       mfu=mfu and round(mfu, 4), stages=[dict(stage=s, work=w, seconds=round(t)) for s, w, t, _ in rows])
