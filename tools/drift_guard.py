"""The drift guard: does the model's self-reward still agree with human labels it never trained on?

After each iteration, run_all.sh scores held-out human pairs (<run>/val/pairs.jsonl: never in the seed
or in any training mix) with the new model's own implicit reward (05_eval.py --reward-accuracy, the
same K common draws as 02), and this script reads those accuracies, prints them side by side and
records the best iteration (the latest within the tolerance of the highest accuracy). A self-reward
that drifts away from human taste is what makes later iterations train on wrong pairs; the guard
needs no oracle, only pairs that were set aside. How it fared in the toy world: toy/RESULTS.md,
section 8.

Command (run_all.sh runs it after each iteration when val/pairs.jsonl exists; GUARD=stop passes --stop):
    python -m tools.drift_guard --run runs/toy --iter 2 [--stop] [--tolerance 0.02]
With --stop it exits with status 3 when iteration ITER's accuracy is below the highest so far by
more than --tolerance; run_all.sh then ends the loop and names the best checkpoint.

Reads:  <run>/eval/guard/iter_XX/reward_accuracy.json for XX = 0 .. ITER (05_eval.py writes them).
Writes: <run>/eval/guard/guard.json (accuracy per iteration, the best, whether it stopped); log.txt.
"""
import argparse
import logging
import sys
from pathlib import Path

from sail import common, files
from sail.guards import STOP, best_iteration, fell_below_best, read_accuracies

log = logging.getLogger("sail")


def main(args):
    guard_dir = Path(args.run) / "eval" / "guard"
    common.setup_logging(guard_dir, "drift_guard")
    found = read_accuracies(guard_dir, args.iter)
    accuracies = {it: acc for it, (acc, _) in found.items()}
    best = best_iteration(accuracies, args.tolerance)
    stop = args.stop and args.iter > 0 and fell_below_best(accuracies, args.iter, args.tolerance)
    row = ", ".join(f"{files.iteration_name(it)} {acc:.3f}" for it, (acc, _) in found.items())
    log.info("drift guard: self-reward accuracy on %d held-out human pairs: %s; best %s", found[args.iter][1], row,
             files.iteration_name(best))
    if stop:
        log.info("drift guard: %s is %.3f below the highest accuracy (tolerance %.3f): stopping here; use %s",
                 files.iteration_name(args.iter), max(accuracies.values()) - accuracies[args.iter], args.tolerance,
                 files.checkpoint_dir(args.run, best))
    files.write_json_atomic(guard_dir / "guard.json", dict(
        accuracy={files.iteration_name(it): acc for it, (acc, _) in found.items()}, pairs=found[args.iter][1],
        best=files.iteration_name(best), best_checkpoint=str(files.checkpoint_dir(args.run, best)),
        tolerance=args.tolerance, stopped_after=files.iteration_name(args.iter) if stop else None))
    return STOP if stop else 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--iter", type=int, required=True, help="the iteration just trained (0 = the seed DPO)")
    p.add_argument("--stop", action="store_true", help="exit with status 3 when the accuracy fell below the best")
    p.add_argument("--tolerance", type=float, default=0.02, help="fall below the best that is not yet a stop")
    return p


if __name__ == "__main__":
    common.run_stage(lambda args: sys.exit(main(args)), build_parser().parse_args())
