"""toy/study_lr.py: the learning-rate sweep's commands, data sharing, table and plot; slow: the whole study on tiny models."""
import argparse
import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

from toy import study_lr

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_dpo_setting_reads_lr_and_steps():
    assert study_lr.dpo_setting("3e-5:300") == (3e-5, 300)
    for bad in ("3e-5", "3e-5:x", "a:300"):
        with pytest.raises(argparse.ArgumentTypeError, match="LR:STEPS"):
            study_lr.dpo_setting(bad)


def fake_report(path, shift):
    names = ["base"] + [f"iter_0{i}" for i in range(3)] if "sail_lr" in str(path) else \
        ["base", "dpo_lr1e-06_300", "dpo_lr3e-05_300", "dpo_lr3e-05_900"]
    report = {n: dict(mean=0.2 + shift + 0.01 * k, prompt=0.3, taste=0.2 + 0.01 * k) for k, n in enumerate(names)}
    for k, n in enumerate(names[1:], 1):
        report[n].update(delta=0.01 * k + shift, win_rate=0.7)
    (path / "eval").mkdir(parents=True, exist_ok=True)
    (path / "eval" / "oracle_report.json").write_text(json.dumps(report))


def test_every_run_gets_its_lr_and_steps(tmp_path, monkeypatch):
    """The commands run_seed gives: each DPO run its lr and steps, each SAIL run its lr in TRAIN_ARGS."""
    calls = []

    def record(self, name, *cmd, extra_env=None):
        calls.append((name, [str(c) for c in cmd], extra_env or {}))
        if "toy.report" in cmd:
            fake_report(Path(cmd[cmd.index("--run") + 1]), 0.0)

    monkeypatch.setattr(study_lr.StageLog, "__call__", record)
    monkeypatch.setattr(study_lr, "share_seed_data", lambda run, folder: None)
    args = study_lr.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "0", "--dpo", "1e-6:300", "3e-5:900",
                                            "--sail-lrs", "3e-6"])
    args.out = tmp_path
    seed_dir = tmp_path / "seed_0"
    result = study_lr.run_seed(args, 0, dict(data="", steps=None, draws=10, images_per_prompt=4))
    dpo = {c[1][c[1].index("--out") + 1]: c[1] for c in calls if "04_train.py" in c[1]}
    assert set(dpo) == {str(seed_dir / "dpo_lr1e-06_300" / "ckpt"), str(seed_dir / "dpo_lr3e-05_900" / "ckpt")}
    late = dpo[str(seed_dir / "dpo_lr3e-05_900" / "ckpt")]
    assert late[late.index("--lr") + 1] == "3e-05" and late[late.index("--max-steps") + 1] == "900"
    assert late[late.index("--pairs") + 1].endswith("seed/all_pairs.jsonl")
    (sail,) = [c for c in calls if "run_all.sh" in c[1][1]]
    assert "--lr 3e-06" in sail[2]["TRAIN_ARGS"] and sail[2]["RUN"] == str(seed_dir / "sail_lr3e-06")
    assert "sail_lr3e-06/iter_02" in result["oracle"] and "dpo_lr3e-05_900" in result["oracle"]


@pytest.mark.parametrize("flags, expected", [([], None), (["--rater-noise", "0.2"], "0.2")])
def test_the_labels_come_from_the_chosen_rater(tmp_path, monkeypatch, flags, expected):
    calls = []

    def record(self, name, *cmd, extra_env=None):
        calls.append([str(c) for c in cmd])
        if "toy.report" in cmd:
            fake_report(Path(cmd[cmd.index("--run") + 1]), 0.0)

    monkeypatch.setattr(study_lr.StageLog, "__call__", record)
    args = study_lr.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "0", "--dpo", "--sail-lrs", *flags])
    args.out = tmp_path
    study_lr.run_seed(args, 0, dict(data="", steps=None, draws=10, images_per_prompt=4))
    (data,) = [c for c in calls if "--all-labels" in c]
    assert (data[data.index("--rater-noise") + 1] if "--rater-noise" in data else None) == expected
    table = collections.defaultdict(lambda: dict(mean=None))
    assert ("noisy rater at T = 0.2" in study_lr.markdown(args, table, [dict(seed=0, sail_steps=300)])) == bool(expected)


def test_sail_runs_share_the_seed_data(tmp_path):
    run, folder = tmp_path / "seed_0", tmp_path / "seed_0" / "sail_lr1e-06"
    for name in ("pools", "eval", "seed/images"):
        (run / name).mkdir(parents=True)
    for name in ("pools/iter_01.jsonl", "eval/prompts.jsonl", "toy_world.data.json", "seed/stats.json",
                 "seed/images/a.png", "seed/images/b.png", "seed/images/c.png"):
        (run / name).write_text(name)
    (run / "seed" / "pairs.jsonl").write_text(json.dumps(dict(prompt="p", image_w="images/a.png", image_l="images/b.png")) + "\n")
    (run / "val" / "images").mkdir(parents=True)
    (run / "val" / "images" / "v.png").write_text("v")
    (run / "val" / "pairs.jsonl").write_text(json.dumps(dict(prompt="q", image_w="images/v.png", image_l="images/v.png")) + "\n")
    study_lr.share_seed_data(run, folder)
    assert sorted(p.name for p in (folder / "seed" / "images").iterdir()) == ["a.png", "b.png"]  # only the seed's images
    assert (folder / "val" / "images" / "v.png").stat().st_ino == (run / "val" / "images" / "v.png").stat().st_ino
    assert (folder / "val" / "pairs.jsonl").read_text() == (run / "val" / "pairs.jsonl").read_text()  # the drift guard's pairs
    assert (folder / "pools" / "iter_01.jsonl").stat().st_ino == (run / "pools" / "iter_01.jsonl").stat().st_ino
    assert json.loads((folder / "seed" / "pairs.jsonl").read_text()) == json.loads((run / "seed" / "pairs.jsonl").read_text())
    study_lr.share_seed_data(run, folder)  # finished: nothing to do


def test_table_and_plot(tmp_path):
    args = study_lr.build_parser().parse_args(["--dpo", "1e-6:300", "3e-5:300", "3e-5:900", "--sail-lrs", "1e-6"])
    per_seed = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        for path in (tmp_path / f"s{seed}", tmp_path / f"s{seed}" / "sail_lr1e-06"):
            fake_report(path, shift)
        oracle = json.loads((tmp_path / f"s{seed}" / "eval" / "oracle_report.json").read_text())
        oracle.update({f"sail_lr1e-06/{k}": v for k, v in
                       json.loads((tmp_path / f"s{seed}" / "sail_lr1e-06" / "eval" / "oracle_report.json").read_text()).items()})
        per_seed.append(dict(seed=seed, oracle=oracle, sail_steps=300))
    table = study_lr.summarize(args, per_seed)
    mean, sd, values = table["dpo_lr3e-05_900"]["delta"]
    assert values == pytest.approx([0.03, 0.05]) and mean == pytest.approx(0.04)
    text = study_lr.markdown(args, table, per_seed)
    lines = [line for line in text.splitlines() if line.startswith("| DPO")]
    assert [line.split(" | ")[1:3] for line in lines] == [["1e-06", "300"], ["3e-05", "300"], ["3e-05", "900"]]
    assert "+0.040 ± 0.014 (+0.030 / +0.050)" in lines[2]
    assert "| SAIL iteration 2 | 1e-06 |" in text and "data seeds 0, 1" in text
    assert study_lr.plot(args, table, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 10_000


@pytest.mark.slow
def test_lr_sweep_on_tiny_models(tmp_path):
    """The sweep's stages on tiny random models: each model trained at its lr."""
    out = tmp_path / "lr"
    cmd = [sys.executable, "-m", "toy.study_lr", "--out", str(out), "--preset", "tiny-sd15", "--quick", "--seeds", "0",
           "--dpo", "1e-4:2", "3e-4:2", "--sail-lrs", "1e-4", "--iterations", "1", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = out / "seed_0"
    for folder, lr in (("dpo_lr0.0001_2", 1e-4), ("dpo_lr0.0003_2", 3e-4), ("sail_lr0.0001/iter_01", 1e-4)):
        assert json.loads((run / folder / "ckpt" / "sail.json").read_text())["lr"] == pytest.approx(lr), folder
    result = json.loads((out / "lr_sweep.json").read_text())
    assert result["summary"]["sail_lr0.0001/iter_01"]["mean"] and (out / "lr_sweep.png").is_file()
