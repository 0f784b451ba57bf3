"""toy/study.py: the table and plot writer on made-up numbers, and the whole study on tiny models."""
import json
import subprocess
import sys

import numpy as np
import pytest

from toy import study


def fake_seed(seed, shift):
    oracle = {"base": dict(mean=0.20 + shift, n=256)}
    for k, (name, _, _) in enumerate(study.MODELS[1:], 1):
        oracle[name] = dict(mean=0.20 + shift + 0.01 * k, n=256, delta=0.01 * k, win_rate=0.5 + 0.02 * k)
    oracle["iter_01"]["self_reward_agreement"] = 0.9 + shift
    accuracy = {f"iter_00: self-reward K={k} {c} draws": 0.6 + 0.001 * k + (0.1 if c == "common" else 0) + shift
                for k in (1, 10, 30) for c in ("common", "own")}
    return dict(seed=seed, oracle=oracle, heldout_accuracy=accuracy, steps_per_iteration=300, dpo_all_labels_steps=300,
                dpo_all_labels_long_steps=900, dpo_all_labels_lr=1e-4, heldout_pairs=128, data=dict(seed_slots=564, universe_slots=9408, pairs=dict(pairs=504),
                                             all_pairs=dict(pairs=8400)))


def test_summary_table_and_plot(tmp_path):
    per_seed = [fake_seed(2, 0.0), fake_seed(3, 0.02), fake_seed(4, 0.04)]
    summary = study.summarize(per_seed)
    mean, sd, values = summary["models"]["iter_02"]["mean"]
    assert values == pytest.approx([0.23, 0.25, 0.27]) and mean == pytest.approx(0.25) and sd == pytest.approx(0.02)
    assert summary["models"]["iter_01"]["self_reward_agreement"][0] == pytest.approx(0.92)
    assert summary["models"]["base"]["delta"] is None  # the base has no difference with itself
    assert summary["accuracy"]["iter_00: self-reward K=10 common draws"][0] == pytest.approx(0.73)
    assert summary["seeds"] == [2, 3, 4]

    table = study.markdown(summary, per_seed)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["DPO on all labels"].split(" | ")[1] == "100%"
    assert rows["SAIL iteration 2"].split(" | ")[1] == "6%"
    assert "0.250 ± 0.020" in rows["SAIL iteration 2"] and "+0.030 ± 0.000" in rows["SAIL iteration 2"]
    assert "92.0% ± 2.0" in rows["SAIL iteration 1"]
    assert "at lr 0.0001 on 8400 pairs against the seed's 504" in table and "data seeds 2, 3, 4" in table
    assert all(label in rows for _, label, _ in study.MODELS)

    assert study.plot(summary, tmp_path / "study.png")
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_summary_of_one_seed_has_zero_spread_and_skips_missing_models():
    one = fake_seed(0, 0.0)
    del one["oracle"]["ablation_n2"]
    summary = study.summarize([one])
    assert "ablation_n2" not in summary["models"]
    assert summary["models"]["iter_01"]["delta"][1] == 0.0
    assert "N = 2" not in study.markdown(summary, [one])


def test_heldout_pairs_leave_out_the_seed(tmp_path):
    seed_dir = tmp_path / "seed"
    seed_dir.mkdir()
    rows = [dict(prompt=f"p{i}", image_w=f"images/{i}w.png", image_l=f"images/{i}l.png", source="human") for i in range(10)]
    (seed_dir / "all_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (seed_dir / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    path = study.write_heldout_pairs(seed_dir, 5, seed=0)
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(got) == 5 and not {r["prompt"] for r in got} & {"p0", "p1", "p2"}
    assert study.write_heldout_pairs(seed_dir, 5, seed=0).read_text() == path.read_text()


def test_quick_study_on_tiny_models(tmp_path):
    """Every stage of the study on one seed with tiny random models: the files and the numbers'
    plumbing, not the numbers (random weights learn nothing)."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "toy.study", "--out", str(out), "--preset", "tiny-sd15", "--quick", "--seeds", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = out / "seed_0"
    for name, _, _ in study.MODELS[1:]:
        folder = "iter_00" if name == "iter_00" else name
        assert (run / folder / "ckpt" / "sail.json").is_file(), folder
    sources = {name: [json.loads(line)["source"] for line in (run / name / "train_pairs.jsonl").read_text().splitlines()]
               for name in ("ablation_no_mixup", "ablation_human_share_0.75", "iter_01")}
    assert "human" not in sources["ablation_no_mixup"]
    assert sources["ablation_human_share_0.75"].count("human") > sources["ablation_human_share_0.75"].count("self")
    gens = [json.loads(line) for line in (run / "ablation_n2" / "generations.jsonl").read_text().splitlines()]
    assert {g["index"] for g in gens} == {0, 1} and all(g["image"].startswith("../iter_01/") for g in gens)
    assert json.loads((run / "dpo_all_labels_long" / "ckpt" / "sail.json").read_text())["lr"] == study.build_parser().get_default("dpo_all_lr")
    assert json.loads((run / "dpo_all_labels" / "ckpt" / "sail.json").read_text())["pair_counts"]["human"] > \
        json.loads((run / "iter_00" / "ckpt" / "sail.json").read_text())["pair_counts"]["human"]

    result = json.loads((out / "study.json").read_text())
    assert set(result["summary"]["models"]) == {name for name, _, _ in study.MODELS}
    assert any(k.startswith("iter_00: self-reward K=1 own") for k in result["summary"]["accuracy"])
    assert (out / "study.md").read_text().count("\n| ") >= len(study.MODELS) + 2
    assert (out / "study.png").is_file() and (out / "study.args.json").is_file()

    stamp = (run / "ablation_n4" / "ckpt" / "sail.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (run / "ablation_n4" / "ckpt" / "sail.json").stat().st_mtime_ns == stamp
    assert np.allclose(json.loads((out / "study.json").read_text())["summary"]["models"]["iter_01"]["mean"][0],
                       result["summary"]["models"]["iter_01"]["mean"][0])
