"""The loop's two drift guards, as rules: the held-out guard (the model's self-reward accuracy on
held-out human pairs, per iteration, and where it fell below its best) and the spot check (a human's
agreement with the self-labelled pairs, and when it fell far enough to stop).
"""
import json

from sail import common, files

STOP = 3  # exit status that tells run_all.sh to end the loop


def read_accuracies(guard_dir, last):
    """{iteration: (accuracy, n pairs)} of the K common-draw reward for iterations 0 .. last."""
    found = {}
    for it in range(last + 1):
        path = guard_dir / files.iteration_name(it) / "reward_accuracy.json"
        if not path.is_file():
            raise common.SailError(f"{path}: not found (05_eval.py --reward-accuracy writes it; run_all.sh runs it)")
        results = [r for r in json.loads(path.read_text())["results"] if "common draws" in r["method"]]
        if len(results) != 1:
            raise common.SailError(f"{path}: expected one common-draw result, found {len(results)}")
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


def stops(reference, agreement, drop=None, below=None):
    """The rule: the agreement more than drop below the reference (the first iteration checked), or below `below`."""
    return (below is not None and agreement < below) or (drop is not None and reference - agreement > drop)
