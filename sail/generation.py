"""Image generation: the kit's one generation loop, which 01, 05, validation during training, the labelling
page's candidates and the toy share, and the rule by which a killed generation resumes.
"""
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


def draw_candidates(model, prompt_file, out, candidates, seed):
    """`candidates` images for every prompt of `prompt_file`, drawn by `model` (a preset, checkpoint or pipeline)
    into <out>/images/ with the preset's generation settings, then <out>/generations.jsonl: the files, seeds,
    settings record and resume of 01_generate.py, in one process. Finished (generations.jsonl there): nothing to do."""
    out = Path(out)
    finished = out / "generations.jsonl"
    if finished.is_file():
        log.info("%s exists; the candidates are drawn", finished)
        return
    desc = models.describe_model(model)
    preset = settings.get_preset(desc.preset or "sd15")
    prompts = files.read_prompts(prompt_file)
    jobs = [dict(prompt_id=row["prompt_id"], prompt=row["prompt"], index=k,
                 seed=common.derive_seed(seed, row["prompt_id"], k),
                 image=f"images/{files.image_name(row['prompt_id'], k)}") for row in prompts for k in range(candidates)]
    files.check_settings(out / "generate.settings.json", dict(
        model=models.model_setting(model, out), pool=files.relative_to(prompt_file, out), sampler=preset["sampler"],
        steps=preset["steps"], cfg=preset["cfg"], resolution=preset["resolution"],
        mixed_precision=preset["mixed_precision"], seed=seed),
        f"delete {out / 'images'} and {out / 'generate.settings.json'} to draw anew")
    (out / "images").mkdir(parents=True, exist_ok=True)
    batches = missing_batches(jobs, preset["gen_batch"], lambda job: out / job["image"])
    todo = sum(len(batch) for batch in batches)
    files.check_free_space(out, todo * preset["resolution"] ** 2 * 3 // 2, f"{todo} PNG images")  # PNG ~ half of raw
    log.info("%d prompts x %d candidates from %s: %d images to draw (%d there already) | %s %d steps cfg %g %dpx",
             len(prompts), candidates, model, todo, len(jobs) - todo, preset["sampler"], preset["steps"], preset["cfg"],
             preset["resolution"])
    if batches:
        device = models.pick_device()
        pipe = models.load_pipeline(desc, device, models.inference_dtype(device, preset["mixed_precision"]),
                                    sampler=preset["sampler"])
        start, made = time.time(), 0
        for batch, images in draw_batches(pipe, batches, preset["steps"], preset["cfg"], preset["resolution"]):
            for job, image in zip(batch, images):
                if not image_is_complete(out / job["image"]):  # its batch-mates made earlier stay as they are
                    files.save_image_atomic(image, out / job["image"])
                    made += 1
        files.save_timing(out, "generate", made, "images", time.time() - start)
    files.write_jsonl_atomic(finished, jobs)
    log.info("wrote %s (%d images)", finished, len(jobs))
