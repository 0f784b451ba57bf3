"""The toy study's learning rates: DPO on all labels and SAIL, each at several learning rates (DPO
also at several step counts), so that SAIL is compared with a baseline tuned as its users would tune it.
Results so far: toy/RESULTS.md.

Tune on the data seeds that tuned the toy world (0 and 1), then report the chosen values on the
study's seeds (2, 3, 4), which no one tuned on:
    python -m toy.study_lr --out runs/lr_tune --seeds 0 1 --jobs 2 --threads 1
    python -m toy.study_lr --out runs/lr_study --seeds 2 3 4 --dpo 1e-4:100 1e-6:300 --sail-lrs 1e-6 --jobs 3 --threads 1
With the noisy human (every label by toy/data.py's rater at T = 0.2), DPO on all labels only:
    python -m toy.study_lr --out runs/noisy_lr --seeds 2 3 --rater-noise 0.2 --dpo 1e-4:100 1e-6:300 --sail-lrs --jobs 2 --threads 1
The plumbing on tiny random-weight models:
    python -m toy.study_lr --out /tmp/lr --preset tiny-sd15 --quick --seeds 0 --dpo 1e-4:2 --sail-lrs 1e-4 --iterations 1

Per seed, in order: the toy's data with every universe pair labelled (toy.data --all-labels, as
toy/study.py makes it); DPO on all labels from the base model for each --dpo LR:STEPS; the SAIL loop
(run_all.sh, iteration 0 included, every DPO stage at that lr) for each --sail-lrs value, on the
same seed pairs and prompt pools; the oracle report of every model (the same eval seeds for all).

Reads:  nothing; the toy base model is built once and cached (python -m toy.base).
Writes: <out>/seed_<s>/ (the data, dpo_lr<lr>_<steps>/ckpt, sail_lr<lr>/ = a run_all.sh run folder,
        eval/, study.log with every stage's output), then <out>/lr_sweep.json (every number per
        seed, stage times), lr_sweep.md (table), lr_sweep.png (gain and caption following against
        lr), lr_sweep.args.json, log.txt. Every stage skips what is finished: rerun to continue.
"""
import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sail import common, files, reports, settings
from toy.results import write_results
from toy.study import (
    KIT,
    StageLog,
    add_study_flags,
    dpo_on_all_labels,
    label_universe,
    run_over_seeds,
    spread,
)

log = logging.getLogger("sail")
MEASURES = ("mean", "delta", "win_rate", "prompt", "taste")


def dpo_setting(text):
    """'3e-5:300' -> (3e-05, 300): a learning rate and a number of steps for DPO on all labels."""
    try:
        lr, steps = text.split(":")
        return float(lr), int(steps)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LR:STEPS, e.g. 3e-5:300") from None


def dpo_name(lr, steps):
    return f"dpo_lr{lr:g}_{steps}"


def sail_name(lr):
    return f"sail_lr{lr:g}"


def share_seed_data(run, folder):
    """The seed's data in a SAIL run folder: pools, eval prompts, the seed pairs and any held-out
    pairs with their images, hard-linked (toy.data would make the same files again).
    seed/pairs.jsonl comes last: run_all.sh takes it as the sign that the data is there."""
    if (folder / "seed" / "pairs.jsonl").is_file():
        return
    (folder / "seed" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "eval").mkdir(exist_ok=True)
    pairs = files.read_jsonl(run / "seed" / "pairs.jsonl")
    names = ["pools/" + p.name for p in sorted((run / "pools").glob("*.jsonl"))]
    names += ["eval/prompts.jsonl", "toy_world.data.json", "seed/stats.json"]
    names += sorted({f"seed/{p[side]}" for p in pairs for side in ("image_w", "image_l")})
    if files.val_pairs_path(run).is_file():  # held-out pairs (toy.data --val-pairs): the drift guard's
        val = files.read_jsonl(files.val_pairs_path(run))
        names += sorted({f"val/{p[side]}" for p in val for side in ("image_w", "image_l")}) + ["val/pairs.jsonl"]
        (folder / "val" / "images").mkdir(parents=True, exist_ok=True)
    (folder / "pools").mkdir(exist_ok=True)
    for name in names:
        if not (folder / name).exists():
            os.link(run / name, folder / name)
    os.link(run / "seed" / "pairs.jsonl", folder / "seed" / "pairs.jsonl")


def run_seed(args, seed, cfg):
    """Every stage of one seed; returns {model name: oracle numbers} and the stage times."""
    run = args.out / f"seed_{seed}"
    run.mkdir(parents=True, exist_ok=True)
    sh = StageLog(run, f"seed {seed}", args.threads)
    data_args = f"--seed {seed} --n-pools {args.iterations} {cfg['data']}".split()
    data_args += ["--rater-noise", str(args.rater_noise)] if args.rater_noise else []
    label_universe(sh, run, args.preset, data_args)
    for lr, steps in args.dpo:
        dpo_on_all_labels(sh, f"DPO on all labels, lr {lr:g}, {steps} steps", run, run / dpo_name(lr, steps) / "ckpt",
                          args.preset, seed, steps, lr)
    sail_steps = cfg["steps"] or settings.get_preset(args.preset)["max_steps"]
    for lr in args.sail_lrs:
        folder = run / sail_name(lr)
        share_seed_data(run, folder)
        sh(f"SAIL lr {lr:g}", "bash", KIT / "run_all.sh", args.preset, args.iterations,
           extra_env=dict(RUN=str(folder), PYTHON=sys.executable, N="8", K=str(cfg["draws"]), EVAL="0", GUARD="off",
                          TRAIN_ARGS=f"--seed {seed} --max-steps {sail_steps} --lr {lr}"))
    results = {}
    for folder in [run] + [run / sail_name(lr) for lr in args.sail_lrs]:
        sh(f"oracle report {folder.name}", sys.executable, "-m", "toy.report", "--run", folder,
           "--images-per-prompt", cfg["images_per_prompt"])
        report = json.loads((folder / "eval" / "oracle_report.json").read_text())
        prefix = "" if folder == run else folder.name + "/"
        results.update({prefix + name: numbers for name, numbers in report.items()})
    return dict(seed=seed, oracle=results, sail_steps=sail_steps, stage_seconds=sh.times)


def rows(args):
    """(key in a seed's results, label, lr, steps) for every model, in table order."""
    out = [("base", "base model", None, None)]
    out += [(dpo_name(lr, steps), "DPO on all labels", lr, steps) for lr, steps in sorted(args.dpo, key=lambda d: (d[1], d[0]))]
    for lr in sorted(args.sail_lrs):
        out += [(f"{sail_name(lr)}/{files.iteration_name(i)}", f"SAIL iteration {i}" if i else "iteration 0: DPO on the seed",
                 lr, None) for i in range(args.iterations + 1)]
    return out


def summarize(args, per_seed):
    table = {}
    for key, _, _, _ in rows(args):
        found = [s["oracle"].get(key) for s in per_seed]
        table[key] = {m: spread([r.get(m) if r else None for r in found]) for m in MEASURES}
    return table


def _cell(stat, sign=False):
    if not stat:
        return "–"
    mean, sd, values = stat
    each = " / ".join(f"{v:{'+' if sign else ''}.3f}" for v in values)
    return f"{mean:{'+' if sign else ''}.3f} ± {sd:.3f} ({each})" if len(values) > 1 else f"{mean:{'+' if sign else ''}.3f}"


def markdown(args, table, per_seed):
    seeds = ", ".join(str(s["seed"]) for s in per_seed)
    lines = [f"## Learning rates: oracle score over data seeds {seeds} (mean ± sd over seeds, then each seed)", "",
             f"SAIL trains {per_seed[0]['sail_steps']} steps per iteration (iteration 0 included) at the row's lr; "
             "caption following and taste are the oracle's two halves."
             + (f" Every label by the noisy rater at T = {args.rater_noise:g}." if args.rater_noise else ""), "",
             "| Model | lr | Steps | Oracle score | vs base | Win rate vs base | Caption following | Taste |",
             "|---|---|---|---|---|---|---|---|"]
    for key, label, lr, steps in rows(args):
        t = table[key]
        if t["mean"]:
            lines.append(f"| {label} | {'' if lr is None else f'{lr:g}'} | {steps or ''} | {_cell(t['mean'])} | "
                         f"{_cell(t['delta'], sign=True)} | {_cell(t['win_rate'])} | {_cell(t['prompt'])} | {_cell(t['taste'])} |")
    return "\n".join(lines) + "\n"


def plot(args, table, out_path):
    """Gain over the base (left) and caption following (right) against lr: DPO on all labels, one line
    per step count; SAIL, one line per iteration. Error bars: sd over seeds; dots: the seeds."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install matplotlib): skipping %s", out_path)
        return False
    lines = {}
    for key, label, lr, steps in rows(args):
        if lr is not None and table[key]["delta"]:
            name = (0, steps, f"{label}, {steps} steps") if steps else (1, 0, label)  # DPO by steps, then SAIL
            lines.setdefault(name, []).append((lr, key))
    base = table["base"]["prompt"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, measure, ylabel in ((axes[0], "delta", "oracle score minus the base model's"),
                                (axes[1], "prompt", "caption following (the oracle's caption half)")):
        for k, ((_, _, label), points) in enumerate(sorted(lines.items())):
            points.sort()
            lrs = [lr for lr, _ in points]
            stats = [table[key][measure] for _, key in points]
            colour = f"C{k}"
            ax.errorbar(lrs, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o-" if len(lrs) > 1 else "s",
                        color=colour, capsize=3, label=label)
            for lr, s in zip(lrs, stats):
                ax.scatter([lr] * len(s[2]), s[2], color=colour, s=8, alpha=0.5)
        if measure == "delta":
            ax.axhline(0, color="black", lw=0.8)
        elif base:
            ax.axhline(base[0], color="black", lw=0.8, ls=":", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(ylabel)
    axes[0].legend(fontsize=7)
    fig.suptitle("toy world: DPO on all labels and SAIL against the learning rate", fontsize=10)
    reports.save_figure(fig, out_path)
    return True


def main(args):
    dpo = " ".join(f"{lr:g}:{steps}" for lr, steps in args.dpo)
    per_seed, seconds = run_over_seeds(args, "lr_sweep", run_seed, f"DPO on all labels at {dpo}, SAIL at lr "
                                       + " ".join(f"{lr:g}" for lr in args.sail_lrs))
    table = summarize(args, per_seed)
    write_results(args.out, "lr_sweep", dict(summary=table, per_seed=per_seed, wall_seconds=seconds),
                  markdown(args, table, per_seed), lambda path: plot(args, table, path))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/lr_tune"), help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="data seeds (0 and 1 tune; 2, 3, 4 report)")
    p.add_argument("--dpo", type=dpo_setting, nargs="*",
                   default=[(lr, 300) for lr in (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4)],
                   help="LR:STEPS of each DPO-on-all-labels run (default: lr 1e-6 ... 3e-4 at 300 steps)")
    p.add_argument("--rater-noise", type=float, default=0.0, help="toy.data --rater-noise: a noisy human (0: the oracle)")
    p.add_argument("--sail-lrs", type=float, nargs="*", default=[1e-6, 3e-6, 1e-5], help="lr of each SAIL run")
    add_study_flags(p)
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
