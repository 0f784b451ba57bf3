"""Image generation: the kit's one generation loop, which 01, 05, validation during training, the labelling
page's candidates and the toy share, and the rule by which a killed generation resumes.
"""
import torch

from sail.common import progress
from sail.files import image_is_complete


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
