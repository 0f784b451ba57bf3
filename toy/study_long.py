"""The toy study's long runs: SAIL for T = 6 iterations at several shares of human pairs in the mix,
measured after every iteration, and whether the drift guard (which needs no oracle) finds the
iteration where the oracle score peaks. Results so far: toy/RESULTS.md.

    python -m toy.study_long --out runs/long --jobs 3 --share-jobs 3 --threads 1
is short for, per data seed (default 2, 3, 4, which tuned nothing):
    python -m toy.data --run <out>/seed_<s> --seed <s> --n-pools 6 --val-pairs 500
    RUN=<out>/seed_<s>/human_<h> HUMAN_SHARE=<h> GUARD=report bash run_all.sh toy 6   # h = 0, 0.25, 0.75
    python -m toy.report --run <out>/seed_<s>/human_<h>
then the measures below. Other settings through --data-args / --train-args (--val-pairs 0: no
guard), and several outputs side by side, e.g. passes over each iteration's pairs:
    python -m toy.study_long --out runs/passes/steps30 --seeds 0 1 --human-shares 0.25 --iterations 4 \\
        --val-pairs 0 --data-args="--n-universe 288" --train-args="--lr 1e-5 --max-steps 30"
    python -m toy.study_long --out runs/passes --compare runs/passes/steps300 runs/passes/steps30
The plumbing on tiny random-weight models:
    python -m toy.study_long --out /tmp/long --preset tiny-sd15 --quick --seeds 0 --iterations 2

Per iteration (0 = DPO on the seed) of every run: the oracle score of 256 eval images, the gain and
win rate against the base on the same seeds, caption following and taste (the oracle's two
halves); the model's self-reward accuracy on the held-out human pairs (the drift guard's number;
K = 10 common draws); of the iteration's self-labelled pairs, the share the oracle agrees with and
the share with p(w > l) > 0.9; and diversity, the mean distance between images of the same prompt
(RMS pixels, and the share of the oracle's four found attributes that differ), of the 4 eval images
per prompt of each model and of the N = 8 candidates each model drew for the next iteration.
The guard: for each run, the iteration with the best held-out accuracy (what guard.json names),
where GUARD=stop would end the loop (the accuracy more than 0.02 below the best so far), and the
oracle's peak; how often they agree and how much oracle score the guard's choice gives up.

Reads:  nothing; the toy base model is built once and cached (python -m toy.base).
Writes: <out>/seed_<s>/ (the data, human_<h>/ = a run_all.sh run folder with eval/long.json, study.log),
        then <out>/long.json (every number per seed), long.md (tables), long.png (one panel per
        measure against the iteration), long.args.json, log.txt; with --compare: <out>/compare.json,
        .md (a row per setting and iteration, with the passes over its training pairs), .png.
        Every stage skips what is finished.
"""
import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from sail import common, files, guards, reports, settings
from toy import world
from toy.results import write_results
from toy.study import KIT, StageLog, add_study_flags, run_over_seeds, spread
from toy.study_lr import share_seed_data

log = logging.getLogger("sail")
# name in the numbers -> label in tables and plots
MEASURES = {"mean": "oracle score", "delta": "gain over the base", "win_rate": "win rate vs base",
            "prompt": "caption following", "taste": "taste", "heldout_accuracy": "held-out self-reward accuracy",
            "self_agreement": "self pairs the oracle agrees with", "confident": "self pairs with p > 0.9",
            "diversity_pixels": "diversity, pixels", "diversity_attributes": "diversity, attributes",
            "candidate_diversity_pixels": "candidates' diversity, pixels",
            "candidate_diversity_attributes": "candidates' diversity, attributes"}


def share_name(share):
    return f"human_{share:g}"


def run_seed(args, seed, cfg):
    """Data once, then one SAIL run per human share (--share-jobs side by side); returns their measures."""
    run = args.out / f"seed_{seed}"
    run.mkdir(parents=True, exist_ok=True)
    sh = StageLog(run, f"seed {seed}", args.threads)
    noise = ["--rater-noise", str(args.rater_noise)] if args.rater_noise else []
    sh("data", sys.executable, "-m", "toy.data", "--run", run, "--preset", args.preset, "--seed", seed,
       "--n-pools", args.iterations, "--val-pairs", cfg["heldout"] if args.quick and args.val_pairs else args.val_pairs,
       *cfg["data"].split(), *args.data_args.split(), *noise)

    def one_share(share):
        folder = run / share_name(share)
        share_seed_data(run, folder)
        train = f"--seed {seed}" + (f" --max-steps {cfg['steps']}" if cfg["steps"] else "") + f" {args.train_args}"
        sh(f"SAIL, {100 * share:g}% human", "bash", KIT / "run_all.sh", args.preset, args.iterations,
           extra_env=dict(RUN=str(folder), PYTHON=sys.executable, N="8", K=str(cfg["draws"]), EVAL="0", GUARD="report",
                          HUMAN_SHARE=f"{share:g}", TRAIN_ARGS=train))
        sh(f"oracle report, {100 * share:g}% human", sys.executable, "-m", "toy.report", "--run", folder,
           "--images-per-prompt", cfg["images_per_prompt"])
        return share_name(share), measure_run(folder, args.iterations)

    with ThreadPoolExecutor(max_workers=args.share_jobs) as pool:
        runs = dict(pool.map(one_share, args.human_shares))
    return dict(seed=seed, runs=runs, guard={name: guard_choice(r, args.tolerance) for name, r in runs.items()},
                stage_seconds=sh.times)


def measure_run(folder, iterations):
    """Every measure of every model of one run folder -> {measure: [value per iteration 0 .. T]}, base
    model's numbers under "base"; cached in eval/long.json while the report and the guard's
    accuracies it was made from stay the same (a resumed or longer run measures again)."""
    cached = folder / "eval" / "long.json"
    report = json.loads((folder / "eval" / "oracle_report.json").read_text())
    guard_file = folder / "eval" / "guard" / "guard.json"  # absent when the data has no held-out pairs
    guard = json.loads(guard_file.read_text())["accuracy"] if guard_file.is_file() else {}
    made_from = dict(iterations=iterations, report=report, guard=guard)
    previous = json.loads(cached.read_text()) if cached.is_file() else {}
    if previous.get("made_from") == made_from:
        return previous["measures"]
    names = [files.iteration_name(i) for i in range(iterations + 1)]
    out = {m: [] for m in MEASURES}
    for i, name in enumerate(names):
        r = report.get(name, {})
        for key in ("mean", "delta", "win_rate", "prompt", "taste"):
            out[key].append(r.get(key))
        out["heldout_accuracy"].append(guard.get(name))
        out["self_agreement"].append(r.get("self_reward_agreement"))
        pairs = folder / name / "pairs.jsonl"
        out["confident"].append(float(np.mean([p["p"] > 0.9 for p in files.read_jsonl(pairs)])) if i and pairs.is_file() else None)
        d = image_diversity(folder / "eval" / "oracle" / name, "scores.jsonl")
        out["diversity_pixels"].append(d["pixels"])
        out["diversity_attributes"].append(d["attributes"])
        drawn = image_diversity(folder / files.iteration_name(i + 1), "generations.jsonl")  # drawn by this model
        out["candidate_diversity_pixels"].append(drawn["pixels"])
        out["candidate_diversity_attributes"].append(drawn["attributes"])
    base = image_diversity(folder / "eval" / "oracle" / "base", "scores.jsonl")
    out["base"] = dict(mean=report["base"]["mean"], prompt=report["base"]["prompt"], taste=report["base"]["taste"],
                       diversity_pixels=base["pixels"], diversity_attributes=base["attributes"])
    files.write_json_atomic(cached, dict(made_from=made_from, measures=out))
    return out


def image_diversity(folder, listing):
    """Mean over prompts of world.diversity of the images listed in folder/listing (rows with
    prompt_id and image); None each when the folder holds no such listing."""
    if not (folder / listing).is_file():
        return dict(pixels=None, attributes=None)
    groups = {}
    for row in files.read_jsonl(folder / listing):
        groups.setdefault(row["prompt_id"], []).append(files.load_image(folder / row["image"]))
    each = [world.diversity(images) for images in groups.values() if len(images) > 1]
    return {k: float(np.mean([d[k] for d in each])) if each else None for k in ("pixels", "attributes")}


def guard_choice(measures, tolerance):
    """The drift guard's choices against the oracle's peak. best: the iteration guard.json names after
    the whole run (guards.best_iteration); stopped_after: where GUARD=stop ends the loop (the
    first iteration more than tolerance below the highest before it; None: never); stop_keeps: what
    guard.json names then. Score given up: the peak's oracle score minus that of each choice."""
    acc, score = measures["heldout_accuracy"], measures["mean"]
    done = [i for i in range(len(acc)) if acc[i] is not None and score[i] is not None]
    if not done:
        return None
    accuracies = {i: acc[i] for i in done}
    best = guards.best_iteration(accuracies, tolerance)
    stopped_after = next((i for i in done if guards.fell_below_best(accuracies, i, tolerance)), None)
    end = done[-1] if stopped_after is None else stopped_after
    stop_keeps = guards.best_iteration({i: acc[i] for i in done if i <= end}, tolerance)
    peak = max(done, key=lambda i: score[i])
    return dict(best=best, stopped_after=stopped_after, stop_keeps=stop_keeps, peak=peak, best_loss=score[peak] - score[best],
                stop_loss=score[peak] - score[stop_keeps], last_loss=score[peak] - score[done[-1]])


def summarize(per_seed):
    """{run name: {measure: [(mean, sd, per-seed values) per iteration]}} over the seeds."""
    table = {}
    for name in per_seed[0]["runs"]:
        runs = [s["runs"][name] for s in per_seed]
        table[name] = {m: [spread([r[m][i] for r in runs]) for i in range(len(runs[0][m]))] for m in MEASURES}
        table[name]["base"] = {k: spread([r["base"][k] for r in runs]) for k in runs[0]["base"]}
    return table


def _cell(stat, pct=False, sign=False):
    if not stat:
        return "–"
    mean, sd, _ = stat
    return f"{100 * mean:.0f}% ± {100 * sd:.0f}" if pct else f"{mean:{'+' if sign else ''}.3f} ± {sd:.3f}"


def markdown(table, per_seed, tolerance):
    seeds = ", ".join(str(s["seed"]) for s in per_seed)
    columns = ("delta", "win_rate", "prompt", "taste", "heldout_accuracy", "self_agreement", "confident",
               "diversity_pixels", "diversity_attributes")
    pct = {"win_rate", "heldout_accuracy", "self_agreement", "confident", "diversity_attributes"}
    lines = [f"## Long runs: data seeds {seeds} (mean ± sd over seeds)", ""]
    for name, t in table.items():
        b = t["base"]
        lines += [f"### {name.replace('human_', '')} human pairs in the mix "
                  f"(base: oracle {_cell(b['mean'])}, caption following {_cell(b['prompt'])}, taste {_cell(b['taste'])}, "
                  f"diversity {_cell(b['diversity_pixels'])} pixels, {_cell(b['diversity_attributes'], pct=True)} attributes)", "",
                  "| iteration | oracle | " + " | ".join(MEASURES[c] for c in columns) + " |", "|---" * (len(columns) + 2) + "|"]
        for i in range(len(t["mean"])):
            cells = [_cell(t[c][i], pct=c in pct, sign=c == "delta") for c in columns]
            lines.append(f"| {i} | {_cell(t['mean'][i])} | " + " | ".join(cells) + " |")
        lines.append("")
    choices = [g for s in per_seed for g in s["guard"].values() if g]
    if not choices:  # no held-out pairs, no guard
        return "\n".join(lines) + "\n"
    lines += [f"### The drift guard against the oracle's peak (tolerance {tolerance})", "",
              "| human pairs | seed | oracle peak | guard's best after the run | GUARD=stop stops after, keeps | "
              "score given up: guard's best / GUARD=stop / last model |", "|---|---|---|---|---|---|"]
    for s in per_seed:
        for name, g in s["guard"].items():
            if not g:
                continue
            stop = "never" if g["stopped_after"] is None else g["stopped_after"]
            lines.append(f"| {name.replace('human_', '')} | {s['seed']} | {g['peak']} | {g['best']} | {stop}, {g['stop_keeps']} | "
                         f"{g['best_loss']:.3f} / {g['stop_loss']:.3f} / {g['last_loss']:.3f} |")
    lines += ["", f"Of {len(choices)} runs, the guard's best is the oracle's peak in {sum(g['best'] == g['peak'] for g in choices)}, "
              f"GUARD=stop keeps the peak in {sum(g['stop_keeps'] == g['peak'] for g in choices)} (it stopped "
              f"{sum(g['stopped_after'] is not None for g in choices)}); oracle score given up, mean: "
              f"{np.mean([g['best_loss'] for g in choices]):.3f} taking the guard's best, "
              f"{np.mean([g['stop_loss'] for g in choices]):.3f} with GUARD=stop, "
              f"{np.mean([g['last_loss'] for g in choices]):.3f} taking the last model."]
    return "\n".join(lines) + "\n"


def plot(table, out_path, title):
    """One panel per measure against the iteration, one line per table entry (mean ± sd over the
    seeds), the base model's value dotted (zero for the gain); measures no run has are left out."""
    shown = [m for m in MEASURES if m != "mean" and any(s for t in table.values() for s in t[m])]
    iterations = max(len(t["mean"]) for t in table.values())
    series = {MEASURES[m]: {label: [s and (s[0], s[0] - s[1], s[0] + s[1]) for s in t[m]] for label, t in table.items()}
              for m in shown}
    base = next(iter(table.values()))["base"]
    reference = {MEASURES[m]: base[m][0] for m in shown if base.get(m)}
    reference[MEASURES["delta"]] = 0.0
    return reports.plot_metrics(series, [str(i) for i in range(iterations)], out_path, columns=4, reference=reference,
                                title=title)


def passes(folder, seeds, name, iteration):
    """Training pairs and passes over them (steps x batch / pairs) of one iteration, mean over seeds."""
    found = [json.loads(f.read_text()) for s in seeds
             if (f := folder / f"seed_{s}" / name / files.iteration_name(iteration) / "train.args.json").is_file()]
    if not found:
        return None
    return (float(np.mean([a["num_pairs"] for a in found])),
            float(np.mean([a["max_steps"] * a["batch_size"] / a["num_pairs"] for a in found])))


def preset_training(preset):
    p = settings.get_preset(preset)
    return f"(the {preset} preset: {p['max_steps']} steps of {p['batch_size']} pairs at lr {p['lr']:g})"


def compare(args):
    """--compare: several study outputs (one setting each: pool size, training steps, ...) side by
    side -> <out>/compare.json/md/png, one line per setting and human share."""
    args.out = args.out.resolve()
    common.setup_logging(args.out, "compare")
    files.save_args(args.out, "compare", args)
    table, lines = {}, ["## Settings compared (mean ± sd over seeds)", ""]
    for folder in args.compare:
        if not (folder / "long.json").is_file():
            raise common.SailError(f"{folder / 'long.json'} not found: --compare takes finished toy/study_long.py outputs")
        numbers = json.loads((folder / "long.json").read_text())
        made = json.loads((folder / "long.args.json").read_text())
        seeds = [s["seed"] for s in numbers["per_seed"]]
        lines.append(f"- {folder.name}: data seeds {', '.join(map(str, seeds))}; toy.data {made.get('data_args') or '(defaults)'}; "
                     f"00/04 {made.get('train_args') or preset_training(made.get('preset', 'toy'))}")
        for name, t in numbers["summary"].items():
            label = f"{folder.name}, {name.replace('human_', '')} human"
            table[label] = dict(t, passes=[passes(folder, seeds, name, i) for i in range(len(t["mean"]))])
    columns = ("delta", "win_rate", "prompt", "taste", "self_agreement", "diversity_pixels")
    pct = {"win_rate", "self_agreement"}
    lines += ["", "| setting | iteration | training pairs | passes over them | " + " | ".join(MEASURES[c] for c in columns) + " |",
              "|---" * (len(columns) + 4) + "|"]
    for label, t in table.items():
        for i in range(len(t["mean"])):
            pairs, over = t["passes"][i] or ("–", None)
            cells = [_cell(t[c][i], pct=c in pct, sign=c == "delta") for c in columns]
            lines.append(f"| {label} | {i} | {pairs if over is None else f'{pairs:.0f}'} | "
                         f"{'–' if over is None else f'{over:.0f}'} | " + " | ".join(cells) + " |")
    write_results(args.out, "compare", dict(summary=table), "\n".join(lines) + "\n",
                  lambda path: plot(table, path, "toy world: settings compared (mean ± sd over seeds)"))


def main(args):
    if args.compare:
        return compare(args)
    shares = " ".join(f"{s:g}" for s in args.human_shares)
    per_seed, seconds = run_over_seeds(args, "long", run_seed, f"{args.iterations} iterations, human shares {shares}")
    table = summarize(per_seed)
    write_results(args.out, "long", dict(summary=table, per_seed=per_seed, wall_seconds=seconds),
                  markdown(table, per_seed, args.tolerance),
                  lambda path: plot({f"{n.replace('human_', '')} human": t for n, t in table.items()}, path,
                                    f"toy world: SAIL over {last_done(table)} iterations by share of human pairs (mean ± sd over seeds)"))


def last_done(table):
    return max(i for t in table.values() for i, stat in enumerate(t["mean"]) if stat)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/long"), help="output folder")
    p.add_argument("--seeds", type=int, nargs="+", default=[2, 3, 4], help="data seeds (0 and 1 tuned the toy world)")
    p.add_argument("--human-shares", type=float, nargs="+", default=[0.0, 0.25, 0.75], help="share of human pairs in each mix")
    p.add_argument("--share-jobs", type=int, default=1, help="runs of one seed side by side")
    p.add_argument("--val-pairs", type=int, default=500, help="held-out human pairs for the drift guard (0: no guard)")
    p.add_argument("--tolerance", type=float, default=0.02, help="the drift guard's GUARD_TOLERANCE")
    p.add_argument("--rater-noise", type=float, default=0.0, help="toy.data --rater-noise: a noisy human (0: the oracle)")
    p.add_argument("--data-args", default="", help="extra flags for toy.data, e.g. '--pool-size 128 --n-universe 288'")
    p.add_argument("--train-args", default="", help="extra flags for 00/04, e.g. '--lr 1e-5 --max-steps 30'")
    p.add_argument("--compare", type=Path, nargs="+", help="instead of running: tabulate these study outputs side by side in --out")
    add_study_flags(p)
    p.set_defaults(iterations=6)
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
