"""Image generation: the kit's one generation loop, which 01, 05, validation during training, the labelling
page's candidates and the toy share, and the rule by which a killed generation resumes.
"""
import argparse
import logging
import time
from pathlib import Path

import torch

from sail import common, files, models, settings
from sail.common import progress
from sail.files import image_is_complete

log = logging.getLogger("sail")


def draw_images(pipe, prompts, seeds, steps, cfg, resolution, batch_size, label="generate"):
    """One image per (prompt, seed), drawn in batches of batch_size; yields (index of the batch's first image,
    its PIL images). Each image has its own generator seeded with its seed, so it does not depend on which
    other images share its batch (up to round-off)."""
    bar = progress(total=len(prompts), desc=label)
    for start in range(0, len(prompts), batch_size):
        images = _draw(pipe, prompts[start:start + batch_size], seeds[start:start + batch_size], steps, cfg, resolution)
        bar.update(len(images))
        yield start, images
    bar.close()


def missing_batches(jobs, batch_size, path_of):
    """The batches an uninterrupted run cuts from `jobs` (in order, batch_size each) that still lack an image.
    A resumed run draws each image in the very batch it would have had: the CPU's kernels (AVX2 or AVX-512)
    and their round-off depend on the batch size, so a smaller batch could change a pixel by one grey level."""
    batches = [jobs[start:start + batch_size] for start in range(0, len(jobs), batch_size)]
    return [batch for batch in batches if not all(image_is_complete(path_of(job)) for job in batch)]


def draw_batches(pipe, batches, steps, cfg, resolution, label="generate"):
    """Draw each batch of jobs (dicts with "prompt" and "seed") in one pipeline call; yields (batch, PIL images)."""
    bar = progress(total=sum(len(batch) for batch in batches), desc=label)
    for batch in batches:
        images = _draw(pipe, [job["prompt"] for job in batch], [job["seed"] for job in batch], steps, cfg, resolution)
        bar.update(len(images))
        yield batch, images
    bar.close()


def _draw(pipe, prompts, seeds, steps, cfg, resolution):
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    with torch.inference_mode():
        return pipe(prompt=list(prompts), generator=generators, num_inference_steps=steps, guidance_scale=cfg,
                    height=resolution, width=resolution).images


def candidate_jobs(prompts, num_candidates, seed):
    """One row per image to draw: prompt_id, prompt, index, its own seed derive_seed(seed, prompt_id, index)
    and its file (images/<prompt_id>_<index>.png, relative to the folder), as generations.jsonl lists them."""
    return [dict(prompt_id=row["prompt_id"], prompt=row["prompt"], index=k,
                 seed=common.derive_seed(seed, row["prompt_id"], k),
                 image=f"images/{files.image_name(row['prompt_id'], k)}") for row in prompts for k in range(num_candidates)]


def check_generation_settings(args, out):
    """Record what decides the images in <out>/generate.settings.json, or stop when a rerun has other values."""
    files.check_settings(out / "generate.settings.json", dict(
        model=models.model_setting(args.ckpt, out), pool=files.relative_to(args.pool, out),
        **settings.record(args, "generate")), f"delete {out / 'images'} and {out / 'generate.settings.json'} to generate anew")


def draw_into(pipe, batches, out, args, label="generate"):
    """Draw the batches with the settled generation settings and save each image not complete yet into out;
    returns how many were saved (a batch-mate made by an earlier, killed run stays as it is)."""
    made = 0
    for batch, images in draw_batches(pipe, batches, args.steps, args.cfg, args.resolution, label):
        for job, image in zip(batch, images):
            if not image_is_complete(out / job["image"]):
                files.save_image_atomic(image, out / job["image"])
                made += 1
    return made


def draw_candidates(model, prompt_file, out, candidates, seed):
    """`candidates` images for every prompt of `prompt_file`, drawn by `model` (a preset, checkpoint or pipeline)
    into <out>/images/ with the preset's generation settings, then <out>/generations.jsonl: 01_generate.py's
    files, seeds, settings record and resume, in one process. Finished (generations.jsonl there): nothing to do."""
    out = Path(out)
    finished = out / "generations.jsonl"
    if finished.is_file():
        log.info("%s exists; the candidates are drawn", finished)
        return
    desc = models.describe_model(model)
    args = settings.add_arguments(argparse.ArgumentParser(), "generate").parse_args(
        ["--num-candidates", str(candidates), "--seed", str(seed)])
    args.ckpt, args.pool = model, prompt_file
    settings.settle(args, settings.get_preset(desc.preset or "sd15"), "generate")
    jobs = candidate_jobs(files.read_prompts(prompt_file), candidates, seed)
    check_generation_settings(args, out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    batches = missing_batches(jobs, args.gen_batch, lambda job: out / job["image"])
    log.info("%d candidates from %s: %d images in batches to draw (%d there already)", len(jobs), model,
             sum(map(len, batches)), len(jobs) - sum(map(len, batches)))
    if batches:
        device = models.pick_device()
        pipe = models.load_pipeline(desc, device, models.inference_dtype(device, args.mixed_precision), sampler=args.sampler)
        start, made = time.time(), draw_into(pipe, batches, out, args)
        files.save_timing(out, "generate", made, "images", time.time() - start)
    files.write_jsonl_atomic(finished, jobs)
    log.info("wrote %s (%d images)", finished, len(jobs))
