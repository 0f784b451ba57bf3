"""bench/speed.py: the released SD1.5 and SDXL architectures it builds for --random-weights (checked on
the meta device, without memory or time), and a run end to end on tiny models."""
import pytest
import torch

from bench import speed
from sail import configs

# parameter counts of the released models (stable-diffusion-v1-5, stable-diffusion-xl-base-1.0)
UNET = {"sd15": 859_520_964, "sdxl": 2_567_463_684}
VAE, CLIP_L, OPENCLIP_BIGG = 83_653_863, 123_060_480, 694_659_840


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_random_weights_build_the_released_architectures(arch):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    pipe, unet = speed.random_weights_pipeline(arch, torch.device("meta"), torch.bfloat16, "ddim")
    assert isinstance(pipe, StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline)
    assert count(unet) == count(pipe.unet) == UNET[arch]
    assert unet.dtype == torch.float32 and pipe.unet.dtype == torch.bfloat16  # trained in float32, reference in bf16
    assert count(pipe.vae) == VAE and pipe.vae.config.sample_size == {"sd15": 512, "sdxl": 1024}[arch]
    assert count(pipe.text_encoder) == CLIP_L
    if arch == "sdxl":
        assert count(pipe.text_encoder_2) == OPENCLIP_BIGG
        assert pipe.text_encoder_2.config.projection_dim == 1280  # pooled embeds: 2816 = 1280 + 6 x 256
    assert unet.config.sample_size * 8 == speed.models.PRESETS[arch]["resolution"]
    ids = pipe.tokenizer("a red square").input_ids  # pooled where the id is highest: <|endoftext|>
    assert pipe.text_encoder.config.eos_token_id == 2 and ids[-1] == max(ids) == len(pipe.tokenizer) - 1


def small_architectures(arch):
    """The released configs at CPU size, to run the --random-weights path in seconds."""
    cfg = configs.tiny_configs(arch, vocab_size=600)
    cfg["unet"]["sample_size"] = 4
    return cfg


def run_bench(capsys, *argv):
    speed.main(speed.parse_args(["--pairs", "2", "--images", "2", "--steps", "1", *argv]))
    return capsys.readouterr().out.splitlines()


def check_report(lines, arch):
    rows = {line.split("  ")[0]: line for line in lines}
    for work in ("DPO step (04 train_step)", "DPO step, latents cached", "generation", "self-reward (K=10)"):
        ours, naive, ratio, peak = rows[work].split()[-4:]
        assert float(ours) > 0 and float(naive) > 0 and ratio.endswith("x") and float(peak) > 0, rows[work]
    assert any(line.startswith("peak memory ") for line in lines)
    step = next(line for line in lines if line.startswith("where a DPO step's"))
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


def test_bench_times_the_training_step_of_04(capsys, monkeypatch):
    """The training rows time 04_train.py's own train_step (and the job its setup builds), not a copy."""
    calls = []
    real_step = speed.train.train_step
    monkeypatch.setattr(speed.train, "train_step", lambda job, step: calls.append(step) or real_step(job, step))
    lines = run_bench(capsys, "--preset", "tiny-sd15")
    assert lines[0].startswith("preset tiny-sd15 (weights of the preset) on CPU")
    assert "DPO step of 2 pairs (adamw, no mixed precision)" in lines[0] and "at 32 px" in lines[0]
    check_report(lines, "sd15")
    # timed: a warm-up and one step, cache off and cached; the breakdown's warm-up and step
    assert len(calls) == 6 and len(set(calls)) == 6  # every call a new step of the job (the straightforward ones between)


@pytest.mark.parametrize("preset", ["tiny-sd15", "tiny-sdxl"])
def test_bench_random_weights_path(capsys, monkeypatch, preset):
    monkeypatch.setattr(speed, "architecture", small_architectures)
    lines = run_bench(capsys, "--preset", preset, "--random-weights")
    assert lines[0].startswith(f"preset {preset} (random weights, released architecture)")
    check_report(lines, preset.split("-")[1])


def test_speed_flags_rows(capsys, monkeypatch):
    applied = []

    def speed_up(unet, compile=False, fuse_qkv=False, channels_last=False):
        """torch.compile's first call takes minutes on 2 cores: record the options asked for instead"""
        named = dict(compile=compile, fuse_qkv=fuse_qkv, channels_last=channels_last)
        applied.extend([sorted(k for k, on in named.items() if on)] if any(named.values()) else [])
        return unet
    monkeypatch.setattr(speed.models, "speed_up", speed_up)
    rows = [line.split("  ")[0] for line in run_bench(capsys, "--speed-flags")]
    for work in ("DPO step + channels-last", "DPO step + compile", "generation + channels-last",
                 "generation + fuse-qkv", "generation + compile"):
        assert work in rows
    assert applied == [["channels_last"]] * 2 + [["compile"]] * 2 + [["channels_last"], ["fuse_qkv"], ["compile"]]


def test_estimate_adds_up():
    rates = dict(train=128.0, gen=8.0, reward=1.0)  # one step, one prompt's images, one image: a second each
    rows = speed.paper_run_estimate("sdxl", rates, epochs=1)
    seconds = {stage: s for stage, _, s in rows}
    assert seconds["iter 0 DPO (seed)"] == 391 and seconds["iter 1 generation"] == 10_000
    assert seconds["iter 2 self-reward"] == 160_000 and seconds["iter 2 DPO"] == 209  # 20K self + 6,667 human pairs
