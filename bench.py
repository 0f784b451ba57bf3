"""Speed of the kit's hot loops next to a straightforward implementation of the same work.

Prints, for one preset: DPO training pairs/s (ours: preferred and dispreferred halves in one
UNet batch, one reference pass, latents encoded once; naive: separate passes for w and l, the
reference run twice, VAE encoding every step), generation images/s (ours: batched prompts;
naive: one image per pipeline call) and self-reward rewards/s (ours: batched draws, text
encoded once per prompt; naive: one UNet call per image and draw), as ratios, with peak memory.

    python bench.py                       # tiny-sd15 on the CPU
    python bench.py --preset toy --steps 5
    python bench.py --preset sd15         # on a GPU, with the real weights (or $SAIL_SD15_PATH)

Timings are printed, never asserted; run on an otherwise idle machine.
"""
import argparse
import resource
import time

import torch

import sail_common as sc
from dpo_loss import dpo_loss, per_sample_error


def timed(fn, repeats):
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def peak_memory_mb():
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(args):
    device = sc.pick_device()
    preset = sc.get_preset(args.preset)
    desc = sc.describe_model(args.preset)
    dtype = sc.inference_dtype(device, preset["mixed_precision"])
    pipe = sc.load_pipeline(desc, device, dtype, sampler=preset["sampler"])
    res, pairs = preset["resolution"], args.pairs
    unet = sc.load_unet(desc, torch.float32).to(device).train()
    ref = pipe.unet.eval()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-9)
    pixels = torch.rand(2 * pairs, 3, res, res, device=device) * 2 - 1
    cond = sc.encode_prompts(pipe, ["a red square on the left"] * pairs, device)
    cond2 = {k: torch.cat([v, v]) for k, v in cond.items()}
    with torch.no_grad():
        cached = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
    t = torch.randint(0, 1000, (pairs,), device=device)
    noise = torch.randn_like(cached[:pairs])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def ours():
        x = pipe.scheduler.add_noise(cached.float(), noise.repeat(2, 1, 1, 1), t.repeat(2))
        with autocast:
            with torch.no_grad():
                ref_pred = sc.unet_call(ref, x.to(dtype), t.repeat(2), {k: v.to(dtype) for k, v in cond2.items()}, res)
            loss = dpo_loss(sc.unet_call(unet, x, t.repeat(2), cond2, res), ref_pred, noise.repeat(2, 1, 1, 1)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()

    def naive():
        with torch.no_grad():
            lat = pipe.vae.encode(pixels.to(pipe.vae.dtype)).latent_dist.sample() * pipe.vae.config.scaling_factor
        errs = []
        for half in (lat[:pairs], lat[pairs:]):
            x = pipe.scheduler.add_noise(half.float(), noise, t)
            with autocast:
                with torch.no_grad():
                    ref_err = per_sample_error(sc.unet_call(ref, x.to(dtype), t, {k: v.to(dtype) for k, v in cond.items()}, res), noise)
                errs.append((per_sample_error(sc.unet_call(unet, x, t, cond, res), noise), ref_err))
        inside = -2500.0 * ((errs[0][0] - errs[0][1]) - (errs[1][0] - errs[1][1]))
        (-torch.nn.functional.logsigmoid(inside).mean()).backward()
        opt.step()
        opt.zero_grad()

    rows = []
    train_ours, train_naive = timed(ours, args.steps), timed(naive, args.steps)
    rows.append(("DPO training", "pairs/s", pairs / train_ours, pairs / train_naive))

    n_img = args.images
    gen = lambda batch: pipe(prompt=["a red square on the left"] * batch, num_inference_steps=preset["steps"],
                             guidance_scale=preset["cfg"], height=res, width=res, output_type="latent")
    with torch.inference_mode():
        gen_ours = timed(lambda: gen(n_img), 1)
        gen_naive = timed(lambda: [gen(1) for _ in range(n_img)], 1)
    rows.append(("generation", "images/s", n_img / gen_ours, n_img / gen_naive))

    draws = 10
    lat = cached[:8]
    with torch.inference_mode():
        one = sc.encode_prompts(pipe, ["a red square on the left"], device)
        score_ours = timed(lambda: sc.self_rewards(pipe.unet, ref, pipe.scheduler, lat.to(dtype), one, res, draws,
                                                   batch_size=preset["reward_batch"]), 1)

        def score_naive():
            for i in range(lat.shape[0]):
                for k in range(draws):
                    c = sc.encode_prompts(pipe, ["a red square on the left"], device)
                    tk = torch.randint(0, 1000, (1,), device=device)
                    x = pipe.scheduler.add_noise(lat[i:i + 1].to(dtype), noise[:1].to(dtype), tk)
                    per_sample_error(sc.unet_call(pipe.unet, x, tk, c, res), noise[:1])
                    per_sample_error(sc.unet_call(ref, x, tk, c, res), noise[:1])
        score_naive_t = timed(score_naive, 1)
    rows.append(("self-reward (K=10)", "rewards/s", lat.shape[0] / score_ours, lat.shape[0] / score_naive_t))

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    print(f"preset {args.preset} on {name}; DPO batch {pairs} pairs, {n_img} images, 8 images x 10 draws")
    print(f"{'work':22s} {'unit':10s} {'ours':>10s} {'naive':>10s} {'ratio':>7s}")
    for work, unit, a, b in rows:
        print(f"{work:22s} {unit:10s} {a:10.2f} {b:10.2f} {a / b:6.2f}x")
    print(f"peak memory {peak_memory_mb():.0f} MiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny-sd15")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per training step")
    parser.add_argument("--images", type=int, default=16, help="images to generate")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    main(parser.parse_args())
