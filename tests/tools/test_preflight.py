"""tools/preflight.py (`bash run_all.sh PRESET T --check`) on the tiny models: every unit runs through the
stages' own code, each stage as its own process, and a wrong noising, a failing stage or a folder that is
not its own stops it with one message."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from sail import common, dpo
from tools import preflight


def test_check_runs_every_unit_on_tiny_sdxl(tmp_path):
    """From another folder, with no PYTHONPATH: run_all.sh finds the kit's packages itself."""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "tiny-sdxl", "1", "--check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "preflight-tiny-sdxl" / "preflight.json").read_text())
    units = [row["unit"] for row in report["units"]]
    assert units[:3] == ["load model", "load pipeline", "check configs and noising"]
    assert {"01 generate 2x2 images", "00 seed DPO, 2 steps", "reload the checkpoint", "02 self-reward, K=2",
            "score tiny-pickscore", "score tiny-aesthetic", "score tiny-imagereward"} <= set(units)
    assert all(row["seconds"] >= 0 and row["peak_gib"] > 0 for row in report["units"])
    assert report["checks"]["sampler_shipped"] == "EulerDiscreteScheduler" and report["checks"]["noising"] == "DDPMScheduler"
    assert report["checks"]["differences"] == []  # the tiny model keeps every released setting checked
    assert len(report["scores"]["tiny-pickscore"]) == 4
    assert report["estimate"]["total_seconds"] > 0 and len(report["estimate"]["stages"]) == 1 + 3 * 2
    assert "preflight passed" in done.stdout and "estimate total on one device" in done.stdout
    run = tmp_path / "runs" / "preflight-tiny-sdxl"
    peaks = {row["unit"]: row["peak_gib"] for row in report["units"]}
    for unit, timing in (("01 generate 2x2 images", "base/generate.0.timing.json"), ("00 seed DPO, 2 steps",
                         "iter_00/train.timing.json"), ("02 self-reward, K=2", "base/self_reward.0.timing.json")):
        assert peaks[unit] == round(json.loads((run / timing).read_text())["peak_ram_gib"], 2)  # the stage's own process
    estimate = report["estimate"]
    assert estimate["peak_tflops"] is None and estimate["mfu"] is None  # the CPU has no peak: TFLOP/s only
    for key in ("gen", "reward", "train"):
        assert estimate["tflop_per_unit"][key] > 0 and estimate["utilisation"][key]["tflops"] > 0
        assert estimate["utilisation"][key]["mfu"] is None
    assert "TFLOP/unit" in done.stdout and "MFU -" in done.stdout


def test_check_stops_at_a_noising_that_is_not_ddpm(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dpo, "forward_process", lambda scheduler: scheduler)  # the old bug: the shipped sampler noises
    with pytest.raises(SystemExit) as exit_info:
        common.run_stage(preflight.main, preflight.build_parser().parse_args(["--preset", "tiny-sdxl", "--out", str(tmp_path / "p")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "preflight stopped at 'check configs and noising': training would noise with EulerDiscreteScheduler" in err
    assert not (tmp_path / "p" / "base").exists()


def test_check_does_not_replace_a_folder_of_another_kind(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    with pytest.raises(SystemExit):
        common.run_stage(preflight.main, preflight.build_parser().parse_args(["--preset", "tiny-sd15", "--out", str(tmp_path / "mine")]))
    assert "is not a preflight folder; not replacing it" in capsys.readouterr().err
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_check_without_the_weights_says_how_to_get_them(tmp_path):
    """`bash run_all.sh sdxl 2 --check` on a machine that has not got SDXL: one line, no library warnings."""
    env = {k: v for k, v in os.environ.items() if k not in ("SAIL_SD15_PATH", "SAIL_SDXL_PATH", "HF_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "sdxl", "2", "--check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: preflight stopped at 'load model': stabilityai/stable-diffusion-xl-base-1.0 is not in the local Hugging "
        f"Face cache ({tmp_path / 'hf' / 'hub'}) and cannot be fetched (HF_HUB_OFFLINE is set): download it where there "
        "is a network with `hf download stabilityai/stable-diffusion-xl-base-1.0` (into that cache), or point "
        "$SAIL_SDXL_PATH at a local copy of it"], done.stderr


def test_a_failing_stage_stops_with_its_own_message(tmp_path):
    """The stages run as child processes: the preflight's message is the stage's error line."""
    with pytest.raises(common.SailError, match=f"^{tmp_path / 'missing.jsonl'}: file not found$"):
        preflight.stage("01_generate.py", "--ckpt", "tiny-sd15", "--pool", tmp_path / "missing.jsonl",
                        "--out", tmp_path / "out")
    assert not (tmp_path / "out" / "generations.jsonl").exists()
