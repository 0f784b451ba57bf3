"""The flags that only pay on a GPU (--fuse-qkv, --channels-last, --compile, and the bench's regional
compile) change speed, not results: the UNet's outputs, 01's images and 02's rewards equal the plain
path's up to round-off. The VAE's bf16 encoding in training (--no-vae-fp32) changes them within the
bounds its test states."""
import copy
import json

import numpy as np
import pytest
import torch
from conftest import load_stage
from helpers import COLOURS, coloured_image, make_pairs, make_pool
from PIL import Image

from sail import batches, common, dpo, files, models
from sail.dpo import unet_call

generate = load_stage("01_generate")
self_reward = load_stage("02_self_reward")
train = load_stage("04_train")
FAST_FLAGS = ["--fuse-qkv", "--channels-last"]
PLAIN_SPEED_UP = models.speed_up


def run(stage, *argv):
    common.run_stage(stage.locked_main, stage.build_parser().parse_args([str(a) for a in argv]))


def unet_outputs(arch, **speed):
    desc = models.describe_model(f"tiny-{arch}")
    unet = models.speed_up(models.load_unet(desc).eval(), **speed)
    if not speed.get("compile"):  # the options are applied, not just accepted
        fused = {type(p).__name__ for p in unet.attn_processors.values()} == {"FusedAttnProcessor2_0"}
        assert fused == bool(speed.get("fuse_qkv"))
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == bool(speed.get("channels_last"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    cond = {"embeds": torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)}
    if arch == "sdxl":  # the pooled embedding: what the time-id projection takes beyond the 6 ids
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        cond["pooled"] = torch.randn(2, pooled, generator=generator)
    with torch.no_grad():
        return unet_call(unet, latents, torch.tensor([10, 900]), cond, 32)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("speed", [dict(fuse_qkv=True), dict(channels_last=True), dict(fuse_qkv=True, channels_last=True)])
def test_unet_outputs_equal_the_plain_unet(arch, speed):
    plain, fast = unet_outputs(arch), unet_outputs(arch, **speed)
    assert fast.shape == plain.shape and torch.allclose(fast, plain, atol=1e-5, rtol=1e-4)


def perturbed_checkpoint(folder):
    """tiny-sd15 with its UNet weights moved a little: a model that differs from its reference."""
    unet = models.load_unet(models.describe_model("tiny-sd15"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    models.save_checkpoint(unet, folder, dict(base_model="tiny:sd15", arch="sd15", preset="tiny-sd15", iteration=0,
                                              parent="tiny:sd15"))
    return folder


def test_generation_and_self_reward_equal_the_plain_path(tmp_path):
    pool = make_pool(tmp_path / "pool.jsonl", range(2))
    ckpt = perturbed_checkpoint(tmp_path / "ckpt")
    results = {}
    for name, flags in (("plain", []), ("fast", FAST_FLAGS)):
        out = tmp_path / name
        run(generate, "--ckpt", ckpt, "--pool", pool, "--num-candidates", 2, "--out", out, *flags)
        run(self_reward, "--ckpt", ckpt, "--dir", out, "--draws", 2, *flags)
        gens = files.read_jsonl(out / "generations.jsonl")
        images = [np.asarray(Image.open(out / g["image"]), dtype=np.int16) for g in gens]
        rewards = {(r["prompt_id"], r["index"]): r["reward"] for r in files.read_jsonl(out / "rewards.jsonl")}
        results[name] = images, rewards
        assert json.loads((out / "self_reward.args.json").read_text())["fuse_qkv"] == (name == "fast")
    for plain, fast in zip(results["plain"][0], results["fast"][0]):
        assert np.abs(plain - fast).max() <= 2  # a grey level of round-off, at most two
    assert results["plain"][1].keys() == results["fast"][1].keys()
    for key, reward in results["plain"][1].items():
        assert results["fast"][1][key] == pytest.approx(reward, abs=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [True, "regional"])
def test_compiled_unet_outputs_equal_the_plain_unet(compile):
    plain, fast = unet_outputs("sd15"), unet_outputs("sd15", compile=compile)
    assert torch.allclose(fast, plain, atol=1e-4, rtol=1e-3)


def test_regional_compile_compiles_only_the_repeated_blocks():
    unet = models.speed_up(models.load_unet(models.describe_model("tiny-sd15")), compile="regional")
    compiled = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None) is not None}
    assert compiled == {"BasicTransformerBlock"}  # diffusers' _repeated_blocks of the UNet


def trained_change(tmp_path, monkeypatch, name, *flags):
    """What two DPO steps of 04 on tiny-sd15 change in the UNet, with the given speed flags."""
    from diffusers import UNet2DConditionModel
    pairs = make_pairs(tmp_path / "pairs", n=8)
    out = tmp_path / name / "ckpt"
    applied = []  # the layouts of the trained UNet and its reference once the options are set

    def speed_up(unet, *options, **named):
        unet = PLAIN_SPEED_UP(unet, *options, **named)
        applied.append(unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last))
        return unet
    monkeypatch.setattr(train.models, "speed_up", speed_up)
    run(train, "--init", "tiny-sd15", "--pairs", pairs, "--out", out, "--max-steps", 2, *flags)
    trained = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert json.loads((out / "sail.json").read_text())["args"]["channels_last"] == ("--channels-last" in flags)
    base = models.load_unet(models.describe_model("tiny-sd15")).state_dict()
    return torch.cat([(trained[k] - base[k]).flatten() for k in base]), applied


def assert_same_training(plain, fast):
    (plain, _), (fast, _) = plain, fast
    # AdamW's first steps move each weight by about lr whatever the size of its gradient, so round-off
    # flips a few tiny gradients' steps: compare the change as a whole
    assert plain.norm() > 1e-3  # training moved the weights
    print("relative difference", ((fast - plain).norm() / plain.norm()).item())
    assert (fast - plain).norm() <= 0.02 * plain.norm(), (fast - plain).norm() / plain.norm()


def test_training_with_channels_last_equals_the_plain_path(tmp_path, monkeypatch):
    plain, fast = trained_change(tmp_path, monkeypatch, "plain"), trained_change(tmp_path, monkeypatch, "fast", "--channels-last")
    assert_same_training(plain, fast)
    assert plain[1] == [False, False] and fast[1] == [True, True]


def test_training_has_no_fused_qkv_flag():
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--fuse-qkv"])


@pytest.mark.slow
def test_compiled_training_equals_the_plain_path(tmp_path, monkeypatch):
    assert_same_training(trained_change(tmp_path, monkeypatch, "plain"), trained_change(tmp_path, monkeypatch, "fast", "--compile"))


def test_vae_encoding_precision_follows_the_frozen_models_but_sdxl():
    fp32, bf16, fp16 = torch.float32, torch.bfloat16, torch.float16
    assert models.encoding_vae_dtype("sdxl", bf16) == fp32 and models.encoding_vae_dtype("sd15", bf16) == bf16
    assert models.encoding_vae_dtype("sdxl", fp16) == fp32 and models.encoding_vae_dtype("sd15", fp16) == fp16
    assert models.encoding_vae_dtype("sdxl", bf16, fp32=False) == bf16  # --no-vae-fp32
    assert models.encoding_vae_dtype("sdxl", fp32, fp32=False) == fp32  # float32 frozen models: float32 whatever asked
    assert models.encoding_vae_dtype("sdxl", bf16, fp32=True) == fp32 and models.encoding_vae_dtype("sdxl", fp16, fp32=False) == fp16


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_bf16_vae_encoding_stays_near_the_float32_latents_and_loss(arch):
    """With --no-vae-fp32 under bf16 the VAE encodes the training images in bf16, SDXL's too: the
    latents (rounded to bf16 after encoding either way), one DPO micro batch's loss and its gradient stay
    within the bounds below of float32 encoding on the tiny models."""
    pipe = models.load_pipeline(models.describe_model(f"tiny-{arch}"), torch.device("cpu"), torch.float32)
    policy = copy.deepcopy(pipe.unet).requires_grad_(True)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(2e-3 * torch.randn(param.shape, generator=generator))
    images = [coloured_image(c, 32, seed=i) for i, c in enumerate(COLOURS)]
    images += images[::-1]  # 6 pairs: all preferred images, then all dispreferred
    noise, t = torch.randn((6, 4, 16, 16), generator=generator), torch.randint(0, 1000, (6,), generator=generator)
    cond, results = batches.encode_prompts(pipe, ["a square"] * 6, torch.device("cpu")), {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe.vae.to(dtype)
        vae_draws = [torch.Generator().manual_seed(i) for i in range(12)]
        latents = batches.encode_images(pipe.vae, images, torch.device("cpu"), vae_draws).to(torch.bfloat16).float()
        policy.zero_grad()
        out = dpo.dpo_micro_batch(policy, pipe.unet, dpo.forward_process(pipe.scheduler), latents, noise, t, cond, 32, dpo.BETA)
        out.loss.backward()
        results[dtype] = latents, out.loss.item(), torch.cat([p.grad.flatten() for p in policy.parameters()])
    (lat32, loss32, grad32), (lat16, loss16, grad16) = results[torch.float32], results[torch.bfloat16]
    relative = dict(latents=((lat16 - lat32).norm() / lat32.norm()).item(), loss=abs(loss16 - loss32) / loss32,
                    grad=((grad16 - grad32).norm() / grad32.norm()).item())
    print(arch, relative)
    assert 0 < relative["latents"] < 0.02 and relative["loss"] < 0.03 and relative["grad"] < 0.05
