"""toy/study_long.py: the long runs' commands, per-iteration measures, diversity, the drift guard's choices,
table and plot; slow: the whole study on tiny models."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sail.common import SailError
from toy import study_long, world

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def picture(shape="circle", colour="red", xy=(16, 16), r=6.5):
    return world.render_clean(shape, world.COLOURS[colour], *xy, r)


def test_diversity_in_pixels_and_attributes():
    red, green = picture(), picture(colour="green")
    assert world.diversity([red, red]) == dict(pixels=0.0, attributes=0.0)
    assert world.diversity([red, green])["attributes"] == 0.25  # only the colour differs
    small_square = picture("square", xy=(10, 10), r=4.0)  # shape, size and position differ
    assert world.diversity([red, small_square])["attributes"] == 0.75
    three = world.diversity([red, green, small_square])
    assert three["attributes"] == pytest.approx((0.25 + 0.75 + 1.0) / 3)
    rms = np.sqrt(np.mean((red - green) ** 2)) / 255
    assert world.diversity([red, green])["pixels"] == pytest.approx(rms) and rms > 0.1
    assert world.diversity([red]) == dict(pixels=0.0, attributes=0.0)


def test_every_share_gets_its_run_with_the_guard(tmp_path, monkeypatch):
    calls = []

    def record(self, name, *cmd, extra_env=None):
        calls.append(([str(c) for c in cmd], extra_env or {}))

    monkeypatch.setattr(study_long.StageLog, "__call__", record)
    monkeypatch.setattr(study_long, "share_seed_data", lambda run, folder: calls.append((["share", str(folder)], {})))
    monkeypatch.setattr(study_long, "measure_run", lambda folder, t: fake_measures(0.0))
    args = study_long.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "3", "--human-shares", "0", "0.25",
                                            "--rater-noise", "0.15"])
    result = study_long.run_seed(args, 3, dict(data="", steps=None, draws=10, images_per_prompt=4, heldout=128))
    data = calls[0][0]
    assert data[data.index("--val-pairs") + 1] == "500" and data[data.index("--n-pools") + 1] == "6"
    assert data[data.index("--rater-noise") + 1] == "0.15"
    loops = {env["HUMAN_SHARE"]: env for cmd, env in calls if "run_all.sh" in " ".join(cmd)}
    assert set(loops) == {"0", "0.25"} and all(env["GUARD"] == "report" for env in loops.values())
    assert loops["0.25"]["RUN"] == str(tmp_path / "seed_3" / "human_0.25") and "--seed 3" in loops["0.25"]["TRAIN_ARGS"]
    assert ["share", str(tmp_path / "seed_3" / "human_0")] in [c for c, _ in calls]
    assert set(result["runs"]) == set(result["guard"]) == {"human_0", "human_0.25"}
    assert "--val-pairs" in data and "--pool-size" not in data


def test_extra_flags_reach_the_data_and_the_training(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study_long.StageLog, "__call__", lambda self, name, *cmd, extra_env=None: calls.append((cmd, extra_env or {})))
    monkeypatch.setattr(study_long, "share_seed_data", lambda run, folder: None)
    monkeypatch.setattr(study_long, "measure_run", lambda folder, t: fake_measures(0.0))
    args = study_long.build_parser().parse_args(["--out", str(tmp_path), "--human-shares", "0.25", "--val-pairs", "0",
                                            "--data-args=--pool-size 128 --n-universe 288", "--train-args=--lr 1e-5 --max-steps 30"])
    study_long.run_seed(args, 0, dict(data="", steps=None, draws=10, images_per_prompt=4, heldout=128))
    data = [str(c) for c in calls[0][0]]
    assert data[data.index("--pool-size") + 1] == "128" and data[data.index("--n-universe") + 1] == "288"
    assert data[data.index("--val-pairs") + 1] == "0"
    assert calls[1][1]["TRAIN_ARGS"].split() == ["--seed", "0", "--lr", "1e-5", "--max-steps", "30"]


def fake_run(folder, iterations=2):
    """A finished run folder: oracle report, guard accuracies, self pairs, eval images, candidates."""
    names = ["base"] + [f"iter_0{i}" for i in range(iterations + 1)]
    report = {n: dict(mean=0.25 + 0.01 * k, prompt=0.2, taste=0.3 + 0.01 * k, delta=0.01 * k, win_rate=0.7)
              for k, n in enumerate(names)}
    for i in range(1, iterations + 1):
        report[f"iter_0{i}"]["self_reward_agreement"] = 0.9
    (folder / "eval" / "guard").mkdir(parents=True)
    (folder / "eval" / "oracle_report.json").write_text(json.dumps(report))
    (folder / "eval" / "guard" / "guard.json").write_text(json.dumps(
        dict(accuracy={f"iter_0{i}": 0.8 - 0.01 * i for i in range(iterations + 1)})))
    for k, name in enumerate(names):  # eval images: two per prompt, the same (base) or red and green
        images = folder / "eval" / "oracle" / name / "images"
        images.mkdir(parents=True)
        rows = []
        for i, colour in enumerate(("red", "red" if name == "base" else "green")):
            Image.fromarray(picture(colour=colour).round().astype(np.uint8)).save(images / f"p_{i}.png")
            rows.append(dict(prompt_id="p", image=f"images/p_{i}.png"))
        (images.parent / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for i in range(1, iterations + 1):
        it = folder / f"iter_0{i}"
        it.mkdir()
        (it / "pairs.jsonl").write_text("".join(json.dumps(dict(p=p)) + "\n" for p in (0.95, 0.6, 0.99, 0.3)))
    gens = folder / "iter_01"  # the candidates iteration 0 drew: one prompt, the same picture twice
    (gens / "images").mkdir()
    Image.fromarray(picture().round().astype(np.uint8)).save(gens / "images" / "c.png")
    (gens / "generations.jsonl").write_text(2 * (json.dumps(dict(prompt_id="q", image="images/c.png")) + "\n"))


def test_measures_of_a_run(tmp_path):
    fake_run(tmp_path)
    m = study_long.measure_run(tmp_path, 2)
    assert m["mean"] == pytest.approx([0.26, 0.27, 0.28]) and m["heldout_accuracy"] == pytest.approx([0.8, 0.79, 0.78])
    assert m["confident"] == [None, 0.5, 0.5] and m["self_agreement"] == [None, 0.9, 0.9]
    assert m["diversity_attributes"] == [0.25, 0.25, 0.25] and m["base"]["diversity_attributes"] == 0.0
    assert m["candidate_diversity_pixels"] == [0.0, None, None]  # iteration 0's candidates are identical
    assert m["base"]["mean"] == 0.25
    report_path = tmp_path / "eval" / "oracle_report.json"
    first_report = report_path.read_text()
    report = json.loads(first_report)
    report["iter_02"]["mean"] = 0.4
    report_path.write_text(json.dumps(report))
    assert study_long.measure_run(tmp_path, 2)["mean"][2] == 0.4  # a new report (the run went on): measured again
    report_path.write_text(first_report)
    assert study_long.measure_run(tmp_path, 2) == m
    for image in tmp_path.glob("**/*.png"):
        image.unlink()
    assert study_long.measure_run(tmp_path, 2) == m  # cached in eval/long.json: the images are not read again


def fake_measures(shift, accuracy=(0.85, 0.85, 0.84), scores=(0.27, 0.30, 0.28)):
    m = {k: [0.1 + shift] * 3 for k in study_long.MEASURES}
    m.update(heldout_accuracy=list(accuracy), mean=[None if s is None else s + shift for s in scores], confident=[None, 1.0, 1.0])
    m["base"] = dict(mean=0.26, prompt=0.23, taste=0.29, diversity_pixels=0.24, diversity_attributes=0.64)
    return m


@pytest.mark.parametrize("accuracy, best, stopped_after, keeps", [
    ((0.85, 0.85, 0.84), 2, None, 2),   # flat within the tolerance: the latest
    ((0.85, 0.86, 0.80), 1, 2, 1),      # fell by 0.06 after the best
    ((0.80, 0.84, 0.83), 2, None, 2),
    ((0.86, 0.83, 0.86), 2, 1, 0),      # stops after a dip the full run would have seen recover
])
def test_guard_choice(accuracy, best, stopped_after, keeps):
    g = study_long.guard_choice(fake_measures(0.0, accuracy), 0.02)
    assert (g["best"], g["stopped_after"], g["stop_keeps"], g["peak"]) == (best, stopped_after, keeps, 1)
    scores = (0.27, 0.30, 0.28)
    assert g["best_loss"] == pytest.approx(0.30 - scores[best]) and g["stop_loss"] == pytest.approx(0.30 - scores[keeps])
    assert g["last_loss"] == pytest.approx(0.02)


def test_guard_choice_skips_unfinished_iterations():
    m = fake_measures(0.0, (0.85, 0.85, None), (0.27, 0.30, None))
    assert study_long.guard_choice(m, 0.02)["best"] == 1


def test_table_and_plot(tmp_path):
    per_seed = [dict(seed=s, runs={"human_0": fake_measures(shift), "human_0.25": fake_measures(shift)})
                for s, shift in ((2, 0.0), (3, 0.02))]
    for s in per_seed:
        s["guard"] = {n: study_long.guard_choice(r, 0.02) for n, r in s["runs"].items()}
    table = study_long.summarize(per_seed)
    mean, sd, values = table["human_0"]["mean"][1]
    assert values == pytest.approx([0.30, 0.32]) and mean == pytest.approx(0.31)
    text = study_long.markdown(table, per_seed, 0.02)
    assert "### 0.25 human pairs in the mix" in text and "data seeds 2, 3" in text
    assert "| 1 | 0.310 ± 0.014 |" in text and "Of 4 runs, the guard's best is the oracle's peak in 0" in text
    assert study_long.plot(table, tmp_path / "long.png", "title")
    assert (tmp_path / "long.png").stat().st_size > 10_000


def test_runs_without_held_out_pairs_have_no_guard(tmp_path):
    fake_run(tmp_path)
    (tmp_path / "eval" / "guard" / "guard.json").unlink()
    m = study_long.measure_run(tmp_path, 2)
    assert m["heldout_accuracy"] == [None, None, None] and m["mean"] == pytest.approx([0.26, 0.27, 0.28])
    assert study_long.guard_choice(m, 0.02) is None
    per_seed = [dict(seed=2, runs={"human_0.25": m}, guard={"human_0.25": None})]
    text = study_long.markdown(study_long.summarize(per_seed), per_seed, 0.02)
    assert "| 2 | 0.280 ± 0.000 |" in text and "drift guard" not in text


def fake_study(folder, shift, data_args, train_args, steps, pairs):
    """A finished study output: long.json and long.args.json, and each run's train.args.json."""
    per_seed = [dict(seed=s, runs={"human_0.25": fake_measures(shift + 0.01 * s)}) for s in (0, 1)]
    folder.mkdir()
    (folder / "long.json").write_text(json.dumps(dict(summary=study_long.summarize(per_seed), per_seed=per_seed)))
    (folder / "long.args.json").write_text(json.dumps(dict(data_args=data_args, train_args=train_args)))
    for s in (0, 1):
        for i in range(3):
            it = folder / f"seed_{s}" / "human_0.25" / f"iter_0{i}"
            it.mkdir(parents=True)
            (it / "train.args.json").write_text(json.dumps(dict(max_steps=steps, batch_size=32, num_pairs=pairs + s)))


def test_compare_settings(tmp_path):
    fake_study(tmp_path / "steps300", 0.0, "", "", 300, 85)
    fake_study(tmp_path / "steps30", 0.05, "--pool-size 128", "--lr 1e-5 --max-steps 30", 30, 170)
    args = study_long.build_parser().parse_args(["--out", str(tmp_path / "out"), "--compare", str(tmp_path / "steps300"),
                                            str(tmp_path / "steps30")])
    study_long.main(args)
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "- steps30: data seeds 0, 1; toy.data --pool-size 128; 00/04 --lr 1e-5 --max-steps 30" in text
    assert "- steps300: data seeds 0, 1; toy.data (defaults); 00/04 (the toy preset: 300 steps of 32 pairs at lr 1e-06)" in text
    assert "| steps300, 0.25 human | 1 | 86 | 112 | " in text  # 300 x 32 / 85 and / 86, averaged
    assert "| steps30, 0.25 human | 2 | 170 | 6 | " in text
    assert "0.355 ± 0.007" not in text and "| steps30, 0.25 human | 1 | 170 | 6 | +0.155 ± 0.007 |" in text
    assert (tmp_path / "out" / "compare.png").stat().st_size > 10_000
    args.compare.append(tmp_path / "unfinished")
    with pytest.raises(SailError, match="unfinished/long.json not found"):
        study_long.main(args)


@pytest.mark.slow
def test_long_study_on_tiny_models(tmp_path):
    """The study's stages on tiny random models: three shares, the guard each iteration."""
    out = tmp_path / "long"
    cmd = [sys.executable, "-m", "toy.study_long", "--out", str(out), "--preset", "tiny-sd15", "--quick", "--seeds", "0",
           "--iterations", "2", "--share-jobs", "3", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for share in ("0", "0.25", "0.75"):
        run = out / "seed_0" / f"human_{share}"
        assert json.loads((run / "iter_02" / "ckpt" / "sail.json").read_text())["iteration"] == 2
        assert set(json.loads((run / "eval" / "guard" / "guard.json").read_text())["accuracy"]) == {"iter_00", "iter_01", "iter_02"}
    result = json.loads((out / "long.json").read_text())
    assert len(result["summary"]["human_0.25"]["mean"]) == 3 and (out / "long.png").is_file()
    assert Path(out / "long.md").read_text().count("human pairs in the mix") == 3
