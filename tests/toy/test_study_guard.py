"""toy/study_guard.py: the spot check and the held-out guard replayed on a made-up finished run whose
self pairs the oracle judges right or wrong by construction, with known answers."""
import json

import numpy as np
import pytest
from PIL import Image

from sail import common, files
from toy import study_guard, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a medium red circle in the center"
SCORES = [0.30, 0.34, 0.35, 0.30]  # iteration 0 .. 3: the peak is iteration 2
RIGHT = [8, 6, 2]  # of the 8 self pairs of iterations 1, 2, 3, this many have the oracle's winner as image_w


def fake_run(folder, rater_noise=0.0, heldout=None):
    images = folder / "images"
    images.mkdir(parents=True)
    good = world.render_clean("circle", world.COLOURS["red"], 16, 16, world.SIZES["medium"])
    bad = world.render_clean("square", world.COLOURS["blue"], 8, 24, world.SIZES["small"])
    for name, pixels in (("good", good), ("bad", bad)):
        Image.fromarray(pixels.astype(np.uint8)).save(images / f"{name}.png")
    assert world.oracle_score(PROMPT, good) > world.oracle_score(PROMPT, bad) + 0.1
    for i, right in enumerate(RIGHT, start=1):
        rows = [dict(prompt=PROMPT, prompt_id=f"p{j}", image_w=f"../images/{'good' if j < right else 'bad'}.png",
                     image_l=f"../images/{'bad' if j < right else 'good'}.png", source="self") for j in range(8)]
        files.write_jsonl_atomic(folder / files.iteration_name(i) / "pairs.jsonl", rows)
    report = {"base": dict(mean=0.26)} | {files.iteration_name(i): dict(mean=s) for i, s in enumerate(SCORES)}
    files.write_json_atomic(folder / "eval" / "oracle_report.json", report)
    files.write_json_atomic(folder / "toy_world.data.json", dict(rater_noise=rater_noise, tie_margin=0.02))
    if heldout:
        files.write_json_atomic(folder / "eval" / "guard" / "guard.json",
                                    dict(accuracy={files.iteration_name(i): a for i, a in enumerate(heldout)}))
    return folder


@pytest.mark.parametrize("rule, limit, kept", [("below", 0.7, 2), ("below", 0.8, 1), ("below", 0.2, 3),
                                               ("drop", 0.15, 1), ("drop", 0.3, 2), ("drop", 0.8, 3)])
def test_spot_check_on_every_pair(tmp_path, rule, limit, kept):
    run = study_guard.load_run(fake_run(tmp_path / "run"))
    assert [study_guard.agreement(run, i) for i in (1, 2, 3)] == [1.0, 0.75, 0.25]
    assert study_guard.spot_check_keeps(run, 0, rule, limit, np.random.default_rng(0)) == kept


def test_noisy_human_agrees_less_and_draws_are_seeded(tmp_path):
    run = study_guard.load_run(fake_run(tmp_path / "run", rater_noise=0.2))
    (w, l), = set(run["pairs"][1])
    p = 1 / (1 + np.exp(-(w - l) / 0.2))
    assert study_guard.agreement(run, 1) == pytest.approx(p) and study_guard.agreement(run, 1, human=False) == 1.0
    answers = [study_guard.human_agrees(w, l, 0.2, 0.02, np.random.default_rng(s)) for s in range(2000)]
    assert np.mean(answers) == pytest.approx(p, abs=0.03)
    draws = [[study_guard.spot_check_keeps(run, 4, "below", 0.7, np.random.default_rng(7)) for _ in range(2)] for _ in range(2)]
    assert draws[0] == draws[1]


def test_the_study_against_its_baselines(tmp_path):
    fake_run(tmp_path / "runs" / "a", heldout=[0.85, 0.85, 0.80, 0.85])
    args = study_guard.build_parser().parse_args(["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                                            "--spot-pairs", "0", "4", "--thresholds", "0.7", "--drops", "0.15", "--draws", "20"])
    study_guard.main(args)
    table = json.loads((tmp_path / "out" / "guard.json").read_text())["summary"]
    group = "T = 3, the oracle as human"
    assert table["spot M=all, below 0.7"][group] == dict(keeps_peak=1.0, given_up=0.0, kept=2.0, runs=1)
    assert table["spot M=all, 0.15 below iteration 1"]["all runs"]["given_up"] == pytest.approx(0.01)
    assert table["last model"][group]["given_up"] == pytest.approx(0.05)
    assert table["iteration 2"][group]["kept"] == 2.0
    assert table["held-out guard, GUARD=stop"][group]["kept"] == 1.0  # fell 0.05 after iteration 2, keeps the latest of the best
    assert 1.0 <= table["spot M=4, below 0.7"][group]["kept"] <= 3.0
    text = (tmp_path / "out" / "guard.md").read_text()
    assert "| a | oracle | +0.040 +0.080 +0.090 +0.040 | 100% 75% 25% | 100% 75% 25% | 2 |" in text
    with pytest.raises(common.SailError, match="no run with"):
        study_guard.main(study_guard.build_parser().parse_args(["--out", str(tmp_path / "o2"), "--runs", str(tmp_path / "out")]))
