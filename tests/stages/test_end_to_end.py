"""The whole loop through run_all.sh on tiny models: every file of the contract, a rerun that
skips everything, and a stage rerun by hand in a copied run folder that gives the same files."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from sail import files
from toy import world

TINY_DATA = "--pool-size 3 --n-eval 3 --n-universe 12 --pairs-per-prompt 2 --seed-fraction 0.5"


def run_all(run_dir, preset, iterations, **overrides):
    env = {**os.environ, "RUN": str(run_dir), "DATA_ARGS": TINY_DATA, "N": "4", "K": "2", "PYTHON": sys.executable,
           **overrides}
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), preset, str(iterations)], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def stage(script, *argv):
    done = subprocess.run([sys.executable, str(ROOT / script), *map(str, argv)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def test_tiny_sd15_one_iteration(tmp_path):
    """`run_all.sh tiny-sd15 1`: seed DPO, then an iteration trained from it (more iterations repeat
    the same stages; the spot-check test below runs into a second one)."""
    run_dir = tmp_path / "run"
    out = run_all(run_dir, "tiny-sd15", 1)
    for line in ("00 seed DPO done", "iter 1: 01 generate done", "iter 1: 04 DPO done", "oracle report done"):
        assert line in out
    assert "drift guard" not in out  # no held-out pairs, no guard
    for it in (1,):
        folder = run_dir / f"iter_{it:02d}"
        for name in ("generations.jsonl", "rewards.jsonl", "pairs.jsonl", "train_pairs.jsonl", "ckpt/sail.json",
                     "generate.args.json", "self_reward.args.json", "mixup.args.json", "train.args.json", "log.txt"):
            assert (folder / name).is_file(), folder / name
        info = json.loads((folder / "ckpt" / "sail.json").read_text())
        assert info["iteration"] == it and info["parent"].endswith(f"iter_{it - 1:02d}/ckpt")
        assert info["pair_counts"]["self"] > 0 and info["pair_counts"]["human"] > 0
    assert len((run_dir / "iter_01" / "generations.jsonl").read_text().splitlines()) == 3 * 4

    # every output and every .json beside it; not the logs, the OS lock each stage takes, or the oracle
    # report and its arguments, which the report step writes anew from its cached scores on every run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "log" not in p.name
              and p.name not in (".lock", "oracle_report.json", "toy_world.report.args.json")}
    again = run_all(run_dir, "tiny-sd15", 1)
    assert "skipping" in (run_dir / "iter_01" / "log.txt").read_text()
    assert "data (toy world)" not in again
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after, "a finished run was written again"

    # a copied run folder still works, and a stage rerun by hand gives the same files
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    shutil.rmtree(run_dir)
    for name in ("rewards.jsonl", "pairs.jsonl"):
        (moved / "iter_01" / name).rename(moved / "iter_01" / f"{name}.first")
    stage("02_self_reward.py", "--run", moved, "--iter", 1, "--draws", 2)
    for name in ("rewards.jsonl", "pairs.jsonl"):
        assert (moved / "iter_01" / name).read_bytes() == (moved / "iter_01" / f"{name}.first").read_bytes()
    (moved / "iter_01" / "train_pairs.jsonl").rename(moved / "iter_01" / "train_pairs.first")
    stage("03_mixup.py", "--run", moved, "--iter", 1)
    assert (moved / "iter_01" / "train_pairs.jsonl").read_bytes() == (moved / "iter_01" / "train_pairs.first").read_bytes()


@pytest.mark.slow
def test_drift_guard_stops_the_loop(tmp_path):
    """With held-out pairs (toy.data --val-pairs) the guard scores them after the seed DPO and each
    iteration; GUARD=stop ends the loop after the first iteration whose accuracy fell below the best by
    more than the tolerance (here any fall at all, and a tie too: tolerance -1 stops after iteration 1)."""
    run_dir = tmp_path / "run"
    out = run_all(run_dir, "tiny-sd15", 2, DATA_ARGS=TINY_DATA + " --val-pairs 6", GUARD="stop", GUARD_TOLERANCE="-1",
                  EVAL="0")
    assert "iter 0: drift guard scored" in out and "iter 1: drift guard scored" in out
    assert "drift guard: stopped after iteration 1" in out and "iter 2: 01 generate" not in out
    assert (run_dir / "iter_01" / "ckpt" / "sail.json").is_file() and not (run_dir / "iter_02").exists()
    guard = json.loads((run_dir / "eval" / "guard" / "guard.json").read_text())
    assert list(guard["accuracy"]) == ["iter_00", "iter_01"] and guard["stopped_after"] == "iter_01"
    assert guard["best_checkpoint"].endswith(f"iter_{guard['best'][-2:]}/ckpt")
    val = files.read_pairs(run_dir / "val" / "pairs.jsonl")
    assert guard["pairs"] == len(val) > 0
    seen = {(p["image_w"], p["image_l"]) for p in files.read_pairs(run_dir / "seed" / "pairs.jsonl")}
    assert not seen & {(p["image_w"], p["image_l"]) for p in val}  # held out: never in the seed


def test_spot_check_stops_the_loop_before_an_iteration_trains(tmp_path):
    """GUARD=spot: after 02 of each iteration the toy's human labels SPOT_PAIRS self pairs; a drop of -1
    stops at iteration 2 (any agreement is "more than -1 below" iteration 1's), before 03 and 04 run.
    With held-out pairs the drift guard reports after each trained iteration too (GUARD=stop, which
    ends the loop by that report: the slow test above)."""
    run_dir = tmp_path / "run"
    out = run_all(run_dir, "tiny-sd15", 2, DATA_ARGS=TINY_DATA + " --val-pairs 6", GUARD="spot", SPOT_PAIRS="2",
                  SPOT_DROP="-1", EVAL="0")
    assert "iter 0: drift guard scored" in out and "iter 1: drift guard scored" in out
    guard = json.loads((run_dir / "eval" / "guard" / "guard.json").read_text())
    assert list(guard["accuracy"]) == ["iter_00", "iter_01"] and guard["stopped_after"] is None
    assert "iter 1: spot check done" in out and "iter 1: 04 DPO done" in out and "iter 2: 02 self-reward done" in out
    assert "spot check: stopped before iteration 2 trains" in out and "iter 2: 03 mixup" not in out
    assert (run_dir / "iter_01" / "ckpt" / "sail.json").is_file() and not (run_dir / "iter_02" / "ckpt").exists()
    spot = json.loads((run_dir / "eval" / "spot" / "spot.json").read_text())
    assert spot["stopped_before"] == "iter_02" and spot["keep"] == str(run_dir / "iter_01" / "ckpt")
    for it in ("iter_01", "iter_02"):
        judged = files.read_jsonl(run_dir / "eval" / "spot" / it / "judgements.jsonl")
        assert len(judged) == 2 and {j["labeller"] for j in judged} == {"toy-rater"}


@pytest.mark.slow
def test_tiny_sdxl_trains_the_same_weights_whatever_sampler_it_ships(tmp_path):
    """`run_all.sh tiny-sdxl 1` on the config-faithful tiny SDXL (EulerDiscreteScheduler, as released)
    and on a copy that ships DDIM: the same images, rewards, pairs and weights, because every loss and
    reward noises with DDPM's forward process and generation builds its sampler from the config."""
    import torch
    from diffusers import UNet2DConditionModel
    sys.path.insert(0, str(ROOT))
    from sail import tiny
    caches = {name: tmp_path / f"cache-{name}" for name in ("euler", "ddim")}
    for name, cache in caches.items():
        folder = tiny.build_tiny_pipeline("sdxl", cache / tiny.tiny_model_dir("sdxl").name)
        if name == "ddim":
            config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
            assert config["_class_name"] == "EulerDiscreteScheduler"
            ddim = dict(_class_name="DDIMScheduler", **{k: config[k] for k in (
                "beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "clip_sample", "set_alpha_to_one",
                "steps_offset", "timestep_spacing", "prediction_type")})
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(ddim))
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers", "DDIMScheduler"])))
        run_all(tmp_path / name, "tiny-sdxl", 1, SAIL_CACHE=str(cache), EVAL="0", TRAIN_ARGS="--lr 1e-4")
    runs = {name: tmp_path / name for name in caches}
    info = json.loads((runs["euler"] / "iter_01" / "ckpt" / "sail.json").read_text())
    assert info["arch"] == "sdxl" and info["iteration"] == 1
    for name in ("iter_01/rewards.jsonl", "iter_01/pairs.jsonl"):
        assert (runs["euler"] / name).read_text() == (runs["ddim"] / name).read_text(), name
    for it in ("iter_00", "iter_01"):
        a, b = (UNet2DConditionModel.from_pretrained(runs[n] / it / "ckpt" / "unet").state_dict() for n in caches)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{it}: {key}"


def test_overlapping_pools_stop_the_loop_before_it_starts(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, RUN=str(run_dir), DATA_ARGS=TINY_DATA, PYTHON=sys.executable, EVAL="0")
    subprocess.run([sys.executable, "-m", "toy.data", "--run", str(run_dir), "--preset", "tiny-sd15",
                    "--n-pools", "2", *TINY_DATA.split()], check=True, capture_output=True)
    pool2 = run_dir / "pools" / "iter_02.jsonl"
    first = (run_dir / "pools" / "iter_01.jsonl").read_text().splitlines()[0]
    pool2.write_text(pool2.read_text() + first.replace('"prompt_id": "', '"prompt_id": "copy-') + "\n")
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "tiny-sd15", "2"], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "prompt sets overlap" in done.stderr and "iter_02.jsonl" in done.stderr
    assert not (run_dir / "iter_00").exists()


@pytest.mark.slow
def test_toy_world_shortened(tmp_path):
    """The README's main command, shortened: the real toy base (pretrained in the test's empty cache,
    about 4 minutes), then one SAIL iteration on small pools with a few DPO steps, and the report."""
    run_dir = tmp_path / "toy"
    out = run_all(run_dir, "toy", 1, DATA_ARGS="--pool-size 8 --n-eval 8 --n-universe 40", TRAIN_ARGS="--max-steps 10")
    assert "oracle report done" in out
    report = json.loads((run_dir / "eval" / "oracle_report.json").read_text())
    assert list(report) == ["base", "iter_00", "iter_01"]
    for name, r in report.items():  # the report's numbers are those of its cached per-image oracle scores
        scores = [row["score"] for row in files.read_jsonl(run_dir / "eval" / "oracle" / name / "scores.jsonl")]
        assert r["n"] == len(scores) == 8 * 4 and r["mean"] == pytest.approx(sum(scores) / len(scores))
    pairs = files.read_pairs(run_dir / "iter_01" / "pairs.jsonl")
    agree = [world.oracle_score(p["prompt"], files.load_image(p["_image_w"]))
             > world.oracle_score(p["prompt"], files.load_image(p["_image_l"])) for p in pairs]
    assert report["iter_01"]["self_reward_agreement"] == pytest.approx(sum(agree) / len(agree))
    assert "win_rate" in report["iter_01"]
    for name in report:
        assert f"{name} " in out and "follows colour" in out
    info = json.loads((run_dir / "iter_01" / "ckpt" / "sail.json").read_text())
    assert info["preset"] == "toy" and info["steps"] == 10


@pytest.mark.parametrize("iterations, guard", [(3, "report"), (3, "spot"), (2, "report")])
def test_long_runs_get_a_pointer_to_the_toys_long_runs(tmp_path, iterations, guard):
    """Past 2 iterations run_all.sh points at the toy's long runs and, unless it runs, the spot check; its
    log states no result (the run itself stops here at once: no seed pairs for sd15)."""
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "sd15", str(iterations)], capture_output=True, text=True,
                          env={**os.environ, "RUN": str(tmp_path), "HUMAN_SHARE": "0.25", "GUARD": guard}, timeout=60)
    assert done.returncode == 2 and "seed/pairs.jsonl not found" in done.stderr
    assert ("the toy's runs past 2 iterations are in toy/RESULTS.md" in done.stdout) == (iterations > 2)
    assert ("GUARD=spot checks the self pairs" in done.stdout) == (iterations > 2 and guard != "spot")
    assert "flags given: --human-share 0.25 (others: the stages' defaults)" in done.stdout
