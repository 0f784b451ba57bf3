"""The data path of training: a pair's two images loaded and transformed as DiffusionDPO's training
transform does (resize, crop, flip), read ahead of the step by DataLoader workers, prompts and images
encoded (text encoders, VAE), and the cache of latents for pairs seen again.
"""
import os
import random
from collections import Counter

import numpy as np
import torch
from PIL import Image

from sail import common
from sail.common import SailError, derive_seed
from sail.files import load_image

# The 256 values torchvision's ToTensor then Normalize(0.5, 0.5) give an 8-bit channel, as DiffusionDPO
# computes them (float32: divide by 255, then centre): looked up, they are the same bits on any device.
UNIT_RANGE = torch.from_numpy((np.arange(256, dtype=np.float32) / 255.0 - 0.5) / 0.5)


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


def image_stack(images):
    """PIL RGB images of one size -> uint8 tensor (N, H, W, 3)."""
    return torch.from_numpy(np.stack([np.asarray(img, dtype=np.uint8) for img in images]))


@torch.no_grad()
def encode_pixels(vae, pixels, device, sample_generator=None):
    """uint8 images (N, H, W, 3) -> scaled VAE latents (the posterior mean, or a sample with a generator)."""
    pixels = pixels.to(device, non_blocking=True).long()
    unit = UNIT_RANGE.to(device)[pixels].permute(0, 3, 1, 2).contiguous().to(vae.dtype)
    dist = vae.encode(unit).latent_dist
    latents = dist.sample(sample_generator) if sample_generator is not None else dist.mean
    return latents * vae.config.scaling_factor


def encode_images(vae, images, device, sample_generator=None):
    """PIL images -> scaled VAE latents (the posterior mean, or a sample with a generator)."""
    return encode_pixels(vae, image_stack(images), device, sample_generator)


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


def step_pairs(order, step, batch_size, rank, num_processes):
    """The pair indices process `rank` trains on in `step`: every num_processes-th of the step's pairs."""
    return order[step * batch_size:(step + 1) * batch_size][rank::num_processes]


def future_uses(order, start_step, total_steps, batch_size, rank, num_processes):
    """Pair indices this process trains on from start_step on, each as often as it comes."""
    return [i for step in range(start_step, total_steps) for i in step_pairs(order, step, batch_size, rank, num_processes)]


def micro_batches(order, step, batch_size, rank, num_processes, micro):
    """The pair indices of each micro batch this process trains on in `step`."""
    mine = step_pairs(order, step, batch_size, rank, num_processes)
    return [mine[m:m + micro] for m in range(0, len(mine), micro)]


class PairImages(torch.utils.data.Dataset):
    """The transformed images of the pairs a micro batch encodes, read in a loader's worker. A key
    (step, micro batch, pair indices) -> (key, uint8 images (2k, r, r, 3), each pair's preferred then
    dispreferred image, and None); a bad image file's SailError is returned in place of None, so that
    the training thread stops with the file's own message."""

    def __init__(self, pairs, resolution, seed, random_crop, flip):
        self.pairs, self.transform = pairs, (resolution, seed, random_crop, flip)

    def __getitem__(self, key):
        try:
            images = [img for i in key[2] for img in load_pair_pixels(self.pairs[i], *self.transform)]
        except SailError as err:
            return key, None, err
        return key, image_stack(images) if images else None, None


class PairsToRead:
    """The loader's sampler: the key of every micro batch from a step on, naming its pairs that are not in
    job.latent_cache when the key is drawn. Keys are drawn ahead of training, but a pair in the cache
    stays there until its last use, so the pairs read hold every pair the step encodes."""

    def __init__(self, plan, job):
        self.plan, self.job = plan, job

    def __iter__(self):
        for step, m, indices in self.plan:
            yield step, m, tuple(i for i in indices if self.job.latent_cache.get(i) is None)


def image_loader(job, start_step):
    """An iterator over the images of the micro batches from start_step on, in training order: with
    --num-workers N, N worker processes read ahead (two micro batches each); with 0, the training thread reads."""
    args, acc = job.args, job.accelerator
    plan = ((step, m, tuple(indices)) for step in range(start_step, job.total_steps)
            for m, indices in enumerate(micro_batches(job.order, step, args.batch_size, acc.process_index,
                                                      acc.num_processes, job.micro)))
    dataset = PairImages(job.pairs, args.resolution, args.seed, args.random_crop, not args.no_flip)
    workers = args.num_workers
    own = torch.Generator().manual_seed(derive_seed(args.seed, "loader"))  # the workers' seeds, so torch's global RNG stays
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=PairsToRead(plan, job), generator=own,
                                         num_workers=workers, prefetch_factor=2 if workers else None,
                                         pin_memory=job.device.type == "cuda")
    return iter(loader)


def default_workers(device, num_processes):
    """Loader workers when --num-workers is not given: none on the CPU, where the training thread's
    computation has every core already; on a GPU up to 4 per process, leaving a core to each process."""
    if device.type == "cpu":
        return 0
    return max(0, min(4, len(os.sched_getaffinity(0)) // max(1, num_processes) - 1))


def pair_latents(job, rows, loaded):
    """VAE latents of the pairs' transformed images (job.latent_cache keeps those seen again):
    (2B, C, h, w), all preferred images first, then all dispreferred. loaded: the loader's (pair indices,
    uint8 images) of this micro batch, which hold every pair that is not in the cache."""
    args, cache = job.args, job.latent_cache
    found = {r["_index"]: cache.get(r["_index"]) for r in rows}
    todo = [r for r in rows if found[r["_index"]] is None]
    if todo:
        gens = [torch.Generator().manual_seed(common.derive_seed(args.seed, "vae", r["_index"], side)) for r in todo for side in "wl"]
        lat = encode_pixels(job.pipe.vae, pixels_to_encode(job, todo, loaded), job.device, sample_generator=gens)
        lat = lat.to(job.frozen_dtype)
        for j, r in enumerate(todo):
            found[r["_index"]] = lat[2 * j:2 * j + 2]
    for r in rows:
        cache.used(r["_index"], found[r["_index"]])
    batch = torch.stack([found[r["_index"]].to(job.device) for r in rows])
    return torch.cat([batch[:, 0], batch[:, 1]]).float()


def pixels_to_encode(job, todo, loaded):
    """uint8 images of the pairs to encode, each pair's preferred then dispreferred image: the loader's,
    or read here where the loader skipped a pair (a latent cache replaced while it read ahead)."""
    indices, pixels = loaded
    at = {i: 2 * j for j, i in enumerate(indices)}  # a pair's first image among the loaded ones
    if all(r["_index"] in at for r in todo):
        picks = [at[r["_index"]] + side for r in todo for side in (0, 1)]
        return pixels if picks == list(range(len(pixels))) else pixels[picks]
    args = job.args
    return image_stack([img for r in todo for img in load_pair_pixels(r, args.resolution, args.seed, args.random_crop,
                                                                       not args.no_flip)])
