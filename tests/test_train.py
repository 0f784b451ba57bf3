"""04_train.py / 00_seed_dpo.py on tiny SD1.5- and SDXL-shaped models: checkpoints that plain
diffusers loads, where they came from, resume after a kill, and refusals."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, load_stage
from helpers import make_pairs

import sail_common as sc

train = load_stage("04_train")


def run_train(*argv):
    sc.run_stage(train.locked_main, train.build_parser().parse_args([str(a) for a in argv]))


def unet_state(ckpt):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(ckpt / "unet").state_dict()


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_seed_dpo_writes_a_loadable_checkpoint(tmp_path, preset):
    make_pairs(tmp_path / "seed", n=6)
    run_train("--run", tmp_path, "--iter", 0, "--preset", preset, "--max-steps", 2, "--log-every", 1,
              "--export-pipeline", tmp_path / "pipeline")
    ckpt = tmp_path / "iter_00" / "ckpt"
    info = json.loads((ckpt / "sail.json").read_text())
    assert info["arch"] == preset.split("-")[1] and info["iteration"] == 0 and info["preset"] == preset
    assert info["pair_counts"] == {"human": 6, "self": 0} and info["steps"] == 2
    assert info["lora"] is None and not (ckpt / "lora").exists()  # the whole UNet by default
    assert (tmp_path / "iter_00" / "train.args.json").is_file() and (tmp_path / "iter_00" / "log.txt").is_file()
    log_rows = [json.loads(x) for x in (ckpt / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_rows] == [1, 2] and abs(log_rows[0]["loss"] - 0.6931) < 1e-3
    trained = unet_state(ckpt)
    base = sc.load_unet(sc.describe_model(preset)).state_dict()
    assert any(not torch.equal(trained[k], base[k]) for k in base), "training changed nothing"
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert torch.equal(pipe.unet.state_dict()["conv_in.weight"], trained["conv_in.weight"])
    out = pipe(prompt="a red square", num_inference_steps=2, height=32, width=32, output_type="np")
    assert out.images.shape == (1, 32, 32, 3)


def test_finished_checkpoint_is_not_overwritten(tmp_path, capsys):
    make_pairs(tmp_path / "seed", n=4)
    run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 1)
    before = (tmp_path / "iter_00" / "ckpt" / "sail.json").read_text()
    run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 3)
    assert "finished already" in capsys.readouterr().out
    assert (tmp_path / "iter_00" / "ckpt" / "sail.json").read_text() == before


def test_nan_loss_stops_without_a_checkpoint(tmp_path, capsys):
    make_pairs(tmp_path / "seed", n=4)
    with pytest.raises(SystemExit) as exit_info:
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 2, "--beta", "nan")
    assert exit_info.value.code == 2
    assert "non-finite DPO loss at step 0" in capsys.readouterr().err
    assert not (tmp_path / "iter_00" / "ckpt").exists()


def test_bad_pair_file_stops_with_file_and_line(tmp_path, capsys):
    path = make_pairs(tmp_path / "seed", n=4)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + ['{"prompt": "x", "image_w": "a.png"'] + lines[3:]) + "\n")
    with pytest.raises(SystemExit):
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 1)
    assert "seed/pairs.jsonl:3: malformed JSON" in capsys.readouterr().err


def test_wrong_model_path(tmp_path, capsys):
    make_pairs(tmp_path / "seed", n=4)
    with pytest.raises(SystemExit):
        run_train("--init", tmp_path / "no-such-model", "--pairs", tmp_path / "seed" / "pairs.jsonl",
                  "--out", tmp_path / "out")
    assert "no-such-model" in capsys.readouterr().err


def train_killed_and_resumed(tmp_path, *extra):
    """Train run a uninterrupted; kill run b after its first saved state and rerun it to the end.
    Returns the two final UNet state dicts."""
    for name in ("a", "b"):
        make_pairs(tmp_path / name / "seed", n=8)
    argv = ["--iter", "0", "--preset", "tiny-sd15", "--max-steps", "6", "--save-every", "2", "--batch-size", "4",
            "--micro-batch", "2", *map(str, extra)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    script = str(ROOT / "04_train.py")
    subprocess.run([sys.executable, script, "--run", str(tmp_path / "a"), *argv], check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen([sys.executable, script, "--run", str(tmp_path / "b"), *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "b" / "iter_00" / "ckpt.partial" / "progress.json"
    deadline = time.time() + 120
    while not progress.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b" / "iter_00" / "ckpt").exists(), "finished before it could be killed"
    done = subprocess.run([sys.executable, script, "--run", str(tmp_path / "b"), *argv], env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stdout
    return unet_state(tmp_path / "a" / "iter_00" / "ckpt"), unet_state(tmp_path / "b" / "iter_00" / "ckpt")


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    """Kill a run after its first saved state; the rerun continues and ends where an
    uninterrupted run ends."""
    a, b = train_killed_and_resumed(tmp_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_bad_lora_rank(tmp_path, capsys):
    make_pairs(tmp_path / "seed", n=4)
    with pytest.raises(SystemExit):
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--lora-rank", -1)
    assert "--lora-rank -1: expected 0 (whole UNet) or a positive rank" in capsys.readouterr().err


def test_resume_refuses_a_state_of_the_other_kind(tmp_path, capsys):
    make_pairs(tmp_path / "seed", n=4)
    partial = tmp_path / "iter_00" / "ckpt.partial"
    partial.mkdir(parents=True)
    (partial / "progress.json").write_text('{"step": 2}')  # a killed run of the whole UNet
    with pytest.raises(SystemExit):
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 4, "--lora-rank", 4)
    assert "ckpt.partial was saved with --lora-rank 0, not 4: rerun with that, or add --restart" in capsys.readouterr().err
