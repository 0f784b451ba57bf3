"""04_train.py --lora-rank: a LoRA on the attention projections, the reference by switching it
off, a merged checkpoint that plain diffusers loads, the adapter alone, resume, and peft kept
optional."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, load_stage
from helpers import make_pairs, run_train, unet_state
from test_train import train_killed_and_resumed

from sail import dpo, lora, models

pytest.importorskip("peft")
train = load_stage("04_train")
PROJECTIONS = tuple(f".{name}.weight" for name in lora.LORA_TARGETS)


def unet_inputs(unet, batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
    cond = {"embeds": torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen)}
    if cfg.addition_embed_type == "text_time":
        cond["pooled"] = torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim,
                                     generator=gen)
    return x, torch.tensor([10, 700])[:batch], cond


@torch.no_grad()
def predict(unet, inputs):
    x, t, cond = inputs
    return dpo.unet_call(unet, x, t, cond, 32)


def test_reference_with_the_adapter_off_equals_a_frozen_copy():
    unet = models.load_unet(models.describe_model("tiny-sd15"))
    frozen = copy.deepcopy(unet).requires_grad_(False)
    lora.add_lora(unet, lora.lora_config(4, 4.0), seed=0)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained adapter: B is no longer zero
    inputs = unet_inputs(unet)
    assert not torch.allclose(predict(unet, inputs), predict(frozen, inputs))
    with dpo.adapters_off(unet):
        assert torch.equal(predict(unet, inputs), predict(frozen, inputs))
    assert not torch.allclose(predict(unet, inputs), predict(frozen, inputs)), "the adapter is back on"
    assert all(("lora_" in n) == p.requires_grad for n, p in unet.named_parameters())


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_lora_training_changes_only_the_projections_and_saves_a_plain_unet(tmp_path, preset):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file
    make_pairs(tmp_path / "seed", n=4)
    run_train("--run", tmp_path, "--iter", 0, "--preset", preset, "--max-steps", 2, "--batch-size", 4,
              "--lr", 1e-3, "--lora-rank", 4, "--lora-alpha", 8)
    ckpt = tmp_path / "iter_00" / "ckpt"
    info = json.loads((ckpt / "sail.json").read_text())
    assert info["lora"] == {"rank": 4, "alpha": 8.0, "target_modules": lora.LORA_TARGETS}

    # <out>/unet is an ordinary UNet: base weights + alpha / rank * up @ down on the projections only
    trained = UNet2DConditionModel.from_pretrained(ckpt / "unet")
    base = models.load_unet(models.describe_model(preset))
    after, before = trained.state_dict(), base.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith(PROJECTIONS) for k in changed), changed
    adapter = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    for key in changed:
        module = "unet." + key[:-len(".weight")]
        delta = adapter[f"{module}.lora.up.weight"] @ adapter[f"{module}.lora.down.weight"]  # alpha / rank folded in
        torch.testing.assert_close(after[key] - before[key], delta, rtol=1e-4, atol=1e-6)

    # the kit's loaders read it, and it predicts what the start model plus the adapter predicts
    desc = models.describe_model(ckpt)
    pipe = models.load_pipeline(desc, torch.device("cpu"), torch.float32)
    with_adapter = models.load_pipeline(models.describe_model(preset), torch.device("cpu"), torch.float32)
    with_adapter.load_lora_weights(ckpt / "lora")
    inputs = unet_inputs(trained)
    merged = predict(pipe.unet, inputs)
    assert not torch.allclose(merged, predict(base, inputs))
    torch.testing.assert_close(merged, predict(trained, inputs), rtol=0, atol=0)
    torch.testing.assert_close(merged, predict(with_adapter.unet, inputs), rtol=1e-4, atol=1e-5)


def test_next_iteration_puts_a_fresh_lora_on_the_merged_checkpoint(tmp_path):
    make_pairs(tmp_path / "seed", n=4)
    make_pairs(tmp_path / "iter_01", n=4, source="self", name="train_pairs.jsonl")
    for it in (0, 1):
        run_train("--run", tmp_path, "--iter", it, "--preset", "tiny-sd15", "--max-steps", 1, "--batch-size", 4,
                  "--lr", 1e-3, "--lora-rank", 2)
    first, second = tmp_path / "iter_00" / "ckpt", tmp_path / "iter_01" / "ckpt"
    info = json.loads((second / "sail.json").read_text())
    assert info["parent"] == str(first) and info["iteration"] == 1 and info["lora"]["rank"] == 2
    a, b = unet_state(first), unet_state(second)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed and all(k.endswith(PROJECTIONS) for k in changed)


@pytest.mark.slow
def test_killed_lora_training_resumes_to_the_same_weights(tmp_path):
    a, b = train_killed_and_resumed(tmp_path, "--lora-rank", 4, "--lr", 1e-3)
    assert (tmp_path / "b" / "iter_00" / "ckpt" / "lora").is_dir()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_peft_is_optional(tmp_path):
    """Without peft the default training runs, and --lora-rank stops with one line saying what to install."""
    make_pairs(tmp_path / "seed", n=4)
    script = f"""
import sys
sys.modules["peft"] = None  # as if peft were not installed: importing it fails
sys.path.insert(0, {str(ROOT)!r})
from conftest import load_stage
from sail import common
train = load_stage("04_train")
base = ["--iter", "0", "--preset", "tiny-sd15", "--max-steps", "1", "--batch-size", "4"]
common.run_stage(train.locked_main, train.build_parser().parse_args(["--run", {str(tmp_path / "full")!r}, "--pairs", {str(tmp_path / "seed" / "pairs.jsonl")!r}, *base]))
print("full UNet trained")
common.run_stage(train.locked_main, train.build_parser().parse_args(["--run", {str(tmp_path / "lora")!r}, "--pairs", {str(tmp_path / "seed" / "pairs.jsonl")!r}, *base, "--lora-rank", "4"]))
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "full UNet trained" in done.stdout, done.stderr
    assert (tmp_path / "full" / "iter_00" / "ckpt" / "unet").is_dir()
    assert done.returncode == 2
    assert "error: --lora-rank 4 trains a LoRA through peft, which is not installed: pip install peft" in done.stderr
    assert not any((tmp_path / "lora" / "iter_00").glob("ckpt*"))


@pytest.mark.slow
def test_two_processes_train_the_lora_of_one(tmp_path):
    make_pairs(tmp_path / "seed", n=8)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for n in (1, 2):
        launcher = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"] if n == 2 else []
        done = subprocess.run([sys.executable, *launcher, str(ROOT / "04_train.py"), "--init", "tiny-sd15", "--pairs",
                               str(tmp_path / "seed" / "pairs.jsonl"), "--out", str(tmp_path / f"ckpt{n}"), "--max-steps", "3",
                               "--batch-size", "4", "--micro-batch", str(n), "--lr", "1e-3", "--lora-rank", "4"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = unet_state(tmp_path / "ckpt1"), unet_state(tmp_path / "ckpt2")
    base = models.load_unet(models.describe_model("tiny-sd15")).state_dict()
    change = torch.cat([(a[k] - base[k]).abs().flatten() for k in a]).mean()
    gap = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean()
    assert change > 1e-6 and gap < 1e-3 * change
