"""The drift guard: does the model's self-reward still agree with human labels it never trained on?

After each iteration, run_all.sh scores held-out human pairs (<run>/val/pairs.jsonl: never in the seed
or in any training mix) with the new model's own implicit reward (05_eval.py --reward-accuracy, the
same K common draws as 02), and this script reads those accuracies, prints them side by side and
records the best iteration (the latest within the tolerance of the highest accuracy). A self-reward
that drifts away from human taste is what makes later iterations train on wrong pairs; the guard
needs no oracle, only pairs that were set aside. (In the toy world these pairs, drawn by the base
model, did not see the drift: README, "The drift guard".)

Command (run_all.sh runs it after each iteration when val/pairs.jsonl exists; GUARD=stop passes --stop):
    python drift_guard.py --run runs/toy --iter 2 [--stop] [--tolerance 0.02]
With --stop it exits with status 3 when iteration ITER's accuracy is below the highest so far by
more than --tolerance; run_all.sh then ends the loop and names the best checkpoint.

Reads:  <run>/eval/guard/iter_XX/reward_accuracy.json for XX = 0 .. ITER (05_eval.py writes them).
Writes: <run>/eval/guard/guard.json (accuracy per iteration, the best, whether it stopped); log.txt.
"""
import argparse
import json
import logging
import sys
from pathlib import Path

import run_files

log = logging.getLogger("sail")
STOP = 3  # exit status that tells run_all.sh to end the loop


def read_accuracies(guard_dir, last):
    """{iteration: (accuracy, n pairs)} of the K common-draw reward for iterations 0 .. last."""
    found = {}
    for it in range(last + 1):
        path = guard_dir / run_files.iteration_name(it) / "reward_accuracy.json"
        if not path.is_file():
            raise run_files.SailError(f"{path}: not found (05_eval.py --reward-accuracy writes it; run_all.sh runs it)")
        results = [r for r in json.loads(path.read_text())["results"] if "common draws" in r["method"]]
        if len(results) != 1:
            raise run_files.SailError(f"{path}: expected one common-draw result, found {len(results)}")
        found[it] = (results[0]["accuracy"], results[0]["n"])
    return found


def best_iteration(accuracies, tolerance):
    """The latest iteration whose accuracy is within tolerance of the highest: the model GUARD=stop
    would have gone on from, since accuracies that differ by less than the tolerance do not stop it."""
    top = max(accuracies.values())
    return max(it for it, acc in accuracies.items() if top - acc <= max(tolerance, 0.0))


def fell_below_best(accuracies, iteration, tolerance):
    """GUARD=stop's rule: iteration's accuracy more than tolerance below the highest up to it."""
    return max(acc for it, acc in accuracies.items() if it <= iteration) - accuracies[iteration] > tolerance


def main(args):
    guard_dir = Path(args.run) / "eval" / "guard"
    run_files.setup_logging(guard_dir, "drift_guard")
    found = read_accuracies(guard_dir, args.iter)
    accuracies = {it: acc for it, (acc, _) in found.items()}
    best = best_iteration(accuracies, args.tolerance)
    stop = args.stop and args.iter > 0 and fell_below_best(accuracies, args.iter, args.tolerance)
    row = ", ".join(f"{run_files.iteration_name(it)} {acc:.3f}" for it, (acc, _) in found.items())
    log.info("drift guard: self-reward accuracy on %d held-out human pairs: %s; best %s", found[args.iter][1], row,
             run_files.iteration_name(best))
    if stop:
        log.info("drift guard: %s is %.3f below the highest accuracy (tolerance %.3f): stopping here; use %s",
                 run_files.iteration_name(args.iter), max(accuracies.values()) - accuracies[args.iter], args.tolerance,
                 run_files.checkpoint_dir(args.run, best))
    run_files.write_json_atomic(guard_dir / "guard.json", dict(
        accuracy={run_files.iteration_name(it): acc for it, (acc, _) in found.items()}, pairs=found[args.iter][1],
        best=run_files.iteration_name(best), best_checkpoint=str(run_files.checkpoint_dir(args.run, best)),
        tolerance=args.tolerance, stopped_after=run_files.iteration_name(args.iter) if stop else None))
    return STOP if stop else 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--iter", type=int, required=True, help="the iteration just trained (0 = the seed DPO)")
    p.add_argument("--stop", action="store_true", help="exit with status 3 when the accuracy fell below the best")
    p.add_argument("--tolerance", type=float, default=0.02, help="fall below the best that is not yet a stop")
    return p


if __name__ == "__main__":
    run_files.run_stage(lambda args: sys.exit(main(args)), build_parser().parse_args())
