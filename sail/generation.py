"""Image generation: the kit's one generation loop (`draw_images`), which 01, 05, the labelling
page's candidates, validation during training and the toy share.
"""
import torch
from sail.common import progress


def draw_images(pipe, prompts, seeds, steps, cfg, resolution, batch_size, label="generate"):
    """The kit's one generation loop (01, 05 and the toy): one image per (prompt, seed), drawn in
    batches of batch_size; yields (index of the batch's first image, its PIL images). Each image has
    its own generator seeded with its seed, so it does not depend on which other images share its
    batch (up to round-off)."""
    bar = progress(total=len(prompts), desc=label)
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds[start:start + batch_size]]
        with torch.inference_mode():
            images = pipe(prompt=list(prompts[start:start + batch_size]), generator=generators, num_inference_steps=steps,
                          guidance_scale=cfg, height=resolution, width=resolution).images
        bar.update(len(images))
        yield start, images
    bar.close()
