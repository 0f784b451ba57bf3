"""The toy study: SAIL with 6% of the labels against DPO with all of them, and the paper's
ablations, in the toy world over several data seeds; writes the study's tables and plot (toy/RESULTS.md).

For every seed (its own prompt split, seed set and labelled universe; the toy world and its
hyperparameters were tuned on data seeds 0 and 1, so the study's default seeds are 2, 3 and 4):
  1. the SAIL loop, `bash run_all.sh toy 2` into <out>/seed_<s>: data, iteration 0 (DPO on the 6%
     seed), SAIL iterations 1 and 2 (N = 8, K = 10, best-worst pairs, 25% human pairs in the mix);
  2. ablations of iteration 1, each a new iteration 1 from the same iteration-0 model and the same
     candidate images: random pairs instead of best-worst, no mixup (self pairs only), 75% human
     pairs (the other reading of the paper's mix ratio, see 03_mixup.py), N = 2 and N = 4 (the
     first 2 or 4 of the same 8 images per prompt); and no mixup carried on to iteration 2;
  3. DPO on 100% of the labelled pairs (the paper's DiffusionDPO baseline) from the base model at
     --dpo-all-lr for --dpo-all-steps (defaults: the best of toy/study_lr.py's sweep on the tuning
     seeds), and at that lr for as many steps as the whole SAIL run (iteration 0 + T iterations);
  4. the oracle score of every model on the run's eval prompts (the same seeds for every model)
     and its win rate against the base; the self-reward's agreement with the oracle on its own
     best-worst pairs and on 128 held-out oracle-labelled pairs (05_eval.py --reward-accuracy):
     every SAIL model at K = 10, iteration 0 at K = 1, 10, 30 with and without common draws.
Then mean and spread (sample standard deviation) over the seeds.

Command (--jobs: seeds side by side; --threads 1 suits 2-3 jobs on 2 cores):
    python -m toy.study --out runs/study --jobs 3 --threads 1
The plumbing on tiny random-weight models (--quick also runs one ablation of each kind):
    python -m toy.study --out /tmp/study --preset tiny-sd15 --quick --seeds 0

Reads:  nothing; the toy base model is built once and cached (python -m toy.base, which run_all.sh runs).
Writes: <out>/seed_<s>/ (a run folder of run_all.sh plus ablation_*/, dpo_all_labels/,
        seed/heldout_pairs.jsonl, eval/, study.log with every stage's output), then <out>/study.json
        (every number per seed, stage times), study.md (tables), study.png (plot), study.args.json,
        log.txt. Every stage skips what is finished: rerun the command after a crash to continue.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sail import files, models, reports
from sail.common import SailError, derive_seed, run_stage, setup_logging
from sail.settings import get_preset
from toy.results import write_results

log = logging.getLogger("sail")
KIT = Path(__file__).resolve().parents[1]
# name -> (candidates per prompt, pairing, share of human pairs) for a new iteration 1
ABLATIONS = {
    "ablation_random_pairs": (8, "random", 0.25),
    "ablation_no_mixup": (8, "best-worst", 0.0),
    "ablation_human_share_0.75": (8, "best-worst", 0.75),
    "ablation_n2": (2, "best-worst", 0.25),
    "ablation_n4": (4, "best-worst", 0.25),
}
MODELS = [  # row order of the table: (folder name in a seed's run, label, which human labels it used)
    ("base", "base model", None), (files.iteration_name(0), "iteration 0: DPO on the seed", "seed"),
    (files.iteration_name(1), "SAIL iteration 1", "seed"), (files.iteration_name(2), "SAIL iteration 2", "seed"),
    ("dpo_all_labels", "DPO on all labels", "all"),
    ("dpo_all_labels_long", "DPO on all labels, as many steps as SAIL in all", "all"),
    ("ablation_random_pairs", "iteration 1, random pairs", "seed"), ("ablation_no_mixup", "iteration 1, no mixup", "seed"),
    ("ablation_no_mixup_iter2", "iteration 2, no mixup in 1 and 2", "seed"),
    ("ablation_human_share_0.75", "iteration 1, 75% human pairs", "seed"),
    ("ablation_n2", "iteration 1, N = 2", "seed"), ("ablation_n4", "iteration 1, N = 4", "seed"),
]
# --quick checks the plumbing: tiny sizes, and one ablation of each kind (a new mix of the same
# pairs, new pairs from some of the same images), the no-mixup one also carried on to iteration 2
QUICK = dict(data="--pool-size 3 --n-eval 3 --n-universe 12 --pairs-per-prompt 2 --seed-fraction 0.5",
             steps=2, draws=2, sweep=[1, 2], heldout=4, images_per_prompt=1,
             ablations=("ablation_no_mixup", "ablation_n2"))
FULL = dict(data="", steps=None, draws=10, sweep=[1, 10, 30], heldout=128, images_per_prompt=4, ablations=tuple(ABLATIONS))


class StageLog:
    """Runs stages as subprocesses in the kit's folder, their output appended to <folder>/study.log;
    keeps each stage's wall time. A failing stage stops with the log's place in the message."""

    def __init__(self, folder, label, threads=None):
        self.folder, self.label, self.times = Path(folder), label, {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if threads:
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def __call__(self, name, *cmd, extra_env=None):
        start = time.time()
        with open(self.folder / "study.log", "a") as out:
            out.write(f"\n$ {' '.join(map(str, cmd))}\n")
            out.flush()
            code = subprocess.run(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT, cwd=KIT,
                                  env={**self.env, **(extra_env or {})}).returncode
        if code:
            raise SailError(f"{self.label}: {name} failed (exit {code}); its output is at the end of "
                                      f"{self.folder / 'study.log'}")
        self.times[name] = round(time.time() - start, 1)
        log.info("%s: %s done in %.0f s", self.label, name, self.times[name])


def label_universe(sh, run, preset, data_args):
    """The run's data with every pair slot of the universe labelled: seed/all_pairs.jsonl."""
    sh("data: all labels", sys.executable, "-m", "toy.data", "--run", run, "--preset", preset, *data_args, "--all-labels")


def dpo_on_all_labels(sh, name, run, out, preset, seed, steps, lr):
    """The paper's DiffusionDPO baseline: DPO from the base model on every labelled pair."""
    sh(name, sys.executable, "04_train.py", "--init", preset, "--pairs", run / "seed" / "all_pairs.jsonl", "--out", out,
       "--iter", 0, "--seed", seed, "--max-steps", steps, "--lr", lr)


def run_seed(args, seed, cfg):
    """Every stage of one seed, in order; returns the seed's numbers. Stage output goes to study.log."""
    run = args.out / f"seed_{seed}"
    run.mkdir(parents=True, exist_ok=True)
    steps = cfg["steps"] or get_preset(args.preset)["max_steps"]
    data_args = f"--seed {seed} --n-pools {args.iterations} {cfg['data']}".split()
    train_args = ["--seed", str(seed), "--max-steps", str(steps)]
    sh = StageLog(run, f"seed {seed}", args.threads)
    py = [sys.executable]
    sh("SAIL loop (run_all.sh)", "bash", KIT / "run_all.sh", args.preset, args.iterations,
       extra_env=dict(RUN=str(run), PYTHON=sys.executable, N="8", K=str(cfg["draws"]), EVAL="0",
                      DATA_ARGS=" ".join(data_args), TRAIN_ARGS=" ".join(train_args)))
    iter0, iter1 = files.checkpoint_dir(run, 0), files.iteration_dir(run, 1)
    for name in cfg["ablations"]:
        n, pairing, share = ABLATIONS[name]
        folder = run / name
        if (folder / "ckpt" / "sail.json").is_file():
            continue
        self_pairs = iter1 / "pairs.jsonl"
        if (n, pairing) != (8, "best-worst"):  # new self-labelled pairs from (a subset of) the same images
            gens = [dict(files.strip_private(g), image=f"../{iter1.name}/{g['image']}")
                    for g in files.read_jsonl(iter1 / "generations.jsonl") if g["index"] < n]
            if not (folder / "generations.jsonl").is_file():
                files.write_jsonl_atomic(folder / "generations.jsonl", gens)
            sh(f"{name}: 02 self-reward", *py, "02_self_reward.py", "--ckpt", iter0, "--dir", folder,
               "--draws", cfg["draws"], "--pairing", pairing)
            self_pairs = folder / "pairs.jsonl"
        sh(f"{name}: 03 mixup", *py, "03_mixup.py", "--self-pairs", self_pairs, "--human-pairs",
           run / "seed" / "pairs.jsonl", "--out", folder / "train_pairs.jsonl", "--human-share", share)
        sh(f"{name}: 04 DPO", *py, "04_train.py", "--init", iter0, "--pairs", folder / "train_pairs.jsonl",
           "--out", folder / "ckpt", "--iter", 1, *train_args)
    if args.iterations >= 2:  # no mixup in iteration 2 as well: the paper (Table 6) sees the harm there
        start, folder = run / "ablation_no_mixup" / "ckpt", run / "ablation_no_mixup_iter2"
        if not (folder / "ckpt" / "sail.json").is_file():
            sh("ablation_no_mixup_iter2: 01 generate", *py, "01_generate.py", "--ckpt", start, "--pool",
               files.pool_path(run, 2), "--out", folder)
            sh("ablation_no_mixup_iter2: 02 self-reward", *py, "02_self_reward.py", "--ckpt", start, "--dir", folder,
               "--draws", cfg["draws"])
            sh("ablation_no_mixup_iter2: 03 mixup", *py, "03_mixup.py", "--self-pairs", folder / "pairs.jsonl",
               "--human-pairs", run / "seed" / "pairs.jsonl", "--out", folder / "train_pairs.jsonl", "--human-share", 0)
            sh("ablation_no_mixup_iter2: 04 DPO", *py, "04_train.py", "--init", start, "--pairs",
               folder / "train_pairs.jsonl", "--out", folder / "ckpt", "--iter", 2, *train_args)

    label_universe(sh, run, args.preset, data_args)
    dpo_steps, long_steps = cfg["steps"] or args.dpo_all_steps, steps * (args.iterations + 1)  # --quick: 2 steps
    for name, n_steps in (("dpo_all_labels", dpo_steps), ("dpo_all_labels_long", long_steps)):
        dpo_on_all_labels(sh, f"{name}: 04 DPO", run, run / name / "ckpt", args.preset, seed, n_steps, args.dpo_all_lr)

    heldout = write_heldout_pairs(run / "seed", cfg["heldout"], seed)
    sweep_out, iters_out = run / "eval" / "reward_accuracy_draws", run / "eval" / "reward_accuracy_iterations"
    sh("reward accuracy: K and common draws", *py, "05_eval.py", "--reward-accuracy", heldout, "--ckpt", iter0,
       "--draws", *cfg["sweep"], "--common-draws", "both", "--out", sweep_out)
    sail_ckpts = [a for i in range(args.iterations + 1) for a in ("--ckpt", files.checkpoint_dir(run, i))]
    sh("reward accuracy: per iteration", *py, "05_eval.py", "--reward-accuracy", heldout, *sail_ckpts,
       "--draws", cfg["draws"], "--common-draws", "yes", "--out", iters_out)
    sh("oracle report", *py, "-m", "toy.report", "--run", run, "--images-per-prompt", cfg["images_per_prompt"])

    oracle = json.loads((run / "eval" / "oracle_report.json").read_text())
    accuracy = {}
    for folder in (sweep_out, iters_out):
        for path in sorted(folder.glob("*/reward_accuracy.json")):
            for r in json.loads(path.read_text())["results"]:
                accuracy[f"{path.parent.name}: {r['method']}"] = r["accuracy"]
    stats = json.loads((run / "seed" / "stats.json").read_text())
    return dict(seed=seed, oracle=oracle, heldout_accuracy=accuracy, data=stats, dpo_all_labels_steps=dpo_steps,
                dpo_all_labels_lr=args.dpo_all_lr,
                dpo_all_labels_long_steps=long_steps,
                steps_per_iteration=steps, heldout_pairs=len(files.read_jsonl(heldout)), stage_seconds=sh.times)


def write_heldout_pairs(seed_dir, n, seed):
    """n labelled pairs of the universe that are not in the human seed set -> seed/heldout_pairs.jsonl."""
    path = seed_dir / "heldout_pairs.jsonl"
    if not path.is_file():
        seen = {(p["image_w"], p["image_l"]) for p in files.read_jsonl(seed_dir / "pairs.jsonl")}
        rest = [files.strip_private(p) for p in files.read_jsonl(seed_dir / "all_pairs.jsonl")
                if (p["image_w"], p["image_l"]) not in seen]
        pick = np.random.default_rng(derive_seed(seed, "heldout") % 2**32).permutation(len(rest))[:n]
        files.write_jsonl_atomic(path, [rest[i] for i in sorted(pick)])
    return path


# ---------------------------------------------------------------- tables and plot across seeds
def spread(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, values


def summarize(per_seed):
    """Per-seed results -> {"models": {name: {score, delta, win_rate, agreement}}, "accuracy": {key: ...}}
    with (mean, sd, per-seed values) for each number."""
    table = {}
    for name, _, _ in MODELS:
        rows = [s["oracle"].get(name) for s in per_seed]
        if not any(rows):
            continue
        table[name] = {key: spread([r.get(key) if r else None for r in rows])
                        for key in ("mean", "delta", "win_rate", "self_reward_agreement")}
    keys = sorted({k for s in per_seed for k in s["heldout_accuracy"]})
    accuracy = {k: spread([s["heldout_accuracy"].get(k) for s in per_seed]) for k in keys}
    return dict(models=table, accuracy=accuracy, seeds=[s["seed"] for s in per_seed])


def _cell(stat, dec=3, sign=False, pct=False):
    if not stat:
        return "–"
    mean, sd, _ = stat
    if pct:
        return f"{100 * mean:.1f}% ± {100 * sd:.1f}"
    return f"{mean:{'+' if sign else ''}.{dec}f} ± {sd:.{dec}f}"


def markdown(summary, per_seed):
    seeds = ", ".join(map(str, summary["seeds"]))
    first = per_seed[0]
    lines = [f"## Toy study: oracle score over data seeds {seeds} (mean ± sd over seeds)", "",
             f"Every model drew {first['oracle']['base']['n']} eval images on the same seeds; win rate = share of "
             "those images that beat the base model's image on the same seed (a tie counts half). SAIL and its "
             f"ablations train {first['steps_per_iteration']} steps per iteration; DPO on all labels trains "
             f"{first['dpo_all_labels_steps']} steps (the long run {first['dpo_all_labels_long_steps']}) at lr "
             f"{first.get('dpo_all_labels_lr', 1e-6):g} on "
             f"{first['data'].get('all_pairs', {}).get('pairs', '?')} pairs against the seed's "
             f"{first['data']['pairs']['pairs']}.", "",
             "| Model | Labels | Oracle score | vs base | Win rate vs base | Self-reward agrees with oracle |",
             "|---|---|---|---|---|---|"]
    seed_share = f"{100 * first['data']['seed_slots'] / first['data']['universe_slots']:.0f}%"
    for name, label, labels in MODELS:
        m = summary["models"].get(name)
        if m:
            labels = {None: "0", "seed": seed_share, "all": "100%"}[labels]
            lines.append(f"| {label} | {labels} | {_cell(m['mean'])} | {_cell(m['delta'], sign=True)} | "
                         f"{_cell(m['win_rate'], pct=True)} | {_cell(m['self_reward_agreement'], pct=True)} |")
    lines += ["", "Self-reward agreement: the share of the iteration's best-worst pairs (labelled by the previous "
              "model's implicit reward) whose winner the oracle scores higher.", "",
              f"## Self-reward accuracy on {first['heldout_pairs']} held-out oracle-labelled "
              "pairs (mean ± sd over seeds)", "", "| Model and reward | Accuracy |", "|---|---|"]
    lines += [f"| {key} | {_cell(stat, pct=True)} |" for key, stat in summary["accuracy"].items()]
    return "\n".join(lines) + "\n"


def plot(summary, out_path):
    """Left: oracle score gain over the base per model (mean ± sd, dots = seeds). Right: held-out
    accuracy of iteration 0's self-reward against K, with and without common draws."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install matplotlib): skipping %s", out_path)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw=dict(width_ratios=[1.6, 1]))
    names = [(n, label) for n, label, _ in MODELS if n != "base" and summary["models"].get(n, {}).get("delta")]
    for y, (name, _) in enumerate(names):
        mean, sd, values = summary["models"][name]["delta"]
        colour = "tab:blue" if files.iteration_number(name) is not None else "tab:red" if name.startswith("dpo_all_labels") else "tab:gray"
        left.barh(y, mean, xerr=sd, color=colour, alpha=0.8, capsize=3)
        left.scatter(values, [y] * len(values), color="black", s=10, zorder=3)
    left.set_yticks(range(len(names)), [label for _, label in names])
    left.invert_yaxis()
    left.axvline(0, color="black", lw=0.8)
    left.set_xlabel("oracle score minus the base model's")
    left.set_title("SAIL (blue), DPO on all labels (red), ablations (grey)", fontsize=9)
    for common, style in ((True, "o-"), (False, "s--")):
        points = [(int(k.split("K=")[1].split()[0]), stat) for k, stat in summary["accuracy"].items()
                  if k.startswith(files.iteration_name(0)) and "draws" in k and (" common" in k) == common and stat]
        if points:
            points.sort()
            ks, stats = zip(*points)
            right.errorbar(ks, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt=style, capsize=3,
                           label="common draws" if common else "own draws per image")
    right.axhline(0.5, color="black", lw=0.8, ls=":")
    right.set_xscale("log")
    ticks = sorted({int(k.split("K=")[1].split()[0]) for k in summary["accuracy"] if k.startswith(files.iteration_name(0))})
    right.set_xticks(ticks, [str(k) for k in ticks])
    right.minorticks_off()
    right.set_xlabel("K (t, noise) draws per image")
    right.set_ylabel("accuracy on held-out pairs")
    right.set_title("iteration 0's self-reward against the oracle", fontsize=9)
    right.legend(fontsize=8)
    reports.save_figure(fig, out_path)
    return True


def run_over_seeds(args, stage, run_seed, settings):
    """What every study does around its seeds: logging and arguments in args.out, the base model
    built once (cached) before the seeds start, then run_seed(args, seed, cfg) for each seed, --jobs
    side by side. settings: the study's own settings, for the first log line. Returns (the seeds'
    results, wall seconds)."""
    args.out = args.out.resolve()
    setup_logging(args.out, stage)
    files.save_args(args.out, stage, args)
    cfg = QUICK if args.quick else FULL
    log.info("%s: preset %s, seeds %s, %s, %d job(s), output %s", stage, args.preset, args.seeds, settings, args.jobs, args.out)
    start = time.time()
    models.describe_model(args.preset)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        per_seed = list(pool.map(lambda s: run_seed(args, s, cfg), args.seeds))
    return per_seed, round(time.time() - start)


def main(args):
    per_seed, seconds = run_over_seeds(args, "study", run_seed, f"{args.iterations} iteration(s)")
    summary = summarize(per_seed)
    write_results(args.out, "study", dict(summary=summary, per_seed=per_seed, wall_seconds=seconds),
                  markdown(summary, per_seed), lambda path: plot(summary, path))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/study"), help="study folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4], help="data seeds (0 and 1 tuned the toy world)")
    p.add_argument("--dpo-all-steps", type=int, default=100,
                   help="steps of DPO on all labels: with --dpo-all-lr, the best of toy/study_lr.py on the tuning seeds 0 and 1")
    p.add_argument("--dpo-all-lr", type=float, default=1e-4, help="lr of DPO on all labels")
    add_study_flags(p)
    return p


def add_study_flags(p):
    """The flags run_over_seeds and the seeds' stages read, shared by the studies."""
    p.add_argument("--iterations", type=int, default=2, help="SAIL iterations T")
    p.add_argument("--preset", default="toy", help="toy; tiny-sd15 / tiny-sdxl test the plumbing")
    p.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
    p.add_argument("--threads", type=int, help="torch threads per stage (default: torch's; 1 suits --jobs 2-3 on 2 cores)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 training steps: checks the plumbing only")


if __name__ == "__main__":
    run_stage(main, build_parser().parse_args())
