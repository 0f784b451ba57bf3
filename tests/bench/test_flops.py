"""bench/flops.py and bench/estimate.py: FLOP counts of the released architectures on the meta device against
the counts in the facts file (FlopCounterMode on meta tensors), the peak table, and the estimate's sums."""
import pytest
import torch

from bench import estimate, flops, random_weights


@pytest.fixture(scope="module")
def sd15_meta():
    pipe, _ = random_weights.random_weights_pipeline("sd15", torch.device("meta"), torch.bfloat16, "ddim")
    return flops.meta_models(pipe)


def test_released_sd15_counts(sd15_meta):
    """SD1.5 at 512 px: UNet forward 0.803 TFLOP per image, VAE encoder 1.117, CLIP-L 0.013;
    forward and backward 3.00x a forward, with gradient checkpointing 3.74x."""
    unet, vae, encoders = sd15_meta
    forward = flops.unet_pass_flops(unet, vae, 512)
    assert forward / 1e12 == pytest.approx(0.803, abs=5e-4)
    assert flops.unet_pass_flops(unet, vae, 512, train=True) / forward == pytest.approx(3.00, abs=0.01)
    assert flops.unet_pass_flops(unet, vae, 512, train=True, checkpointing=True) / forward == pytest.approx(3.74, abs=0.01)
    with torch.no_grad():
        _, encode = flops.count_flops(lambda: vae.encode(torch.zeros(1, 3, 512, 512, device="meta")))
        _, text = flops.count_flops(lambda: encoders[0](torch.zeros(1, 77, dtype=torch.long, device="meta")))
    assert encode / 1e12 == pytest.approx(1.117, abs=5e-4) and text / 1e12 == pytest.approx(0.013, abs=5e-4)


def test_released_sdxl_unet_forward():
    """SDXL's UNet at 1024 px (128 x 128 latents) with its text and time-id conditioning: 6.761 TFLOP."""
    pipe, _ = random_weights.random_weights_pipeline("sdxl", torch.device("meta"), torch.bfloat16, "ddim")
    unet, vae, _ = flops.meta_models(pipe)
    assert flops.unet_pass_flops(unet, vae, 1024) / 1e12 == pytest.approx(6.761, abs=5e-4)


def test_unit_flops_compose_the_parts():
    parts = dict(unet=10, unet_train=30, vae_encode=7, text=1)
    pipe = type("Pipe", (), {"config": type("Config", (), {})()})()
    units = flops.unit_flops(pipe, 512, steps=50, cfg=7.5, draws=10, checkpointing=False, parts=parts)
    assert units == dict(gen=50 * 2 * 10 + 2 * 1, reward=2 * 10 * 10, train=2 * (7 + 10 + 30) + 1)
    pipe.config.force_zeros_for_empty_prompt = True  # SDXL's pipeline zeros the empty negative prompt: no encoding
    assert flops.unit_flops(pipe, 1024, 20, 5.0, 10, True, parts)["gen"] == 20 * 2 * 10 + 1
    assert flops.unit_flops(pipe, 32, 20, 1.0, 10, True, parts)["gen"] == 20 * 10 + 1  # no guidance: one pass


def test_cpu_attention_is_counted_as_on_the_gpu():
    q = torch.randn(2, 4, 16, 8, requires_grad=True)
    attention = lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)
    _, forward = flops.count_flops(attention)
    _, both = flops.count_flops(lambda: attention().sum().backward())
    assert forward == 4 * 2 * 4 * 16 * 16 * 8  # two matrix products of 2 x b x h x s x s x d each
    assert both == forward + 5 * forward // 2  # torch's fused backward: five products, the scores recomputed


def test_peak_table():
    assert flops.peak_for("NVIDIA H200") == flops.peak_for("NVIDIA H100 80GB HBM3") == 989.4
    assert flops.peak_for("NVIDIA H100 PCIe") == 756.0 and flops.peak_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert flops.peak_for("NVIDIA L40S") == 362.0 and flops.peak_for("NVIDIA L4") == 121.0
    assert flops.peak_for("NVIDIA GeForce GTX 1080") is None
    assert flops.device_peak(123.0)[0] == 123.0 and flops.device_peak(123.0)[2] == "--peak-tflops"
    if not torch.cuda.is_available():
        assert flops.device_peak()[0] is None


def test_estimate_adds_up():
    rates = dict(train=128.0, gen=8.0, reward=1.0)  # one step, one prompt's images, one image: a second each
    rows = estimate.paper_run_estimate("sdxl", rates, epochs=1)
    seconds = {stage: s for stage, _, s, _ in rows}
    assert seconds["iter 0 DPO (seed)"] == 391 and seconds["iter 1 generation"] == 10_000
    assert seconds["iter 2 self-reward"] == 160_000 and seconds["iter 2 DPO"] == 209  # 20K self + 6,667 human pairs


def test_estimate_mfu():
    """Each stage runs at its workload's FLOPs x rate; the total's MFU is all FLOPs over all seconds."""
    rates, unit = dict(train=2.0, gen=1.0, reward=4.0), dict(train=3e12, gen=5e12, reward=1e12)
    lines, summary = estimate.estimate_lines("sd15", rates, unit, peak=100.0)
    stage = {line[:22].strip(): line.split() for line in lines[3:]}
    assert stage["iter 0 DPO (seed)"][-6:-4] == ["6", "6.0%"] and stage["iter 1 generation"][-6:-4] == ["5", "5.0%"]
    rows = estimate.paper_run_estimate("sd15", rates, 1)
    work = sum(s * rates[k] * unit[k] for _, _, s, k in rows)
    assert summary["mfu"] == pytest.approx(work / sum(s for _, _, s, _ in rows) / 100e12, abs=1e-4)
    assert summary["total_tflop"] == pytest.approx(work / 1e12, rel=1e-6)
    _, no_peak = estimate.estimate_lines("sd15", rates, unit, peak=None)
    assert no_peak["mfu"] is None
