"""Which drift guard would have stopped the toy's SAIL runs at the oracle's peak? Replayed on finished runs.

The held-out guard (tools/drift_guard.py) scores human pairs the base model drew. A spot check asks
the human about the pairs the loop is about to train on instead: before iteration i trains, the
human labels M of its self-labelled best-worst pairs (iter_i/pairs.jsonl, ranked by model i-1's
implicit reward); when they prefer the self-reward's winner less often than a threshold (or by a
margin less often than at iteration 1), the loop stops and keeps model i-1. This script replays
that rule on finished toy runs (any toy/study_long.py or run_all.sh toy output) with each run's own
human (the oracle, or the noisy rater of toy.data --rater-noise; a tie is dropped), over many random
draws of the M pairs, and reports how often it keeps the oracle's peak and how much oracle score it
gives up, beside the held-out guard (GUARD=stop), the last model and iteration 2. Results so far:
toy/RESULTS.md.

Command (M = 0 means all of the iteration's pairs):
    python -m toy.study_guard --out runs/guard --runs runs/long runs/noisy [--spot-pairs 16 32 0] \\
        [--thresholds 0.7 0.8] [--drops 0.1 0.15 0.25] [--draws 200] [--seed 0]

Reads:  every run folder under --runs (a folder with eval/oracle_report.json, toy.report's, and
        iter_XX/pairs.jsonl); its toy_world.data.json (the rater); eval/guard/guard.json if any.
Writes: <out>/guard.json (every run's choices per setting), guard.md (tables), guard.png (keeps
        the peak / score given up against M), guard.args.json, log.txt.
"""
import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from sail import common, files, guards
from toy.results import write_results
from toy.study_long import guard_choice
from toy.world import choice_from_scores, oracle_score, rater_choice, rater_win_probability

log = logging.getLogger("sail")


def find_runs(folders):
    """Run folders under folders (themselves included) that toy.report has scored, sorted."""
    found = {p.parent.parent.resolve() for f in folders for p in Path(f).glob("**/eval/oracle_report.json")}
    runs = sorted(r for r in found if (r / "iter_01" / "pairs.jsonl").is_file())
    if not runs:
        raise common.SailError(f"{', '.join(map(str, folders))}: no run with eval/oracle_report.json and iter_01/pairs.jsonl")
    return runs


def load_run(run):
    """One run's oracle score per model (0 = iteration 0 .. T), its self pairs' oracle scores per
    iteration ({i: [(winner's, loser's)]}), its rater, and the held-out guard's accuracies if any."""
    report = json.loads((run / "eval" / "oracle_report.json").read_text())
    scores, pairs, i = [], {}, 0
    while files.iteration_name(i) in report:
        scores.append(report[files.iteration_name(i)]["mean"])
        i += 1
    for i in range(1, len(scores)):
        rows = files.read_pairs(run / files.iteration_name(i) / "pairs.jsonl")
        pairs[i] = [(oracle_score(r["prompt"], files.load_image(r["_image_w"])),
                     oracle_score(r["prompt"], files.load_image(r["_image_l"]))) for r in rows]
    data = run / "toy_world.data.json"
    settings = json.loads(data.read_text()) if data.is_file() else {}
    guard = run / "eval" / "guard" / "guard.json"
    accuracies = json.loads(guard.read_text())["accuracy"] if guard.is_file() else {}
    return dict(base=report["base"]["mean"], scores=scores, pairs=pairs, rater_noise=settings.get("rater_noise", 0.0),
                tie_margin=settings.get("tie_margin", 0.02),
                heldout={files.iteration_number(k): v for k, v in accuracies.items()})


def human_agrees(score_w, score_l, rater_noise, tie_margin, rng):
    """The run's human on one self pair: True if they prefer the self-reward's winner, None for a tie
    (toy/data.py's rater: ties by the oracle's tie margin dropped, then Bradley-Terry at rater_noise)."""
    choice = rater_choice(score_w, score_l, tie_margin, rater_noise, rng.random)
    return None if choice is None else choice == 0


def agreement(run, i, human=True):
    """Share of iteration i's self pairs (ties dropped) whose winner the run's human (on average over
    the noisy rater's choices) or the oracle (human=False) prefers."""
    kept = [(w, l) for w, l in run["pairs"][i] if choice_from_scores(w, l, run["tie_margin"]) is not None]
    if human and run["rater_noise"] > 0:
        return float(np.mean([rater_win_probability(w, l, run["rater_noise"]) for w, l in kept]))
    return float(np.mean([w > l for w, l in kept]))


def spot_check_keeps(run, spot_pairs, rule, limit, rng):
    """The model the spot check keeps: before iteration i trains, M of its pairs go to the human;
    their agreement with the self-reward's winners below limit (rule "below") or more than limit
    below iteration 1's (rule "drop": a human who disagrees with the oracle often agrees less with
    every pair) stops the loop with model i-1. Never stopped: the last model."""
    first = None
    for i in sorted(run["pairs"]):
        pairs = run["pairs"][i]
        chosen = rng.permutation(len(pairs))[:spot_pairs] if 0 < spot_pairs < len(pairs) else range(len(pairs))
        answers = [human_agrees(*pairs[j], run["rater_noise"], run["tie_margin"], rng) for j in chosen]
        answers = [a for a in answers if a is not None]
        if not answers:
            continue
        agreement = float(np.mean(answers))
        first = agreement if first is None else first
        if guards.stops(first, agreement, **{"below" if rule == "below" else "drop": limit}):
            return i - 1
    return len(run["scores"]) - 1


def heldout_keeps(run, tolerance):
    """What GUARD=stop keeps (study_long.guard_choice: drift_guard's rule on the held-out accuracies); None without a guard."""
    choice = guard_choice(dict(heldout_accuracy=[run["heldout"].get(i) for i in range(len(run["scores"]))],
                               mean=run["scores"]), tolerance)
    return choice and choice["stop_keeps"]


def replay(run, args, index):
    """{setting: [kept model per draw]} for every spot check (M, threshold) and the baselines."""
    keeps = {}
    for m in args.spot_pairs:
        for rule, limit in spot_rules(args):
            rng = np.random.default_rng([args.seed, index, m, int(rule == "drop"), round(1000 * limit)])
            keeps[spot_name(m, rule, limit)] = [spot_check_keeps(run, m, rule, limit, rng) for _ in range(args.draws)]
    last = len(run["scores"]) - 1
    keeps["last model"], keeps["iteration 2"] = [last], [min(2, last)]
    heldout = heldout_keeps(run, args.tolerance)
    if heldout is not None:
        keeps["held-out guard, GUARD=stop"] = [heldout]
    return keeps


def spot_rules(args):
    return [("below", t) for t in args.thresholds] + [("drop", d) for d in args.drops]


def spot_name(spot_pairs, rule, limit):
    return f"spot M={spot_pairs or 'all'}, " + (f"below {limit:g}" if rule == "below" else f"{limit:g} below iteration 1")


def outcome(run, kept):
    """Share of draws that keep the oracle's peak, oracle score given up against it, iterations trained."""
    scores = run["scores"]
    peak = int(np.argmax(scores))
    return dict(peak=peak, keeps_peak=float(np.mean([k == peak for k in kept])),
                given_up=float(np.mean([scores[peak] - scores[k] for k in kept])), kept=float(np.mean(kept)))


def summarize(results):
    """{setting: {group: mean over its runs of keeps_peak, given_up, kept, and runs}}; groups: "all
    runs" and one per number of iterations and human."""
    table = {}
    groups = {"all runs": results}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for name in dict.fromkeys(s for r in results for s in r["outcomes"]):
        table[name] = {}
        for group, members in groups.items():
            found = [r["outcomes"][name] for r in members if name in r["outcomes"]]
            if found:
                table[name][group] = {k: float(np.mean([f[k] for f in found])) for k in ("keeps_peak", "given_up", "kept")}
                table[name][group]["runs"] = len(found)
    return table


def markdown(results, table, args):
    groups = list(dict.fromkeys(g for t in table.values() for g in t))
    lines = [f"## Drift guards replayed on {len(results)} finished toy runs ({args.draws} draws of the spot pairs)", "",
             "Oracle score given up against the run's peak (mean over runs), the share of runs where the guard keeps",
             "the peak, and the mean iteration it keeps; T: iterations the run went to.", "",
             "| guard | " + " | ".join(f"{g} ({max(t.get(g, {}).get('runs', 0) for t in table.values())})" for g in groups) + " |",
             "|---" * (len(groups) + 1) + "|"]
    for name, t in table.items():
        cells = [f"{t[g]['given_up']:.3f} ({100 * t[g]['keeps_peak']:.0f}%, {t[g]['kept']:.1f})" if g in t else "–" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "### Per run: the oracle's gain per iteration, and who agrees with all of the self pairs", "",
              "| run | human | gain over base, iteration 0 .. T | the oracle agrees, 1 .. T | the human agrees | peak |",
              "|---|---|---|---|---|---|"]
    for r in results:
        human = f"rater T = {r['rater_noise']:g}" if r["rater_noise"] else "oracle"
        lines.append(f"| {r['name']} | {human} | {' '.join(f'{d:+.3f}' for d in r['gains'])} | "
                     f"{' '.join(f'{100 * a:.0f}%' for a in r['oracle_agrees'])} | "
                     f"{' '.join(f'{100 * a:.0f}%' for a in r['human_agrees'])} | {r['peak']} |")
    return "\n".join(lines) + "\n"


def plot(table, args, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install matplotlib): skipping %s", out_path)
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ticks = [str(m or "all") for m in args.spot_pairs]
    for rule, limit in spot_rules(args):
        rows = [table[spot_name(m, rule, limit)]["all runs"] for m in args.spot_pairs]
        label = spot_name(0, rule, limit).replace("spot M=all, ", "spot check, ")
        axes[0].plot(ticks, [100 * t["keeps_peak"] for t in rows], "o-", label=label)
        axes[1].plot(ticks, [t["given_up"] for t in rows], "o-", label=label)
    for name, style in (("last model", ":"), ("iteration 2", "-."), ("held-out guard, GUARD=stop", "--")):
        if name in table:
            t = table[name]["all runs"]
            axes[0].axhline(100 * t["keeps_peak"], ls=style, c="grey", label=f"{name} ({t['runs']} runs)")
            axes[1].axhline(t["given_up"], ls=style, c="grey", label=f"{name} ({t['runs']} runs)")
    for ax, label in zip(axes, ("runs where it keeps the oracle's peak (%)", "oracle score given up against the peak")):
        ax.set_xlabel("self pairs the human labels per iteration (M)")
        ax.set_ylabel(label)
    axes[1].legend(fontsize=7)
    fig.suptitle("toy world: drift guards replayed on finished SAIL runs")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main(args):
    args.out = args.out.resolve()
    common.setup_logging(args.out, "guard")
    files.save_args(args.out, "guard", args)
    runs = find_runs(args.runs)
    root = Path(os.path.commonpath([r.parent for r in runs]))
    results = []
    for index, folder in enumerate(runs):
        run = load_run(folder)
        outcomes = {name: outcome(run, kept) for name, kept in replay(run, args, index).items()}
        human = f"rater T = {run['rater_noise']:g}" if run["rater_noise"] else "the oracle as human"
        results.append(dict(name=str(folder.relative_to(root)), rater_noise=run["rater_noise"],
                            group=f"T = {len(run['scores']) - 1}, {human}",
                            gains=[s - run["base"] for s in run["scores"]],
                            oracle_agrees=[agreement(run, i, human=False) for i in sorted(run["pairs"])],
                            human_agrees=[agreement(run, i) for i in sorted(run["pairs"])],
                            peak=int(np.argmax(run["scores"])), outcomes=outcomes))
        log.info("%s: peak at iteration %d of %d", folder, results[-1]["peak"], len(run["scores"]) - 1)
    table = summarize(results)
    write_results(args.out, "guard", dict(summary=table, runs=results), markdown(results, table, args),
                  lambda path: plot(table, args, path))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/guard"), help="output folder")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="finished toy runs, or folders holding them")
    p.add_argument("--spot-pairs", type=int, nargs="+", default=[16, 32, 0], help="self pairs labelled per iteration (0: all)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.7, 0.8], help="agreement below which the loop stops")
    p.add_argument("--drops", type=float, nargs="+", default=[0.1, 0.15, 0.25],
                   help="fall of the agreement from iteration 1's that stops the loop")
    p.add_argument("--draws", type=int, default=200, help="random draws of the spot pairs (and the noisy rater's choices)")
    p.add_argument("--tolerance", type=float, default=0.02, help="the held-out guard's GUARD_TOLERANCE")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
