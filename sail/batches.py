"""The data path of training: a pair's two images loaded and transformed as DiffusionDPO's training
transform does (resize, crop, flip), prompts and images encoded (text encoders, VAE), and the cache of
latents for pairs seen again.
"""
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image

from sail import common
from sail.common import derive_seed
from sail.files import load_image


def load_pair_pixels(row, resolution, seed, random_crop, flip):
    """Both images of a pair, each transformed on its own as DiffusionDPO's training transform does
    (torchvision Resize on the short side, bilinear; CenterCrop or RandomCrop; RandomHorizontalFlip):
    images of one pair may differ in size and aspect ratio (Pick-a-Pic pairs come from different models)."""
    rng = random.Random(derive_seed(seed, "augment", row["_index"]))
    out = []
    for side in ("_image_w", "_image_l"):
        img = load_image(row[side], where=f"{row['_file']}:{row['_line']}")
        img = resize_short_side(img, resolution)
        w, h = img.size
        if random_crop:
            left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
        else:  # torchvision's CenterCrop rounds, it does not floor
            left, top = int(round((w - resolution) / 2.0)), int(round((h - resolution) / 2.0))
        img = img.crop((left, top, left + resolution, top + resolution))
        out.append(img.transpose(Image.FLIP_LEFT_RIGHT) if flip and rng.random() < 0.5 else img)
    return out


def resize_short_side(img, size):
    """torchvision's Resize(size) on a PIL image: short side to size, long side truncated, PIL bilinear
    (antialiased). Written out so the kit does not need torchvision for this one call."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BILINEAR)


@torch.no_grad()
def encode_prompts(pipe, prompts, device):
    """Text conditioning for a list of prompts, without guidance: a dict that unet_call takes."""
    if hasattr(pipe, "text_encoder_2"):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"embeds": embeds, "pooled": pooled}
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"embeds": embeds}


@torch.no_grad()
def encode_images(vae, images, device, sample_generator=None):
    """PIL images -> scaled VAE latents (the posterior mean, or a sample with a generator)."""
    # torchvision's ToTensor then Normalize(0.5, 0.5), as DiffusionDPO, to the last bit
    arr = np.stack([(np.asarray(img, dtype=np.float32) / 255.0 - 0.5) / 0.5 for img in images])
    pixels = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(device=device, dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latents = dist.sample(sample_generator) if sample_generator is not None else dist.mean
    return latents * vae.config.scaling_factor


class LatentCache:
    """VAE latents of the pairs this process will see again: at one epoch nothing is kept. A pair's
    latents are dropped after its last use, and none are added past max_bytes (those are encoded
    again when they come back)."""

    def __init__(self, future_uses, max_bytes):
        self.uses, self.max_bytes, self.store, self.nbytes = Counter(future_uses), max_bytes, {}, 0

    def get(self, index):
        return self.store.get(index)

    def used(self, index, latents):
        self.uses[index] -= 1
        if self.uses[index] <= 0:
            dropped = self.store.pop(index, None)
            self.nbytes -= 0 if dropped is None else dropped.nbytes
        elif index not in self.store and self.nbytes + latents.nbytes <= self.max_bytes:
            self.store[index] = latents.cpu()
            self.nbytes += latents.nbytes


def future_uses(order, start_step, total_steps, batch_size, rank, num_processes):
    """Pair indices this process trains on from start_step on, each as often as it comes."""
    return [i for step in range(start_step, total_steps)
            for i in order[step * batch_size:(step + 1) * batch_size][rank::num_processes]]


def pair_latents(job, rows):
    """VAE latents of the pairs' transformed images (job.latent_cache keeps those seen again):
    (2B, C, h, w), all preferred images first, then all dispreferred."""
    args, cache = job.args, job.latent_cache
    found = {r["_index"]: cache.get(r["_index"]) for r in rows}
    todo = [r for r in rows if found[r["_index"]] is None]
    if todo:
        images = [img for r in todo for img in load_pair_pixels(r, args.resolution, args.seed, args.random_crop, not args.no_flip)]
        gens = [torch.Generator().manual_seed(common.derive_seed(args.seed, "vae", r["_index"], side)) for r in todo for side in "wl"]
        lat = encode_images(job.pipe.vae, images, job.device, sample_generator=gens).to(job.frozen_dtype)
        for j, r in enumerate(todo):
            found[r["_index"]] = lat[2 * j:2 * j + 2]
    for r in rows:
        cache.used(r["_index"], found[r["_index"]])
    batch = torch.stack([found[r["_index"]].to(job.device) for r in rows])
    return torch.cat([batch[:, 0], batch[:, 1]]).float()
