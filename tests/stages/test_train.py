"""04_train.py / 00_seed_dpo.py on tiny SD1.5- and SDXL-shaped models: checkpoints that plain
diffusers loads, where they came from, resume after a kill, and refusals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_stage
from helpers import make_pairs, run_train, unet_state

from sail import models

train = load_stage("04_train")


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
    base = models.load_unet(models.describe_model(preset)).state_dict()
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
    run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 1)
    assert "finished already" in capsys.readouterr().out
    for flag, value, said in (("--max-steps", 3, "max_steps: 1 -> 3"), ("--lr", 3e-4, "lr: 0.0001 -> 0.0003")):
        with pytest.raises(SystemExit) as exit_info:  # other settings would be mixed in silently: refused
            run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 1, flag, value)
        assert exit_info.value.code == 2 and said in capsys.readouterr().err
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
    (partial / "progress.json").write_text('{"step": 2}')  # a killed run that recorded no settings
    with pytest.raises(SystemExit):
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 4, "--lora-rank", 4)
    assert "records no settings.json, so it cannot be resumed safely: add --restart" in capsys.readouterr().err


@pytest.mark.parametrize("flag, old, new", [("--lr", "1e-4", "3e-4"), ("--lora-rank", "0", "4")])
def test_resume_with_other_settings_stops_and_names_the_setting(tmp_path, capsys, monkeypatch, flag, old, new):
    """A crashed run's state resumes only with the settings that made it; other ones stop with the
    setting's old and new value, and nothing is written."""
    make_pairs(tmp_path / "seed", n=4)
    argv = ["--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 4, "--batch-size", 2, "--save-every", 2]

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the checkpoint")
    monkeypatch.setattr(models, "save_checkpoint", crash)  # the state of step 2 is saved, the checkpoint never
    with pytest.raises(RuntimeError):
        run_train(*argv, flag, old)
    monkeypatch.undo()
    partial = tmp_path / "iter_00" / "ckpt.partial"
    assert json.loads((partial / "progress.json").read_text()) == {"step": 2}
    with pytest.raises(SystemExit):
        run_train(*argv, flag, new)
    name, err = flag[2:].replace("-", "_"), capsys.readouterr().err
    assert "holds work made with " in err and f"{name} = {float(old) if name == 'lr' else int(old)!r}" in err, err
    assert "this run has " in err and f"{name} = {float(new) if name == 'lr' else int(new)!r}" in err, err
    assert "rerun with the former to continue, or add --restart to discard it" in err
    assert json.loads((partial / "progress.json").read_text()) == {"step": 2} and not (tmp_path / "iter_00" / "ckpt").exists()
    run_train(*argv, flag, old)
    assert "resuming from" in (tmp_path / "iter_00" / "log.txt").read_text()
    assert json.loads((tmp_path / "iter_00" / "ckpt" / "sail.json").read_text())["steps"] == 4


SCHEDULERS_WITH_THE_SAME_BETAS = {"DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1)}


def test_training_does_not_depend_on_the_sampler_a_model_folder_ships(tmp_path):
    """The released SDXL ships EulerDiscreteScheduler, whose add_noise is x0 + sigma_t eps; training must
    noise with DDPM's forward process whatever the folder ships (as DiffusionDPO does), so a copy of the
    tiny SDXL with a DDIM config trains to the same weights as the Euler original (every other class:
    tests/test_parity_train.py)."""
    import shutil
    base = models.resolve_model_path("tiny:sdxl")
    config = json.loads((Path(base) / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler"  # as released
    pairs = make_pairs(tmp_path / "seed", n=4)
    weights = {}
    for name in ["EulerDiscreteScheduler", *SCHEDULERS_WITH_THE_SAME_BETAS]:
        folder = tmp_path / name
        shutil.copytree(base, folder)
        betas = {k: config[k] for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps")}
        swapped = dict(_class_name=name, **betas, **SCHEDULERS_WITH_THE_SAME_BETAS.get(name, {}))
        if name != "EulerDiscreteScheduler":  # model_index.json names the class, the config its settings
            (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(swapped))
            index = json.loads((folder / "model_index.json").read_text())
            (folder / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers", name])))
        assert type(models.load_pipeline(models.describe_model(str(folder)), "cpu", torch.float32).scheduler).__name__ == name
        run_train("--init", folder, "--preset", "tiny-sdxl", "--pairs", pairs, "--out", tmp_path / f"out-{name}",
                  "--max-steps", 2, "--batch-size", 4, "--lr", 1e-4)
        weights[name] = unet_state(tmp_path / f"out-{name}")
    start = models.load_unet(models.describe_model("tiny-sdxl")).state_dict()
    assert any(not torch.equal(weights["EulerDiscreteScheduler"][k], start[k]) for k in start), "training changed nothing"
    for name in SCHEDULERS_WITH_THE_SAME_BETAS:
        for key, value in weights["EulerDiscreteScheduler"].items():
            torch.testing.assert_close(weights[name][key], value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_keep_states_keeps_the_newest_and_resumes_from_the_last(tmp_path, capsys, monkeypatch):
    """--keep-states 2 keeps the two newest resumable states; a rerun continues from the newest, and the
    train log holds each step once (a line torn by the kill dropped)."""
    make_pairs(tmp_path / "seed", n=4)
    argv = ["--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 4, "--batch-size", 2, "--save-every", 1,
            "--log-every", 1, "--keep-states", 2]

    def crash(*args, **kwargs):
        raise RuntimeError("killed before the checkpoint")
    monkeypatch.setattr(models, "save_checkpoint", crash)
    with pytest.raises(RuntimeError):
        run_train(*argv)
    monkeypatch.undo()
    partial = tmp_path / "iter_00" / "ckpt.partial"
    assert sorted(p.name for p in partial.glob("state*")) == ["state-2", "state-3"]
    assert json.loads((partial / "progress.json").read_text()) == {"step": 3}
    with open(partial / "train_log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a log line torn by a kill
    run_train(*argv)
    assert "resuming from" in (tmp_path / "iter_00" / "log.txt").read_text()
    assert "at step 3" in (tmp_path / "iter_00" / "log.txt").read_text()
    log_rows = [json.loads(x) for x in (tmp_path / "iter_00" / "ckpt" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_rows] == [1, 2, 3, 4]
    with pytest.raises(SystemExit):
        run_train("--run", tmp_path / "other", *argv[2:-1], 0)
    assert "--keep-states 0: keep at least 1" in capsys.readouterr().err


def test_image_loader_workers_train_the_weights_and_log_of_the_training_thread(tmp_path):
    """--num-workers 2 reads and transforms the images in two processes ahead of the steps; the pairs,
    crops, flips, noise and so the weights and every logged value are those of --num-workers 0, which
    reads them in the training thread, to the bit: three epochs with the latent cache, random crops."""
    pairs = make_pairs(tmp_path / "data", n=8, size=40)
    logs, weights = {}, {}
    for workers in (0, 2):
        out = tmp_path / f"workers{workers}" / "ckpt"
        run_train("--init", "tiny-sd15", "--pairs", pairs, "--out", out, "--max-steps", 6, "--batch-size", 4, "--micro-batch", 2,
                  "--log-every", 1, "--random-crop", "--num-workers", workers)
        rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        logs[workers] = [{k: v for k, v in r.items() if k not in ("pairs_per_s", "peak_ram_gib")} for r in rows]
        weights[workers] = unet_state(out)
        assert json.loads((out / "sail.json").read_text())["args"]["num_workers"] == workers
    assert len(logs[0]) == 6 and logs[0] == logs[2]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[2][key]), key


def test_a_bad_image_read_by_a_worker_stops_with_file_and_line(tmp_path, capsys):
    pairs = make_pairs(tmp_path / "seed", n=4)
    (tmp_path / "seed" / "images" / "human_2_l.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit) as exit_info:
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 1, "--num-workers", 1)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"{pairs}:3: unreadable image" in err and "human_2_l.png" in err
    assert "Traceback" not in err and "worker" not in err


def test_out_of_memory_stops_naming_the_flag_to_change(tmp_path, capsys, monkeypatch):
    make_pairs(tmp_path / "seed", n=4)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(train.trainer.dpo, "dpo_micro_batch", out_of_memory)
    with pytest.raises(SystemExit) as exit_info:
        run_train("--run", tmp_path, "--iter", 0, "--preset", "tiny-sd15", "--max-steps", 1, "--micro-batch", 2)
    assert exit_info.value.code == 2
    assert ("out of GPU memory at step 0 (micro batch 2, gradient checkpointing off): add --gradient-checkpointing, "
            "or lower --micro-batch (e.g. --micro-batch 1)") in capsys.readouterr().err
    assert not (tmp_path / "iter_00" / "ckpt").exists()


def test_seed_dpo_becomes_04_at_iteration_0_and_its_help_says_so():
    done = subprocess.run([sys.executable, str(ROOT / "00_seed_dpo.py"), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(load_stage("00_seed_dpo").__doc__)  # its own docstring first
    assert "The flags are 04_train.py's:" in done.stdout and "--num-workers" in done.stdout  # then 04's flags
    source = (ROOT / "00_seed_dpo.py").read_text()
    assert "import_module" not in source and "04_train" not in "".join(
        line for line in source.splitlines() if line.startswith(("import", "from")))
