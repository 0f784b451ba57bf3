"""tools/drift_guard.py: the best iteration by held-out self-reward accuracy, and when to stop."""
import json

import pytest

from sail import common, files, guards
from tools import drift_guard


def write_accuracies(run, accuracies, n=100):
    for it, acc in enumerate(accuracies):
        folder = run / "eval" / "guard" / files.iteration_name(it)
        folder.mkdir(parents=True)
        (folder / "reward_accuracy.json").write_text(json.dumps(dict(results=[
            dict(method="self-reward K=10 common draws", accuracy=acc, n=n)])))


def guard(run, it, *flags):
    return drift_guard.main(drift_guard.build_parser().parse_args(["--run", str(run), "--iter", str(it), *flags]))


@pytest.mark.parametrize("accuracies, stops, best", [
    ([0.70, 0.80, 0.79], False, "iter_02"),   # within the tolerance: the latest
    ([0.70, 0.80, 0.75], True, "iter_01"),    # fell by 0.05
    ([0.70, 0.72, 0.74], False, "iter_02"),   # still rising
    ([0.80, 0.80, 0.80], False, "iter_02"),   # equal: the latest is the best
    ([0.80, 0.85, 0.82], True, "iter_01"),    # fell by 0.03, above iteration 0 still
])
def test_stop_and_best(tmp_path, accuracies, stops, best):
    write_accuracies(tmp_path, accuracies)
    assert guard(tmp_path, 2, "--stop") == (guards.STOP if stops else 0)
    record = json.loads((tmp_path / "eval" / "guard" / "guard.json").read_text())
    assert record["best"] == best and record["accuracy"]["iter_02"] == accuracies[2] and record["pairs"] == 100
    assert record["stopped_after"] == ("iter_02" if stops else None)
    assert guard(tmp_path, 2) == 0  # without --stop it only reports


def test_iteration_zero_never_stops_and_a_missing_score_is_named(tmp_path):
    write_accuracies(tmp_path, [0.7])
    assert guard(tmp_path, 0, "--stop", "--tolerance", "-1") == 0
    with pytest.raises(common.SailError, match="iter_01/reward_accuracy.json: not found"):
        guard(tmp_path, 1)
