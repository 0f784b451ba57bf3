"""toy/study.py: the table and plot writer on made-up numbers, and the whole study on tiny models."""
import json
import logging
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toy import study

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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


def test_every_ablation_gets_its_stages(tmp_path, monkeypatch):
    """The full study's commands for one seed (recorded, not run): each ablation of iteration 1 from
    iteration 0 on the same candidates, no mixup carried on to iteration 2, DPO on all labels at the
    tuned lr, the held-out accuracies; an ablation already trained is not started again."""
    calls = []

    def record(self, name, *cmd, extra_env=None):
        calls.append((name, [str(c) for c in cmd], extra_env or {}))
        if name.startswith("SAIL loop"):  # what run_all.sh leaves: the data, iteration 1's 8 candidates
            run = Path(extra_env["RUN"])
            (run / "seed").mkdir(parents=True)
            pairs = [dict(prompt=f"p{i}", image_w=f"images/{i}w.png", image_l=f"images/{i}l.png", source="human")
                     for i in range(6)]
            (run / "seed" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs[:2]))
            (run / "seed" / "all_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
            (run / "seed" / "stats.json").write_text(json.dumps(dict(pairs=dict(pairs=2))))
            (run / "iter_01").mkdir()
            (run / "iter_01" / "generations.jsonl").write_text("".join(json.dumps(dict(
                prompt_id="q", prompt="q", index=i, seed=i, image=f"images/q_{i}.png")) + "\n" for i in range(8)))
        if name == "oracle report":
            (Path(cmd[cmd.index("--run") + 1]) / "eval").mkdir(exist_ok=True)
            (Path(cmd[cmd.index("--run") + 1]) / "eval" / "oracle_report.json").write_text("{}")

    monkeypatch.setattr(study.StageLog, "__call__", record)
    args = study.build_parser().parse_args(["--out", str(tmp_path), "--seeds", "3"])
    run = tmp_path / "seed_3"
    (run / "ablation_n4" / "ckpt").mkdir(parents=True)
    (run / "ablation_n4" / "ckpt" / "sail.json").write_text("{}")  # trained already
    result = study.run_seed(args, 3, study.FULL)
    cmds = {name: cmd for name, cmd, _ in calls}

    def flag(name, key):
        return cmds[name][cmds[name].index(key) + 1]

    assert calls[0][2]["K"] == "10" and calls[0][2]["N"] == "8" and "--seed 3" in calls[0][2]["TRAIN_ARGS"]
    assert flag("ablation_random_pairs: 02 self-reward", "--pairing") == "random"
    assert flag("ablation_n2: 02 self-reward", "--pairing") == "best-worst"
    assert "ablation_no_mixup: 02 self-reward" not in cmds and not any(n.startswith("ablation_n4") for n in cmds)
    for name, share in (("ablation_no_mixup", "0.0"), ("ablation_human_share_0.75", "0.75"), ("ablation_n2", "0.25")):
        assert flag(f"{name}: 03 mixup", "--human-share") == share
        assert flag(f"{name}: 04 DPO", "--init") == str(run / "iter_00" / "ckpt") and flag(f"{name}: 04 DPO", "--iter") == "1"
    assert flag("ablation_random_pairs: 03 mixup", "--self-pairs") == str(run / "ablation_random_pairs" / "pairs.jsonl")
    assert flag("ablation_no_mixup: 03 mixup", "--self-pairs") == str(run / "iter_01" / "pairs.jsonl")
    gens = [json.loads(line) for line in (run / "ablation_n2" / "generations.jsonl").read_text().splitlines()]
    assert [g["index"] for g in gens] == [0, 1] and all(g["image"].startswith("../iter_01/") for g in gens)
    assert flag("ablation_no_mixup_iter2: 01 generate", "--ckpt") == str(run / "ablation_no_mixup" / "ckpt")
    assert flag("ablation_no_mixup_iter2: 01 generate", "--pool") == str(run / "pools" / "iter_02.jsonl")
    assert flag("ablation_no_mixup_iter2: 03 mixup", "--human-share") == "0"
    assert flag("ablation_no_mixup_iter2: 04 DPO", "--iter") == "2"
    assert flag("dpo_all_labels: 04 DPO", "--lr") == "0.0001" and flag("dpo_all_labels: 04 DPO", "--max-steps") == "100"
    assert flag("dpo_all_labels_long: 04 DPO", "--max-steps") == "900"  # 300 steps x (iteration 0 + 2)
    assert flag("dpo_all_labels_long: 04 DPO", "--pairs") == str(run / "seed" / "all_pairs.jsonl")
    sweep = cmds["reward accuracy: K and common draws"]
    assert sweep[sweep.index("--draws") + 1:sweep.index("--common-draws")] == ["1", "10", "30"]
    assert flag("reward accuracy: K and common draws", "--common-draws") == "both"
    assert flag("reward accuracy: K and common draws", "--ckpt") == str(run / "iter_00" / "ckpt")
    assert flag("reward accuracy: per iteration", "--common-draws") == "yes"
    assert cmds["reward accuracy: per iteration"].count("--ckpt") == 3
    assert flag("oracle report", "--images-per-prompt") == "4"
    assert result["heldout_pairs"] == 4 and result["dpo_all_labels_long_steps"] == 900


def run_here(name, argv):
    """One Python stage in this process, as `python -m MODULE ...` or `python NAME.py ...` runs it
    (runpy, under __main__): the same code without a new interpreter. Its log handlers are closed after."""
    module, argv = (argv[1], argv[2:]) if argv[0] == "-m" else (Path(argv[0]).stem, argv[1:])
    if module == "00_seed_dpo":  # 00 becomes 04 --iter 0 by os.execv, which would replace this process
        module, argv = "04_train", [*argv, "--iter", "0"]
    handlers, before = logging.getLogger().handlers[:], sys.argv
    try:
        sys.argv = [module, *argv]
        sys.modules.pop(module, None)  # imported already (the study imports toy.data): run it afresh, as a command would
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        assert not stop.code, f"{name}: exit status {stop.code}"
    finally:
        sys.argv = before
        restore_handlers(handlers)


def loop_here(cmd, env):
    """`bash run_all.sh PRESET T` for a toy-world preset, its stages in this process in run_all.sh's
    order and with its defaults (tests/stages/test_end_to_end.py runs the script itself; the slow test
    below runs the study with it): the data, iteration 0, then 01-04 for each iteration."""
    preset, iterations, run = cmd[2], int(cmd[3]), env["RUN"]
    train = env["TRAIN_ARGS"].split()
    run_here("data", ["-m", "toy.data", "--run", run, "--preset", preset, "--n-pools", str(iterations),
                      *env["DATA_ARGS"].split()])
    run_here("00", ["00_seed_dpo.py", "--run", run, "--preset", preset, *train])
    for i in map(str, range(1, iterations + 1)):
        run_here("01", ["01_generate.py", "--run", run, "--iter", i, "--num-candidates", env["N"]])
        run_here("02", ["02_self_reward.py", "--run", run, "--iter", i, "--draws", env["K"], "--pairing", "best-worst"])
        run_here("03", ["03_mixup.py", "--run", run, "--iter", i, "--human-share", "0.25"])
        run_here("04", ["04_train.py", "--run", run, "--iter", i, *train])


def run_stages_here(monkeypatch, calls, loop=loop_here):
    """The study's StageLog with every stage in this process (run_here), and run_all.sh as loop(cmd, env).
    Every call lands in calls."""

    def call(self, name, *cmd, extra_env=None):
        cmd = [str(c) for c in cmd]
        calls.append((name, cmd, extra_env or {}))
        if cmd[0] == sys.executable:
            run_here(name, cmd[1:])
        else:
            loop(cmd, extra_env)
        self.times[name] = 0.0

    monkeypatch.setattr(study.StageLog, "__call__", call)


QUICK_MODELS = ["base", "iter_00", "iter_01", "iter_02", "dpo_all_labels", "dpo_all_labels_long", "ablation_no_mixup",
                "ablation_no_mixup_iter2", "ablation_n2"]


def check_quick_study(out):
    """What a --quick study on one seed leaves: every model of one ablation of each kind, the mixes,
    DPO on all labels, the tables, plot and numbers. Returns study.json."""
    run = out / "seed_0"
    assert {name for name, _, _ in study.MODELS} >= set(QUICK_MODELS)
    for name in QUICK_MODELS[1:]:
        assert (run / name / "ckpt" / "sail.json").is_file(), name
    assert not (run / "ablation_random_pairs").exists()
    sources = {name: [json.loads(line)["source"] for line in (run / name / "train_pairs.jsonl").read_text().splitlines()]
               for name in ("ablation_no_mixup", "iter_01")}
    assert "human" not in sources["ablation_no_mixup"] and "human" in sources["iter_01"]
    gens = [json.loads(line) for line in (run / "ablation_n2" / "generations.jsonl").read_text().splitlines()]
    assert {g["index"] for g in gens} == {0, 1} and all(g["image"].startswith("../iter_01/") for g in gens)
    assert json.loads((run / "dpo_all_labels_long" / "ckpt" / "sail.json").read_text())["lr"] == study.build_parser().get_default("dpo_all_lr")
    assert json.loads((run / "dpo_all_labels" / "ckpt" / "sail.json").read_text())["pair_counts"]["human"] > \
        json.loads((run / "iter_00" / "ckpt" / "sail.json").read_text())["pair_counts"]["human"]
    result = json.loads((out / "study.json").read_text())
    assert set(result["summary"]["models"]) == set(QUICK_MODELS)
    assert any(k.startswith("iter_00: self-reward K=1 own") for k in result["summary"]["accuracy"])
    assert (out / "study.md").read_text().count("\n| ") >= len(QUICK_MODELS) + 2
    assert (out / "study.png").is_file() and (out / "study.args.json").is_file()
    return result


def restore_handlers(handlers):
    """The root logger's handlers back to these; the ones added since are closed."""
    root = logging.getLogger()
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)


@pytest.fixture
def root_logging():
    """The root logger's handlers as they were before the test (the study sets up its own)."""
    handlers = logging.getLogger().handlers[:]
    yield
    restore_handlers(handlers)


def test_quick_study_on_tiny_models(tmp_path, monkeypatch, root_logging):
    """Every stage of the --quick study on one seed with tiny random models: the files and the numbers'
    plumbing, not the numbers (random weights learn nothing); then a rerun that finds it all done.
    Every stage runs in this process; the slow test below runs the same study as a command."""
    calls = []
    run_stages_here(monkeypatch, calls)
    out = tmp_path / "study"
    flags = ["--out", str(out), "--preset", "tiny-sd15", "--quick", "--seeds", "0"]
    study.main(study.build_parser().parse_args(flags))
    result = check_quick_study(out)
    loop = [env for name, cmd, env in calls if cmd[0] == "bash"]
    assert len(loop) == 1 and loop[0]["RUN"] == str(out / "seed_0") and loop[0]["K"] == "2"

    # the rerun hands the loop to run_all.sh again (whose own rerun tests/stages/test_end_to_end.py
    # checks); every other stage finds its work done
    stamp = (out / "seed_0" / "ablation_n2" / "ckpt" / "sail.json").stat().st_mtime_ns
    calls.clear()
    run_stages_here(monkeypatch, calls, loop=lambda cmd, env: None)
    study.main(study.build_parser().parse_args(flags))
    assert (out / "seed_0" / "ablation_n2" / "ckpt" / "sail.json").stat().st_mtime_ns == stamp
    assert not any(name.startswith("ablation_") for name, _, _ in calls)  # finished ablations are not even started
    assert np.allclose(json.loads((out / "study.json").read_text())["summary"]["models"]["iter_01"]["mean"][0],
                       result["summary"]["models"]["iter_01"]["mean"][0])


@pytest.mark.slow
def test_quick_study_as_a_command(tmp_path):
    """The --quick study as a user runs it, every stage its own process, and the same command again."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "toy.study", "--out", str(out), "--preset", "tiny-sd15", "--quick", "--seeds", "0",
           "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = check_quick_study(out)
    stamp = (out / "seed_0" / "ablation_n2" / "ckpt" / "sail.json").stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "seed_0" / "ablation_n2" / "ckpt" / "sail.json").stat().st_mtime_ns == stamp
    assert np.allclose(json.loads((out / "study.json").read_text())["summary"]["models"]["iter_01"]["mean"][0],
                       result["summary"]["models"]["iter_01"]["mean"][0])
