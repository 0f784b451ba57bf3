"""01, 02 and 04 with two CPU processes (torchrun, gloo) give what one process gives."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers import make_pairs, make_pool
from PIL import Image

from sail import tiny


def launch(nproc, script, *argv):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # torchrun uses one thread per process; so does the single run
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "29533",
               str(ROOT / script)]
    done = subprocess.run(cmd + [str(a) for a in argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    make_pool(root / "pool.jsonl", range(3))
    make_pairs(root / "seed", n=8)
    return root


def test_two_processes_match_one(data):
    for n in (1, 2):
        launch(n, "01_generate.py", "--ckpt", "tiny-sd15", "--pool", data / "pool.jsonl", "--out", data / f"gen{n}",
               "--num-candidates", 4, "--gen-batch", 2)
    one, two = data / "gen1", data / "gen2"
    assert (one / "generations.jsonl").read_bytes() == (two / "generations.jsonl").read_bytes()
    for png in (one / "images").glob("*.png"):
        a, b = np.asarray(Image.open(png), dtype=int), np.asarray(Image.open(two / "images" / png.name), dtype=int)
        assert np.abs(a - b).max() <= 1, png.name

    for n in (1, 2):  # a trained model, so that rewards are not all zero
        launch(n, "04_train.py", "--init", "tiny-sd15", "--pairs", data / "seed" / "pairs.jsonl", "--out",
               data / f"ckpt{n}", "--max-steps", 3, "--batch-size", 4, "--micro-batch", n, "--lr", 1e-4)
    from diffusers import UNet2DConditionModel
    a = UNet2DConditionModel.from_pretrained(data / "ckpt1" / "unet").state_dict()
    b = UNet2DConditionModel.from_pretrained(data / "ckpt2" / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny.tiny_model_dir("sd15") / "unet").state_dict()
    change = torch.cat([(a[k] - base[k]).abs().flatten() for k in a]).mean()
    gap = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean()
    assert change > 1e-5  # it trained
    assert gap < 1e-3 * change  # Adam magnifies round-off on a few near-zero gradients; on average the same

    for n in (1, 2):
        shutil.copytree(one, data / f"reward{n}")
        launch(n, "02_self_reward.py", "--ckpt", data / "ckpt1", "--dir", data / f"reward{n}", "--draws", 3)
    for name in ("rewards.jsonl", "pairs.jsonl"):
        assert (data / "reward1" / name).read_bytes() == (data / "reward2" / name).read_bytes()


@pytest.mark.slow
def test_killed_two_process_run_resumes(data):
    """What a kill leaves (some images missing, a torn image file; a rank's partial rewards with a
    torn last line) is finished by a rerun with 2 processes into the same files as one clean run."""
    if not (data / "reward1" / "rewards.jsonl").is_file():  # run on its own: make what the first test makes, in 1 process
        launch(1, "01_generate.py", "--ckpt", "tiny-sd15", "--pool", data / "pool.jsonl", "--out", data / "gen1",
               "--num-candidates", 4, "--gen-batch", 2)
        launch(1, "04_train.py", "--init", "tiny-sd15", "--pairs", data / "seed" / "pairs.jsonl", "--out", data / "ckpt1",
               "--max-steps", 3, "--batch-size", 4, "--micro-batch", 1, "--lr", 1e-4)
        shutil.copytree(data / "gen1", data / "reward1")
        launch(1, "02_self_reward.py", "--ckpt", data / "ckpt1", "--dir", data / "reward1", "--draws", 3)
    gen = data / "gen_killed"
    shutil.copytree(data / "gen1", gen)
    (gen / "generations.jsonl").unlink()
    images = sorted((gen / "images").glob("*.png"))
    for png in images[::3]:
        png.unlink()
    images[1].write_bytes(b"\x89PNG torn")
    launch(2, "01_generate.py", "--ckpt", "tiny-sd15", "--pool", data / "pool.jsonl", "--out", gen,
           "--num-candidates", 4, "--gen-batch", 2)
    assert (gen / "generations.jsonl").read_bytes() == (data / "gen1" / "generations.jsonl").read_bytes()
    for png in (data / "gen1" / "images").glob("*.png"):
        a, b = np.asarray(Image.open(png), dtype=int), np.asarray(Image.open(gen / "images" / png.name), dtype=int)
        assert np.abs(a - b).max() <= 1, png.name

    scored = data / "reward_killed"
    shutil.copytree(data / "gen1", scored)
    lines = (data / "reward1" / "rewards.jsonl").read_text().splitlines(keepends=True)
    (scored / "rewards.partial.1.jsonl").write_text("".join(lines[:4]) + lines[4][:25])  # one prompt, then torn
    launch(2, "02_self_reward.py", "--ckpt", data / "ckpt1", "--dir", scored, "--draws", 3)
    for name in ("rewards.jsonl", "pairs.jsonl"):
        assert (scored / name).read_bytes() == (data / "reward1" / name).read_bytes()
    assert "(3 prompts, 1 scored already)" in (scored / "log.txt").read_text()
