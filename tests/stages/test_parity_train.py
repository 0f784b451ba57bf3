"""One DiffusionDPO training step of the kit (04_train.py, sail/dpo.py, sail/models.py) against a
transcription of the official reference, on the tiny SD1.5 and SDXL models: pixels, latents, text
conditioning, UNet inputs, loss and every gradient of the trained UNet.

Reference: github.com/SalesforceAIResearch/DiffusionDPO, train.py at commit
5233e75919f912f3f631958ee4ebb5b5204382d9 (the file's last change: 8d3ee5c6cf31). Line numbers below
are of that file. Its RNG calls are replaced by arguments (the VAE sample's generators, the noise,
the timesteps, the empty-caption draw) so that both paths see the same draws; CPU and float32."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_stage
from PIL import Image
from torchvision import transforms

from sail import batches, dpo, models

train = load_stage("04_train")
RES, BETA = 32, 5000.0
# (w, h) of preferred and dispreferred image per pair: different sizes and aspect ratios per side;
# the crop offsets 3.5 and 9.5 tell torchvision's round() from a floor
SIZES = [((36, 44), (52, 42)), ((50, 50), (64, 40))]
PROMPTS = ["a red square at the top left", ""]  # the second pair has an empty caption (L396-397 / L739-740)


# ---------------------------------------------------------------- the reference, transcribed
def ref_train_transforms(resolution, random_crop=False, no_hflip=True):  # train.py L756-764
    return transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.RandomCrop(resolution) if random_crop else transforms.CenterCrop(resolution),
        transforms.Lambda(lambda x: x) if no_hflip else transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])


def ref_models(path, sdxl):  # train.py L478-479 (scheduler), L508-597 (tokenizers, encoders, VAE)
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    m = dict(noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler"),
             vae=AutoencoderKL.from_pretrained(path, subfolder="vae").requires_grad_(False))
    if sdxl:
        m["tokenizers"] = [AutoTokenizer.from_pretrained(path, subfolder=s, use_fast=False) for s in ("tokenizer", "tokenizer_2")]
        m["text_encoders"] = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder").requires_grad_(False),
                              CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2").requires_grad_(False)]
    else:
        m["tokenizer"] = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        m["text_encoder"] = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").requires_grad_(False)
    return m


def ref_encode_prompt_sdxl(captions, text_encoders, tokenizers):  # train.py L389-428, captions already drawn
    prompt_embeds_list = []
    with torch.no_grad():
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            prompt_embeds = text_encoder(ids, output_hidden_states=True)
            pooled_prompt_embeds = prompt_embeds[0]
            prompt_embeds = prompt_embeds.hidden_states[-2]
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds.view(bs_embed, -1)}


def ref_latents(m, pixels_w, pixels_l, vae_generators):
    """train.py L772-790 (a pair's images concatenated on channels), L1016 and L1027-1029."""
    pixel_values = torch.stack([torch.cat([w, l], dim=0) for w, l in zip(pixels_w, pixels_l)])  # L786-787, L793
    feed_pixel_values = torch.cat(pixel_values.chunk(2, dim=1))  # L1016
    with torch.no_grad():  # the reference samples from the global RNG: .sample()
        latents = m["vae"].encode(feed_pixel_values).latent_dist.sample(vae_generators)
        return latents * m["vae"].config.scaling_factor


def ref_dpo_step(m, unet, ref_unet, latents, captions, noise, timesteps, sdxl):
    """train.py L1031-1145, the step from the latents on. noise and timesteps: the reference's
    per-image draws (2B); its chunk(2)[0].repeat(2) keeps the first half for both images of a pair."""
    timesteps = timesteps.long().chunk(2)[0].repeat(2)  # L1045, L1053-1055
    noise = noise.chunk(2)[0].repeat(2, 1, 1, 1)
    noisy_latents = m["noise_scheduler"].add_noise(latents, noise, timesteps)  # L1060
    added_cond_kwargs = None
    if sdxl:  # L1064-1098 (SDXL-base branch)
        add_time_ids = torch.tensor([RES, RES, 0, 0, RES, RES], dtype=torch.float32)[None, :].repeat(timesteps.size(0), 1)
        prompt_batch = ref_encode_prompt_sdxl(captions, m["text_encoders"], m["tokenizers"])
        prompt_batch["prompt_embeds"] = prompt_batch["prompt_embeds"].repeat(2, 1, 1)
        prompt_batch["pooled_prompt_embeds"] = prompt_batch["pooled_prompt_embeds"].repeat(2, 1)
        added_cond_kwargs = {"time_ids": add_time_ids, "text_embeds": prompt_batch["pooled_prompt_embeds"]}
        encoder_hidden_states = prompt_batch["prompt_embeds"]
    else:  # L736-753 (tokenize_captions), L1099-1103
        input_ids = m["tokenizer"](captions, max_length=m["tokenizer"].model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids
        encoder_hidden_states = m["text_encoder"](input_ids)[0].repeat(2, 1, 1)
    assert m["noise_scheduler"].config.prediction_type == "epsilon"  # L1106-1107
    target = noise
    args = (noisy_latents, timesteps, encoder_hidden_states)
    model_pred = unet(*args, added_cond_kwargs=added_cond_kwargs).sample  # L1115-1118
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])  # L1125-1130
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    with torch.no_grad():  # L1132-1140
        ref_pred = ref_unet(*args, added_cond_kwargs=added_cond_kwargs).sample.detach()
        ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
        ref_losses_w, ref_losses_l = ref_losses.chunk(2)
        ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * BETA * (model_diff - ref_diff)  # L1142-1145
    return -1 * F.logsigmoid(inside_term).mean()


# ---------------------------------------------------------------- helpers
def pair_rows(folder, sizes=SIZES, seed=0):
    rng, rows = np.random.default_rng(seed), []
    for i, pair in enumerate(sizes):
        row = {"_index": i, "_file": "pairs.jsonl", "_line": i + 1, "prompt": PROMPTS[i % len(PROMPTS)]}
        for side, (w, h) in zip(("_image_w", "_image_l"), pair):
            path = folder / f"{i}{side}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            row[side] = str(path)
        rows.append(row)
    return rows


def capture_unet_calls(unet, store):
    """Record what the UNet is called with (sample, t, text embeds, SDXL's added conditions) and returns."""
    def before(module, args, kwargs):
        store.append(dict(sample=args[0], t=args[1], embeds=args[2] if len(args) > 2 else kwargs["encoder_hidden_states"],
                          **(kwargs.get("added_cond_kwargs") or {})))

    def after(module, args, kwargs, out):
        store[-1]["pred"] = out.sample.detach().clone()
    return [unet.register_forward_pre_hook(before, with_kwargs=True), unet.register_forward_hook(after, with_kwargs=True)]


def policy_and_reference(path):
    """The reference UNet (frozen) and a slightly moved policy, so that the loss is not log 2."""
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel.from_pretrained(path, subfolder="unet").requires_grad_(False)
    policy = copy.deepcopy(ref).requires_grad_(True).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    return policy, ref


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_one_dpo_step_matches_the_reference(tmp_path, arch):
    path, sdxl, cpu = models.resolve_model_path(f"tiny:{arch}"), arch == "sdxl", torch.device("cpu")
    rows = pair_rows(tmp_path)
    prompts, n = [r["prompt"] for r in rows], len(rows)
    gens = lambda k: [torch.Generator().manual_seed(100 + i) for i in range(k)]  # noqa: E731
    # pixels: the kit's PIL images against torchvision's transform, image by image
    kit_imgs = [batches.load_pair_pixels(r, RES, 0, False, False) for r in rows]
    tf, to_pixels = ref_train_transforms(RES), transforms.Compose(ref_train_transforms(RES).transforms[-2:])
    ref_w = [tf(Image.open(r["_image_w"]).convert("RGB")) for r in rows]
    ref_l = [tf(Image.open(r["_image_l"]).convert("RGB")) for r in rows]
    for (kw, kl), rw, rl in zip(kit_imgs, ref_w, ref_l):
        assert kw.size == kl.size == (RES, RES)
        assert torch.equal(to_pixels(kw), rw) and torch.equal(to_pixels(kl), rl)
    # latents: the kit's encode_images against the reference's, the same posterior draw
    pipe = models.load_pipeline(models.describe_model(path), cpu, torch.float32)
    m = ref_models(path, sdxl)
    assert pipe.vae.config.scaling_factor == m["vae"].config.scaling_factor == (0.13025 if sdxl else 0.18215)
    kit_lat = batches.encode_images(pipe.vae, [p[0] for p in kit_imgs] + [p[1] for p in kit_imgs], cpu, sample_generator=gens(2 * n))
    ref_lat = ref_latents(m, ref_w, ref_l, gens(2 * n))
    diffs = {"latents": max_diff(kit_lat, ref_lat)}
    assert torch.equal(kit_lat, ref_lat)  # the kit normalises as ToTensor + Normalize(0.5, 0.5) do, to the bit
    # one step, each path from its own latents (beta = 5000 would turn a latent round-off of 3e-7 into 2e-4 of loss)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn((2 * n, *ref_lat.shape[1:]), generator=gen)  # the reference draws per image, the kit per pair
    t = torch.cat([torch.tensor([999, 421]), torch.randint(0, 1000, (n,), generator=gen)])  # (n = 2)
    policy, ref_unet = policy_and_reference(path)
    kit_unet, ref_path_unet, calls = copy.deepcopy(policy), copy.deepcopy(policy), []
    hooks = capture_unet_calls(kit_unet, calls)
    out = dpo.dpo_micro_batch(kit_unet, ref_unet, dpo.forward_process(pipe.scheduler), kit_lat, noise[:n], t[:n],
                                batches.encode_prompts(pipe, prompts, cpu), RES, BETA)
    out.loss.backward()
    hooks += capture_unet_calls(ref_path_unet, calls)
    ref_loss = ref_dpo_step(m, ref_path_unet, ref_unet, ref_lat, prompts, noise, t, sdxl)
    ref_loss.backward()
    [h.remove() for h in hooks]
    kit_in, ref_in = calls
    assert torch.equal(kit_in["t"], ref_in["t"])
    for key in ("sample", "embeds") + (("text_embeds", "time_ids") if sdxl else ()) + ("pred",):
        diffs[key] = max_diff(kit_in[key], ref_in[key])
        assert kit_in[key].shape == ref_in[key].shape and torch.equal(kit_in[key], ref_in[key]), key
    if sdxl:
        assert kit_in["time_ids"].tolist() == [[RES, RES, 0, 0, RES, RES]] * (2 * n)
    assert abs(out.loss.item() - np.log(2)) > 1e-2, "policy == reference would make the loss log 2 and compare nothing"
    diffs["loss"] = max_diff(out.loss, ref_loss)
    assert torch.equal(out.loss, ref_loss)
    # gradients to the bit: sail/dpo.py forms inside in the reference's order, -beta/2 ((e_w - e_l) - (ref_w - ref_l));
    # in another order beta/2 x an ulp of the errors moves the pairs' weights (1e-5 of the gradient's norm)
    ref_grads = {name: p.grad for name, p in ref_path_unet.named_parameters()}
    sq_err = sq_ref = worst = 0.0
    for name, p in kit_unet.named_parameters():
        g, rg = p.grad.double(), ref_grads[name].double()
        err, scale = (g - rg).abs().max().item(), rg.abs().max().item()
        assert torch.equal(g, rg), f"{name}: gradient differs by {err:.3g}, its largest entry is {scale:.3g}"
        worst, sq_err, sq_ref = max(worst, err / max(scale, 1e-30)), sq_err + ((g - rg) ** 2).sum().item(), sq_ref + (rg ** 2).sum().item()
    diffs["grad (relative L2)"], diffs["grad (worst per tensor, relative)"] = (sq_err / sq_ref) ** 0.5, worst
    assert diffs["grad (relative L2)"] < 1e-4
    print(f"{arch}: loss {out.loss.item():.6f} vs {ref_loss.item():.6f}; max |differences|: "
          + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))


def test_flip_is_per_image_and_otherwise_identity(tmp_path):
    rows = pair_rows(tmp_path, sizes=[((40, 40), (40, 40))] * 80)
    flips = []
    for r in rows:
        plain, flipped = ([np.asarray(x) for x in batches.load_pair_pixels(r, RES, 0, False, f)] for f in (False, True))
        for a, b in zip(plain, flipped):
            assert np.array_equal(a, b) != np.array_equal(a[:, ::-1], b), "each image is either itself or its mirror"
        flips.append([not np.array_equal(a, b) for a, b in zip(plain, flipped)])
    flips = np.array(flips)  # (pairs, 2): was the preferred / dispreferred image mirrored
    assert 0.3 < flips.mean() < 0.7  # RandomHorizontalFlip(p=0.5)
    assert 0.3 < (flips[:, 0] != flips[:, 1]).mean() < 0.7, "the two images of a pair are flipped independently"


def test_training_noise_does_not_depend_on_the_shipped_scheduler(tmp_path):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler
    src = models.resolve_model_path("tiny:sdxl")
    config = json.loads((Path(src) / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "EulerDiscreteScheduler"  # as SDXL base ships it
    gen = torch.Generator().manual_seed(3)
    x0, eps = torch.randn((4, 4, 8, 8), generator=gen), torch.randn((4, 4, 8, 8), generator=gen)
    t = torch.tensor([999, 500, 1, 0])
    policy, ref_unet = policy_and_reference(src)
    results = []
    for cls in (EulerDiscreteScheduler, DDIMScheduler, DDPMScheduler, PNDMScheduler):
        folder = tmp_path / cls.__name__
        shutil.copytree(src, folder)
        cls.from_config(config).save_config(folder / "scheduler")
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps(dict(index, scheduler=["diffusers", cls.__name__])))
        pipe = models.load_pipeline(models.describe_model(str(folder)), torch.device("cpu"), torch.float32)
        assert type(pipe.scheduler) is cls
        fp = dpo.forward_process(pipe.scheduler)
        cond = batches.encode_prompts(pipe, ["a cat", ""], torch.device("cpu"))
        with torch.no_grad():
            results.append((fp.add_noise(x0, eps, t), dpo.dpo_micro_batch(policy, ref_unet, fp, x0, eps[:2], t[:2], cond, RES, BETA).loss))
    for noisy, loss in results[1:]:
        assert torch.equal(noisy, results[0][0]) and torch.equal(loss, results[0][1])
    reference = DDPMScheduler.from_pretrained(src, subfolder="scheduler")  # train.py L478-479
    assert torch.equal(results[0][0], reference.add_noise(x0, eps, t))
    big, big_eps, t999 = torch.randn((2, 64, 4, 8, 8), generator=gen).unbind() + (torch.full((64,), 999),)
    assert abs(dpo.forward_process(EulerDiscreteScheduler.from_config(config)).add_noise(big, big_eps, t999).std() - 1) < 0.05
    # what noising with SDXL's own sampler would give instead: x0 + sigma_999 eps, sigma_999 ~ 14.6
    assert EulerDiscreteScheduler.from_config(config).add_noise(big, big_eps, t999).std() > 10
