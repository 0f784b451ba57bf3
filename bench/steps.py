"""The work bench/speed.py times beside the kit's own: a pair file of noise images, the straightforward DPO
step, where a step's time goes, and the generation and self-reward calls (batched, and one at a time).
"""
import json
import time

import numpy as np
import torch
from PIL import Image

from bench.estimate import DRAWS
from bench.rows import sync, timed
from sail import batches, dpo, self_reward, training

PROMPT = "a red square on the left"


def write_pair_files(folder, resolution, pairs, distinct):
    """folder/pairs-<pairs>.jsonl: `pairs` rows over `distinct` pairs of noise images (made once)."""
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(distinct):
        for side in "wl":
            path = folder / "images" / f"{i}{side}.png"
            if not path.is_file():
                Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)).save(path)
    rows = [dict(prompt=PROMPT, image_w=f"images/{i % distinct}w.png", image_l=f"images/{i % distinct}l.png", source="human")
            for i in range(pairs)]
    path = folder / f"pairs-{pairs}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def straightforward_step(job, step):
    """The same batch's DPO step written plainly: per side, the images VAE-encoded and the prompts
    encoded, then the trained UNet and the reference each called on that side alone."""
    args, device = job.args, job.device
    rows = [job.pairs[i] for i in job.order[step * args.batch_size:(step + 1) * args.batch_size]]
    gen = torch.Generator().manual_seed(step)
    t = torch.randint(0, 1000, (len(rows),), generator=gen).to(device)
    errors, noise = [], None
    for side in (0, 1):
        images = [batches.load_pair_pixels(r, args.resolution, args.seed, False, False)[side] for r in rows]
        latents = batches.encode_images(job.pipe.vae, images, device).float()
        cond = batches.encode_prompts(job.pipe, [r["prompt"] for r in rows], device)
        noise = torch.randn(latents.shape, generator=gen).to(device) if noise is None else noise
        noisy = job.noise_scheduler.add_noise(latents, noise, t)
        with training.autocast(job):
            with torch.no_grad():
                ref = dpo.unet_call(job.ref_unet, noisy.to(job.ref_dtype), t,
                                    {k: v.to(job.ref_dtype) for k, v in cond.items()}, args.resolution)
            pred = dpo.unet_call(job.unet, noisy, t, {k: v.float() for k, v in cond.items()}, args.resolution)
        errors.append(dpo.per_sample_error(pred, noise) - dpo.per_sample_error(ref, noise))
    loss = -torch.nn.functional.logsigmoid(-0.5 * args.beta * (errors[0] - errors[1])).mean()
    job.accelerator.backward(loss)
    job.accelerator.clip_grad_norm_(job.unet.parameters(), args.max_grad_norm)
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)


def step_breakdown(job, step_fn, repeats):
    """Seconds per call of step_fn (04's train_step) spent in each part (forward hooks; the rest is
    backward, optimizer and reading images), and its total."""
    parts = {"text encoders": [job.pipe.text_encoder, getattr(job.pipe, "text_encoder_2", None)],
             "VAE encoding": [job.pipe.vae.encoder], "reference UNet": [job.ref_unet],
             "trained UNet forward": [job.accelerator.unwrap_model(job.unet)]}
    spent, started, handles = dict.fromkeys(parts, 0.0), {}, []

    def before(module, _):
        sync()
        started[module] = time.perf_counter()

    def after(module, _, __, name):
        sync()
        spent[name] += time.perf_counter() - started[module]
    for name, modules in parts.items():
        for module in filter(None, modules):
            handles += [module.register_forward_pre_hook(before),
                        module.register_forward_hook(lambda *hook_args, name=name: after(*hook_args, name))]
    total = timed(step_fn, repeats)
    for handle in handles:
        handle.remove()
    spent = {name: seconds / (repeats + 1) for name, seconds in spent.items()}  # the warm-up step counted too
    return dict(spent, **{"backward, optimizer, images": total - sum(spent.values())}), total


def inference_fns(pipe, scored, preset, device, dtype, gen_batch, reward_batch, n_images):
    """{"gen": (ours, naive), "reward": (ours, naive)}: functions returning the same outputs up to round-off.
    Generation: gen_batch images of a pipeline call (each its own seeded generator, as 01 draws them)
    vs one image per call, as latents. Self-reward of n_images latents with K = DRAWS draws shared by
    the images: the kit's self_rewards in calls of reward_batch vs one UNet call per image, draw and UNet
    (the prompt encoded for each)."""
    res = preset["resolution"]

    def gen(prompts, seeds):
        return pipe(prompt=prompts, generator=[torch.Generator().manual_seed(s) for s in seeds],
                    num_inference_steps=preset["steps"], guidance_scale=preset["cfg"], height=res, width=res,
                    output_type="latent").images
    size = res // pipe.vae_scale_factor
    lat = torch.randn(n_images, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    lat = lat.to(device, dtype)
    one = batches.encode_prompts(pipe, [PROMPT], device)
    noising = dpo.forward_process(pipe.scheduler)

    def reward_naive():
        t, noise = self_reward.reward_draws(DRAWS, lat.shape[1:], noising.config.num_train_timesteps,
                                            torch.Generator().manual_seed(0))
        rewards = torch.zeros(n_images, dtype=torch.float64)
        for i in range(n_images):
            for k in range(DRAWS):
                cond = batches.encode_prompts(pipe, [PROMPT], device)
                eps, tk = noise[k:k + 1].to(device, dtype), t[k:k + 1].to(device)
                x = noising.add_noise(lat[i:i + 1], eps, tk)
                target = dpo.prediction_target(noising, lat[i:i + 1], eps, tk)
                err, ref_err = (dpo.per_sample_error(dpo.unet_call(unet, x, tk, cond, res), target)
                                for unet in (scored, pipe.unet))
                rewards[i] += dpo.implicit_reward(err.double(), ref_err.double()).item() / DRAWS
        return rewards
    return {"gen": (lambda: gen([PROMPT] * gen_batch, range(gen_batch)),
                    lambda: torch.cat([gen([PROMPT], [i]) for i in range(gen_batch)])),
            "reward": (lambda: self_reward.self_rewards(scored, pipe.unet, pipe.scheduler, lat, one, res, DRAWS,
                                                        batch_size=reward_batch)[0], reward_naive)}
