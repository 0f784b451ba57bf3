"""bench/speed.py: the released SD1.5 and SDXL architectures it builds for --random-weights (checked on
the meta device, without memory or time), runs end to end on tiny models with their FLOPs counted on the
timed functions, the profile, the speed flags, and the generation and self-reward paths it times."""
import json

import pytest
import torch

from bench import random_weights, speed, steps
from sail import configs, models, settings, trainer

# parameter counts of the released models (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0)
UNET = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
VAE, CLIP_L, OPENCLIP_BIGG = 83_653_863, 123_060_480, 694_659_840
ROWS = ("DPO micro batch (04 train_step)", "DPO micro batch, latents cached", "generation", "self-reward (K=10)")


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_random_weights_build_the_released_architectures(arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    pipe, unet = random_weights.random_weights_pipeline(arch, torch.device("meta"), torch.bfloat16, "ddim")
    assert isinstance(pipe, StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline)
    assert count(unet) == count(pipe.unet) == UNET[arch]
    assert unet.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16  # trained in float32, reference in bf16
    assert count(pipe.vae) == VAE and pipe.vae.config.sample_size == {"sd15": 512, "sdxl": 1024}[arch]
    assert count(pipe.text_encoder) == CLIP_L
    if arch == "sdxl":
        assert count(pipe.text_encoder_2) == OPENCLIP_BIGG
        assert pipe.text_encoder_2.config.projection_dim == 1280  # pooled embeds: 2816 = 1280 + 6 x 256
    assert unet.config.sample_size * 8 == settings.PRESETS[arch]["resolution"]
    ids = pipe.tokenizer("a red square").input_ids  # pooled where the id is highest: <|endoftext|>
    assert pipe.text_encoder.config.eos_token_id == 2 and ids[-1] == max(ids) == len(pipe.tokenizer) - 1


def small_architectures(arch):
    """The released configs at CPU size, to run the --random-weights path in seconds."""
    cfg = configs.tiny_configs(arch, vocab_size=600)
    cfg["unet"]["sample_size"] = 4
    return cfg


def run_bench(capsys, *argv):
    table = speed.main(speed.parse_args(["--micro-batch", "2", "--batch-size", "4", "--gen-batch", "2", "--steps", "1",
                                         "--reward-images", "2", *argv]))
    return table, capsys.readouterr().out.splitlines()


def check_report(table, lines, arch, mfu, naive=True):
    rows = {line.split("  ")[0]: line for line in lines}
    for work in ROWS:
        row = table.row(work)
        assert row.ours > 0 and row.peak > 0 and row.flops > 0 and row.tflops == pytest.approx(row.ours * row.flops / 1e12)
        assert row.mfu is None if not mfu else row.mfu == pytest.approx(row.tflops / mfu)
        assert (row.naive > 0) if naive else row.naive is None
        printed = rows[work].split()[-7 if naive else -5:]
        assert float(printed[0]) == pytest.approx(row.ours, abs=0.006) and printed[-1] == (f"{100 * row.mfu:.1f}%" if mfu else "-")
        assert float(printed[-3]) == pytest.approx(row.flops / 1e12, rel=1e-3)
        if naive:
            assert float(printed[1]) == pytest.approx(row.naive, abs=0.006) and printed[2].endswith("x")
    step = next(line for line in lines if line.startswith("DPO step, 4 pairs = 2 x 2 "))
    assert float(step.split()[-5]) > 0 and float(step.split()[-3]) > 0  # pairs/s, TFLOP per pair
    assert any(line.startswith("peak memory ") for line in lines)
    step = next(line for line in lines if line.startswith("where a DPO micro-batch step's"))
    parts = lines[lines.index(step) + 1:lines.index(step) + 6]
    assert [p.split("  ")[1] for p in parts] == ["text encoders", "VAE encoding", "reference UNet", "trained UNet forward",
                                                 "backward, optimizer, images"]
    assert sum(float(p.split()[-1].rstrip("%")) for p in parts) == pytest.approx(100, abs=0.5)
    assert any(line.startswith("ESTIMATE from the rates above") and f"paper's {arch} run" in line for line in lines)
    iterations = {"sd15": 3, "sdxl": 2}[arch]
    stages = [line for line in lines if line.startswith("iter ")]
    assert len(stages) == 1 + 3 * iterations and stages[0].startswith("iter 0 DPO (seed)      391 steps x 128 pairs")
    assert any(line.startswith(f"iter {iterations} self-reward     160,000 images x K=10") for line in lines)
    assert any(line.startswith("total ") for line in lines)


def test_bench_times_and_counts_the_training_step_of_04(capsys, monkeypatch, tmp_path):
    """The training rows time the train_step 04_train.py runs (sail/trainer.py, on the job its start builds), not a copy; the
    FLOPs of each row are counted on the function it times and equal bench/flops.py's table per unit; the
    micro-batch step and the step at the effective batch do the same work per pair; --profile writes a
    Chrome trace of one step."""
    calls, real = [], trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda job, step: calls.append((job.args.batch_size, step)) or real(job, step))
    table, lines = run_bench(capsys, "--preset", "tiny-sd15", "--peak-tflops", "0.001", "--profile", str(tmp_path))
    assert lines[0].startswith("preset tiny-sd15 (weights of the preset) on CPU")
    assert "DPO (adamw, no mixed precision) in micro batches of 2 pairs, steps of 4 pairs" in lines[0] and "at 32 px" in lines[0]
    assert lines[1] == "peak 0.001 TFLOP/s dense bf16 (--peak-tflops)"
    check_report(table, lines, "sd15", mfu=0.001)
    # a warm-up (counted) and one step, cache off; the cache filled, then the same cached; the breakdown's
    # warm-up and step; the profiled step; then a warm-up and one step at the effective batch
    assert [b for b, _ in calls] == [2] * 8 + [4] * 2 and len({s for b, s in calls if b == 2}) == 8
    unit = table.unit_flops
    assert table.row("generation").flops == unit["gen"] and table.row("self-reward (K=10)").flops == unit["reward"]
    micro, cached, step = (table.row(w).flops for w in (ROWS[0], ROWS[1], "DPO step, 4 pairs = 2 x 2"))
    assert micro == step and micro == pytest.approx(unit["train"], rel=0.03)  # see bench/flops.py on attention
    assert cached < micro  # the VAE encodes nothing
    trace = json.loads((tmp_path / "train_step-tiny-sd15.json").read_text())
    assert any(event.get("name") == "aten::convolution" for event in trace["traceEvents"])
    with pytest.raises(speed.common.SailError, match="exists; not overwriting it"):
        speed.main(speed.parse_args(["--profile", str(tmp_path)]))


def test_bench_random_weights_path(capsys, monkeypatch):
    monkeypatch.setattr(random_weights, "architecture", small_architectures)
    table, lines = run_bench(capsys, "--preset", "tiny-sdxl", "--random-weights", "--no-naive")
    assert lines[0].startswith("preset tiny-sdxl (random weights, released architecture)")
    check_report(table, lines, "sdxl", mfu=None, naive=False)


def test_speed_flags_rows(capsys, monkeypatch):
    applied = []

    def speed_up(unet, compile=False, fuse_qkv=False, channels_last=False):
        """torch.compile's first call takes minutes on 2 cores: record the options asked for instead"""
        named = dict(compile=compile, fuse_qkv=fuse_qkv, channels_last=channels_last)
        applied.extend([sorted(f"{k}={v}" for k, v in named.items() if v)] if any(named.values()) else [])
        return unet
    monkeypatch.setattr(speed.models, "speed_up", speed_up)
    rows = [line.split("  ")[0] for line in run_bench(capsys, "--no-naive", "--speed-flags")[1]]
    for flag in ("channels-last", "compile-regional"):
        assert f"DPO micro batch + {flag}" in rows
    for flag in ("channels-last", "fuse-qkv", "compile-regional"):
        assert f"generation + {flag}" in rows and f"self-reward + {flag}" in rows
    last, fuse, regional = ["channels_last=True"], ["fuse_qkv=True"], ["compile=regional"]
    assert applied == [last] * 2 + [regional] * 2 + [last] * 2 + [fuse] * 2 + [regional] * 2
    with pytest.raises(speed.common.SailError, match="compile and compile-regional"):
        speed.main(speed.parse_args(["--speed-flags", "compile", "compile-regional"]))


def perturbed_unet(desc):
    """tiny-sd15's UNet with its weights moved a little: a model whose rewards differ from 0."""
    unet = models.load_unet(desc)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return unet.eval().requires_grad_(False)


def test_batched_generation_and_self_reward_equal_the_one_at_a_time_paths():
    """What the bench times as ours and as the straightforward code is the same work: the same latents and
    rewards up to round-off, whatever the batch sizes."""
    desc = models.describe_model("tiny-sd15")
    pipe, preset = models.load_pipeline(desc, torch.device("cpu"), torch.float32, "ddim"), settings.get_preset("tiny-sd15")
    scored = perturbed_unet(desc)
    with torch.inference_mode():  # 3 images x 10 draws in calls of 7: the last call holds the rest
        fns = steps.inference_fns(pipe, scored, preset, torch.device("cpu"), torch.float32, 2, 7, 3)
        (gen, gen_naive), (reward, reward_naive) = fns["gen"], fns["reward"]
        ours = gen()
        assert ours.shape[0] == 2 and torch.allclose(ours, gen_naive(), atol=1e-4)
        ours, naive = reward(), reward_naive()
        assert ours.shape == (3,) and ours.abs().min() > 0.1 and torch.allclose(ours, naive, rtol=1e-3, atol=1e-3)

