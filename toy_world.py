"""The toy world: a CPU-sized stand-in for SD1.5 + Pick-a-Pic + human raters, so the whole SAIL
loop runs end to end in minutes on a laptop, with a hidden "human" to tell whether it worked.

- The world: 32x32 pictures of one coloured shape ("a small red circle at the top left"; 8 colours,
  4 shapes, 3 sizes, 9 positions = 864 captions), drawn by a procedural renderer. The pretraining
  pictures are drawn like web images: often blurred, noisy, speckled, off-colour or miscaptioned.
- The toy base model (toy_base.py): the real architectures (AutoencoderKL with 4x downsampling,
  32x32x3 pixels to 8x8x4 latents; CLIPTextModel with a CLIPTokenizer that has one token per word
  of the world; UNet2DConditionModel; DDIMScheduler), pretrained for a few minutes on that world,
  deterministically, and cached. Brief pretraining on messy data leaves it imperfect, as a base
  model should be: it often ignores parts of the caption and draws poorly.
- The hidden human: oracle_score(prompt, image), pure numpy on pixels, half prompt following
  (colour, shape, position, size as the caption says) and half taste (a clean render: sharp edges,
  plain background, no specks, a well drawn shape). The loop never sees it; it labels the human
  seed pairs (ties dropped) and scores the evaluation.

Commands:
    python toy_world.py data --run runs/toy [--preset toy] [--seed 0] [--pool-size 64] [--all-labels]
    python toy_world.py report --run runs/toy [--images-per-prompt 4]

The toy base model is built by `python toy_base.py` (run_all.sh does it first). `data` reads the
preset's base model and writes runs/<run>/seed/pairs.jsonl + seed/images/ + seed/stats.json, pools/iter_01.jsonl ...,
eval/prompts.jsonl (and seed/all_pairs.jsonl with --all-labels), toy_world.data.json (the
settings; a rerun with other settings is refused), toy_world.data.args.json and log.txt.
`report` reads the run's checkpoints (iter_XX/ckpt) and iter_XX/pairs.jsonl, caches its images
and scores under eval/oracle/<name>/, prints one line per model and writes eval/oracle_report.json.
"""
import argparse
import itertools
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sail_common as sc
from sail_common import SailError

log = logging.getLogger("sail")

# ---------------------------------------------------------------- the world
RES = 32
BACKGROUND = np.array([236.0, 236.0, 230.0])
COLOURS = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 205, 20), "green": (35, 160, 55),
           "cyan": (25, 190, 205), "blue": (35, 65, 215), "purple": (135, 45, 185), "black": (30, 30, 30)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 4.0, "medium": 6.5, "large": 9.0}  # half the side of the shape's bounding box, in pixels
POSITIONS = {"top left": (10, 10), "top": (16, 10), "top right": (22, 10), "left": (10, 16), "center": (16, 16),
             "right": (22, 16), "bottom left": (10, 22), "bottom": (16, 22), "bottom right": (22, 22)}
PLACE = {"top left": "at the top left", "top": "at the top", "top right": "at the top right", "left": "on the left",
         "center": "in the center", "right": "on the right", "bottom left": "at the bottom left",
         "bottom": "at the bottom", "bottom right": "at the bottom right"}
PHRASE_TO_POSITION = {v: k for k, v in PLACE.items()}
SUPER = 4  # supersampling factor of the renderer (anti-aliased edges)


def caption(size, colour, shape, position):
    return f"a {size} {colour} {shape} {PLACE[position]}"


def all_captions():
    """The 864 captions of the world, in a fixed order."""
    return [caption(z, c, s, p) for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)]


def parse_caption(prompt):
    """'a small red circle at the top left' -> dict(size, colour, shape, position); missing parts are None."""
    words = prompt.lower().replace(",", " ").split()
    text = " ".join(words)
    found = dict(size=None, colour=None, shape=None, position=None)
    for w in words:
        if w in SIZES:
            found["size"] = w
        elif w in COLOURS:
            found["colour"] = w
        elif w in SHAPES:
            found["shape"] = w
    for phrase in sorted(PHRASE_TO_POSITION, key=len, reverse=True):
        if phrase in text:
            found["position"] = PHRASE_TO_POSITION[phrase]
            break
    return found


def shape_coverage(shape, cx, cy, r, res=RES):
    """Anti-aliased coverage in [0, 1] of a shape whose bounding box is centred at (cx, cy) with
    half side r (pixel units, the image spans [0, res])."""
    g = (np.arange(res * SUPER) + 0.5) / SUPER
    x, y = g[None, :], g[:, None]
    dx, dy = x - cx, y - cy
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "triangle":  # apex up, base at the bottom of the box
        inside = (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    elif shape == "cross":
        arm = r / 3
        inside = ((np.abs(dx) <= r) & (np.abs(dy) <= arm)) | ((np.abs(dx) <= arm) & (np.abs(dy) <= r))
    else:
        raise ValueError(f"unknown shape {shape}")
    return inside.reshape(res, SUPER, res, SUPER).mean(axis=(1, 3))


def render_clean(shape, colour_rgb, cx, cy, r, background=BACKGROUND):
    """The ideal picture: one flat shape with anti-aliased edges on a plain background, float (32, 32, 3)."""
    alpha = shape_coverage(shape, cx, cy, r)[..., None]
    return background * (1 - alpha) + np.asarray(colour_rgb, dtype=np.float64) * alpha


def _blur(img, sigma):
    k = int(math.ceil(2.5 * sigma))
    w = np.exp(-0.5 * (np.arange(-k, k + 1) / sigma) ** 2)
    w /= w.sum()
    pad = np.pad(img, ((k, k), (k, k), (0, 0)), mode="edge")
    out = sum(w[i] * pad[i:i + RES, k:k + RES] for i in range(2 * k + 1))
    pad = np.pad(out, ((0, 0), (k, k), (0, 0)), mode="edge")
    return sum(w[i] * pad[:, i:i + RES] for i in range(2 * k + 1))


def render_web(rng, attrs=None):
    """A pretraining picture as the web would have it: the true attributes, a caption that is
    usually right but sometimes incomplete or wrong, and a render with random defects.
    Returns (uint8 image (32, 32, 3), caption)."""
    a = attrs or dict(colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), size=rng.choice(list(SIZES)),
                      position=rng.choice(list(POSITIONS)))
    cx, cy = POSITIONS[a["position"]]
    cx, cy = cx + rng.normal(0, 1.0), cy + rng.normal(0, 1.0)
    r = SIZES[a["size"]] * math.exp(rng.normal(0, 0.08))
    colour = np.clip(np.array(COLOURS[a["colour"]], float) + rng.normal(0, 12, 3), 0, 255)
    background = BACKGROUND.copy()
    if rng.random() < 0.25:  # off-colour object
        colour = np.clip(colour + rng.normal(0, 45, 3), 0, 255)
    if rng.random() < 0.25:  # tinted background
        background = np.clip(background + rng.normal(0, 30, 3), 0, 255)
    img = render_clean(a["shape"], colour, cx, cy, r, background)
    if rng.random() < 0.2:  # a second, smaller stray blob
        img = _add_blob(rng, img)
    if rng.random() < 0.3:
        img = _blur(img, rng.uniform(0.6, 1.4))
    if rng.random() < 0.3:  # specks
        for _ in range(rng.integers(1, 7)):
            y, x = rng.integers(0, RES, 2)
            img[y, x] = rng.uniform(0, 255, 3)
    if rng.random() < 0.3:  # sensor noise
        img = img + rng.normal(0, rng.uniform(6, 22), img.shape)
    words = dict(a)
    u = rng.random()
    if u < 0.15:  # a wrong attribute in the caption
        key = rng.choice(["colour", "shape", "size", "position"])
        choices = {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "position": list(POSITIONS)}[key]
        words[key] = rng.choice([c for c in choices if c != a[key]])
    text = caption(words["size"], words["colour"], words["shape"], words["position"])
    if u > 0.75:  # an incomplete caption, like most alt texts
        drop = rng.choice(["size", "position", "both"])
        text = f"a {words['colour']} {words['shape']}"
        if drop == "size":
            text += f" {PLACE[words['position']]}"
        elif drop == "position":
            text = f"a {words['size']} {words['colour']} {words['shape']}"
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), text


def _add_blob(rng, img):
    shape = rng.choice(SHAPES)
    colour = rng.uniform(0, 255, 3)
    cx, cy = rng.uniform(3, RES - 3, 2)
    alpha = shape_coverage(shape, cx, cy, rng.uniform(1.0, 2.5))[..., None]
    return img * (1 - alpha) + colour * alpha


# ---------------------------------------------------------------- the hidden human
ORACLE_PROMPT_WEIGHT = 0.5


def _largest_component(mask):
    """Boolean mask of the largest 4-connected component (numpy flood fill, 32x32 is small)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        current += 1
        stack, size = [(y0, x0)], 0
        labels[y0, x0] = current
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return labels == best if best else np.zeros_like(mask)


def _dilate(mask):
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _as_array(image):
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (RES, RES):
            image = image.resize((RES, RES), Image.BILINEAR)
    return np.asarray(image, dtype=np.float64)[..., :3]


def oracle_details(prompt, image):
    """What the hidden human sees: the object it finds (colour, shape, position, size), how well
    each matches the caption (each in [0, 1]), the taste score, and the total."""
    img = _as_array(image)
    want = parse_caption(prompt)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    comp = _largest_component(dist > 60)
    out = dict(found=bool(comp.sum() >= 3))
    if not out["found"]:
        out.update(colour=0.0, shape=0.0, position=0.0, size=0.0, prompt=0.0, taste=0.0, score=0.0)
        return out
    else:
        core = comp & (dist >= 0.7 * dist[comp].max())
        colour = img[core].mean(axis=0)
        # alpha of every pixel along the background -> object colour line, then the object's mask
        axis = colour - bg
        alpha = np.clip(((img - bg) @ axis) / max(axis @ axis, 1e-6), 0, 1)
        mask = _largest_component((alpha > 0.5) & (dist > 30)) | core
        # sub-pixel bounding box from the anti-aliased coverage next to the object
        near = _dilate(mask) & (alpha > 0.05)
        cover = np.where(near, alpha, 0.0)
        edges = []
        for prof in (cover.max(axis=0), cover.max(axis=1)):
            idx = np.nonzero(prof)[0]
            edges.append((idx[0] + 1 - prof[idx[0]], idx[-1] + prof[idx[-1]]))
        (x0, x1), (y0, y1) = edges
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = max((x1 - x0 + y1 - y0) / 4, 0.5)
        ious = {}
        for s in SHAPES:  # soft IoU between the coverage and each shape drawn in the same box
            t = shape_coverage(s, cx, cy, r)
            ious[s] = np.minimum(t, cover).sum() / max(np.maximum(t, cover).sum(), 1e-6)
        drawn = max(ious, key=ious.get)
        ideal = render_clean(drawn, colour, cx, cy, r)
        names = list(COLOURS)
        out.update(found_colour=names[int(np.argmin([np.linalg.norm(colour - COLOURS[c]) for c in names]))],
                   found_shape=drawn, found_xy=(float(cx), float(cy)), found_r=float(r))
        scores = {}
        if want["colour"]:
            scores["colour"] = math.exp(-(np.linalg.norm(colour - COLOURS[want["colour"]]) / 60) ** 2)
        if want["shape"]:
            z = np.array([ious[s] for s in SHAPES]) * 15
            scores["shape"] = float(np.exp(z[SHAPES.index(want["shape"])] - z.max()) / np.exp(z - z.max()).sum())
        if want["position"]:
            tx, ty = POSITIONS[want["position"]]
            scores["position"] = math.exp(-((cx - tx) ** 2 + (cy - ty) ** 2) / 16)
        if want["size"]:
            scores["size"] = math.exp(-((r - SIZES[want["size"]]) / 1.5) ** 2)
        out.update(scores)
        out["prompt"] = float(np.mean(list(scores.values()))) if scores else 1.0
    # taste: how far the picture is from the clean render of what it shows, on the plain background
    err = np.abs(img - ideal).mean() / 255
    out["taste"] = math.exp(-err / 0.04)
    w = ORACLE_PROMPT_WEIGHT
    out["score"] = float(w * out["prompt"] + (1 - w) * out["taste"])
    return out


def oracle_score(prompt, image):
    """The hidden human's score of an image for a prompt, in [0, 1]; deterministic, numpy only."""
    return oracle_details(prompt, image)["score"]


def oracle_prefers(prompt, img_a, img_b, tie_margin=0.02):
    """0 if the human prefers img_a, 1 if img_b, None for a tie (scores closer than tie_margin)."""
    a, b = oracle_score(prompt, img_a), oracle_score(prompt, img_b)
    if abs(a - b) < tie_margin:
        return None
    return 0 if a > b else 1


@torch.no_grad()
def generate(pipe, prompts, seeds, steps, cfg, resolution=RES, batch_size=64):
    """One image per (prompt, seed): the seed fixes the starting noise, so the same seed gives the
    same picture whatever the batch it lands in. DDIM with eta 0 draws nothing else."""
    images = []
    for start in range(0, len(prompts), batch_size):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        out = pipe(list(prompts[start:start + batch_size]), num_inference_steps=steps, guidance_scale=cfg,
                   generator=gens, height=resolution, width=resolution, output_type="pil")
        images.extend(out.images)
    return images


def attribute_rates(details, prompts):
    """How often the drawn object has the caption's colour, shape, size and position."""
    hits = {k: [] for k in ("colour", "shape", "size", "position")}
    for d, p in zip(details, prompts):
        want = parse_caption(p)
        got = dict(colour=d.get("found_colour"), shape=d.get("found_shape"))
        if d.get("found"):
            cx, cy = d["found_xy"]
            got["position"] = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)
            got["size"] = min(SIZES, key=lambda k: abs(SIZES[k] - d["found_r"]))
        for k in hits:
            if want[k]:
                hits[k].append(got.get(k) == want[k])
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


# ---------------------------------------------------------------- the run's data
def split_prompts(seed, n_pools, pool_size, n_eval, n_universe=None):
    """Disjoint prompt sets from the world's captions: eval, one pool per iteration, and the
    labelled universe (the prompts that human pairs exist for), in a seeded shuffle."""
    caps = all_captions()
    order = np.random.default_rng(derive_split_seed(seed)).permutation(len(caps))
    need = n_eval + n_pools * pool_size
    if need >= len(caps):
        raise SailError(f"{n_eval} eval prompts + {n_pools} pools x {pool_size} leave no prompts for the human "
                        f"pairs: the world has {len(caps)} captions")
    rows = [dict(prompt_id=f"toy{i:03d}", prompt=caps[i]) for i in order]
    evals, rest = rows[:n_eval], rows[n_eval:]
    pools = [rest[k * pool_size:(k + 1) * pool_size] for k in range(n_pools)]
    universe = rest[n_pools * pool_size:]
    return evals, pools, universe[:n_universe] if n_universe else universe


def derive_split_seed(seed):
    return sc.derive_seed(seed, "toy-split") % 2**32


def _label_pairs(slots, images, tie_margin):
    """Oracle labels for (row, j) slots whose two images are images[(pid, j, 'a'|'b')]; ties dropped."""
    pairs, ties = [], 0
    for row, j in slots:
        img_a, img_b = images[(row["prompt_id"], j, "a")], images[(row["prompt_id"], j, "b")]
        choice = oracle_prefers(row["prompt"], img_a[1], img_b[1], tie_margin)
        if choice is None:
            ties += 1
            continue
        w, l = (img_a, img_b) if choice == 0 else (img_b, img_a)
        pairs.append(dict(prompt=row["prompt"], image_w=w[0], image_l=l[0], source="human", prompt_id=row["prompt_id"]))
    return pairs, ties


def _images_for(pipe, preset, slots, folder, seed, batch_size):
    """Generate (or find on disk) the two images of each slot; returns {(pid, j, side): (relpath, PIL)}."""
    folder.mkdir(parents=True, exist_ok=True)
    todo, out = [], {}
    for row, j in slots:
        for side in ("a", "b"):
            name = f"{row['prompt_id']}_{j:02d}{side}.png"
            key = (row["prompt_id"], j, side)
            if sc.image_is_complete(folder / name):
                out[key] = (f"images/{name}", sc.load_image(folder / name))
            else:
                todo.append((key, name, row["prompt"], sc.derive_seed(seed, "human-pairs", row["prompt_id"], j, side)))
    bar = sc.progress(total=len(todo), desc="human pair images")
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = generate(pipe, [c[2] for c in chunk], [c[3] for c in chunk], preset["steps"], preset["cfg"],
                          preset["resolution"], batch_size)
        for (key, name, _, _), img in zip(chunk, images):
            sc.save_image_atomic(img, folder / name)
            out[key] = (f"images/{name}", img)
        bar.update(len(chunk))
        if start == 0 or (start // batch_size) % 5 == 4:
            log.info("human pair images: %d/%d", start + len(chunk), len(todo))
    bar.close()
    return out


def make_run_data(run_dir, preset="toy", seed=0, n_pools=3, pool_size=64, n_eval=64, seed_fraction=0.06,
                  pairs_per_prompt=14, n_universe=None, tie_margin=0.02, all_labels=False, batch_size=64,
                  device=None):
    """Write a run's data: the human seed pairs (images drawn by the preset's base model, labelled
    by the oracle, ties dropped), one prompt pool per iteration and the evaluation prompts, all
    prompt sets disjoint. The labelled universe is pairs_per_prompt pairs for each universe prompt;
    the seed is a random seed_fraction of its pair slots. Files that exist are kept. Returns stats."""
    run_dir = Path(run_dir)
    settings = dict(preset=preset, seed=seed, n_pools=n_pools, pool_size=pool_size, n_eval=n_eval,
                    seed_fraction=seed_fraction, pairs_per_prompt=pairs_per_prompt, n_universe=n_universe,
                    tie_margin=tie_margin)
    made = run_dir / "toy_world.data.json"
    if made.is_file():
        before = json.loads(made.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SailError(f"{run_dir} holds data made with other settings ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                            f"use a new --run folder or the same settings")
    cfg = sc.get_preset(preset)
    evals, pools, universe = split_prompts(seed, n_pools, pool_size, n_eval, n_universe)
    sc.write_json_atomic(made, settings)
    for k, pool in enumerate(pools, 1):
        path = sc.pool_path(run_dir, k)
        if not path.is_file():
            sc.write_jsonl_atomic(path, pool)
    if not (run_dir / "eval" / "prompts.jsonl").is_file():
        sc.write_jsonl_atomic(run_dir / "eval" / "prompts.jsonl", evals)
    slots = [(row, j) for row in universe for j in range(pairs_per_prompt)]
    rng = np.random.default_rng(sc.derive_seed(seed, "toy-seed-pairs") % 2**32)
    n_seed = max(1, round(seed_fraction * len(slots)))
    seed_slots = [slots[i] for i in sorted(rng.choice(len(slots), n_seed, replace=False))]
    stats = dict(universe_prompts=len(universe), universe_slots=len(slots), seed_slots=n_seed)
    seed_dir = run_dir / "seed"
    wanted = [(seed_dir / "pairs.jsonl", seed_slots)] + ([(seed_dir / "all_pairs.jsonl", slots)] if all_labels else [])
    pipe = None
    for path, chosen in wanted:
        if path.is_file():
            log.info("%s exists; kept", path)
            continue
        if pipe is None:
            device = sc.pick_device(device)
            pipe = sc.load_pipeline(sc.describe_model(preset), device, sc.inference_dtype(device, cfg["mixed_precision"]),
                                    sampler=cfg["sampler"])
        with sc.folder_lock(seed_dir, "toy_world data"):
            images = _images_for(pipe, cfg, chosen, seed_dir / "images", seed, batch_size)
            pairs, ties = _label_pairs(chosen, images, tie_margin)
            if not pairs:
                raise SailError(f"every one of the {len(chosen)} pairs for {path} is a tie (tie margin {tie_margin})")
            sc.write_jsonl_atomic(path, pairs)
        stats[path.stem] = dict(slots=len(chosen), pairs=len(pairs), ties=ties, tie_rate=round(ties / len(chosen), 4))
        log.info("%s: %d pairs from %d slots (%.1f%% ties dropped)", path, len(pairs), len(chosen), 100 * ties / len(chosen))
    stats_path = seed_dir / "stats.json"
    if len(stats) > 3 or not stats_path.is_file():
        old = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        sc.write_json_atomic(stats_path, {**old, **stats})
    sc.check_pools_disjoint(run_dir)
    return stats


# ---------------------------------------------------------------- scoring checkpoints with the oracle
def _checkpoint_name(run_dir, ckpt):
    if str(ckpt) == "base":
        return "base"
    path = Path(ckpt).resolve()
    if path.name == "ckpt" and path.parent.parent == Path(run_dir).resolve():
        return path.parent.name  # runs/<run>/iter_01/ckpt -> iter_01
    return path.name


def _run_preset(run_dir):
    made = Path(run_dir) / "toy_world.data.json"
    return json.loads(made.read_text()).get("preset", "toy") if made.is_file() else "toy"


def _score_one(run_dir, name, ckpt, prompts, n_images_per_prompt, seed, preset, device, batch_size):
    """Images and oracle scores of one model on the eval prompts, cached under eval/oracle/<name>/."""
    folder = Path(run_dir) / "eval" / "oracle" / name
    model = "base" if str(ckpt) == "base" else str(Path(ckpt).resolve())
    meta = dict(model=model, preset=preset, n_images_per_prompt=n_images_per_prompt, seed=seed,
                prompts=sc.derive_seed(*[r["prompt_id"] + r["prompt"] for r in prompts]))
    scores_path = folder / "scores.jsonl"
    if scores_path.is_file() and (folder / "meta.json").is_file():
        if json.loads((folder / "meta.json").read_text()) == meta:
            return sc.read_jsonl(scores_path)
        log.info("%s was scored with other settings; scoring it again", folder)
        shutil.rmtree(folder)
    cfg = sc.get_preset(preset)
    desc = sc.describe_model(preset if model == "base" else model)
    device = sc.pick_device(device)
    pipe = sc.load_pipeline(desc, device, sc.inference_dtype(device, cfg["mixed_precision"]), sampler=cfg["sampler"])
    jobs = [(r, i, sc.derive_seed(seed, "toy-eval", r["prompt_id"], i)) for r in prompts for i in range(n_images_per_prompt)]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = []
    for start in sc.progress(range(0, len(jobs), batch_size), desc=f"oracle {name}"):
        chunk = jobs[start:start + batch_size]
        images = generate(pipe, [r["prompt"] for r, _, _ in chunk], [s for _, _, s in chunk], cfg["steps"], cfg["cfg"],
                          cfg["resolution"], batch_size)
        for (r, i, s), img in zip(chunk, images):
            rel = f"images/{r['prompt_id']}_{i}.png"
            img.save(tmp / rel)
            d = oracle_details(r["prompt"], img)
            rows.append(dict(prompt_id=r["prompt_id"], prompt=r["prompt"], index=i, seed=s, image=rel, score=d["score"],
                             prompt_score=d["prompt"], taste=d["taste"], follows=attribute_rates([d], [r["prompt"]])))
    sc.write_jsonl_atomic(tmp / "scores.jsonl", rows)
    sc.write_json_atomic(tmp / "meta.json", meta)
    os.replace(tmp, folder)
    return sc.read_jsonl(folder / "scores.jsonl")


def score_checkpoints(run_dir, ckpts, n_images_per_prompt=4, seed=0, preset=None, device=None, batch_size=64):
    """Oracle score of each model ("base" or a checkpoint folder) on run_dir/eval/prompts.jsonl, with
    the same seeds for every model, and its win rate against the base on those seeds. Returns
    {name: dict(mean, se, n, prompt, taste, follows, win_rate, delta, delta_se)}; name is "base",
    iter_XX for runs/<run>/iter_XX/ckpt, else the folder's name. Cached under eval/oracle/<name>/."""
    run_dir = Path(run_dir)
    prompts = [sc.strip_private(r) for r in sc.read_prompts(run_dir / "eval" / "prompts.jsonl")]
    preset = preset or _run_preset(run_dir)
    todo = {}
    for ckpt in ["base"] + [c for c in ckpts if str(c) != "base"]:
        todo[_checkpoint_name(run_dir, ckpt)] = ckpt
    results, base_scores = {}, None
    for name, ckpt in todo.items():
        rows = _score_one(run_dir, name, ckpt, prompts, n_images_per_prompt, seed, preset, device, batch_size)
        scores = {(r["prompt_id"], r["index"]): r["score"] for r in rows}
        s = np.array(list(scores.values()))
        res = dict(mean=float(s.mean()), se=float(s.std(ddof=1) / math.sqrt(len(s))) if len(s) > 1 else 0.0, n=len(s),
                   prompt=float(np.mean([r["prompt_score"] for r in rows])), taste=float(np.mean([r["taste"] for r in rows])),
                   follows={k: float(np.nanmean([r["follows"][k] for r in rows])) for k in rows[0]["follows"]})
        if base_scores is None:
            base_scores = scores
        else:
            diff = np.array([scores[k] - base_scores[k] for k in scores])
            res.update(win_rate=float(np.mean((diff > 0) + 0.5 * (diff == 0))), delta=float(diff.mean()),
                       delta_se=float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0)
        results[name] = res
    wanted = {_checkpoint_name(run_dir, c) for c in ckpts}
    return {k: v for k, v in results.items() if k in wanted}


def self_reward_agreement(iter_dir):
    """Share of the self-labelled pairs in iter_dir/pairs.jsonl whose image_w the oracle scores higher."""
    pairs = sc.read_pairs(Path(iter_dir) / "pairs.jsonl")
    agree = [oracle_score(p["prompt"], sc.load_image(p["_image_w"])) > oracle_score(p["prompt"], sc.load_image(p["_image_l"]))
             for p in pairs]
    return float(np.mean(agree))


def report(run_dir, n_images_per_prompt=4, seed=0, device=None):
    """Score base and every finished checkpoint of the run (iter_*/ckpt, then any other */ckpt such
    as the study's ablations); print a table; write eval/oracle_report.json."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("*/ckpt"), key=lambda p: (sc.iteration_number(p.parent.name) is None, p.parent.name))
    ckpts = ["base"] + [p for p in found if (p / "sail.json").is_file()]
    with sc.folder_lock(run_dir / "eval", "toy_world report"):
        results = score_checkpoints(run_dir, ckpts, n_images_per_prompt, seed, device=device)
    for name, res in results.items():
        pairs = run_dir / name / "pairs.jsonl"
        if name != "base" and pairs.is_file():  # self-labelled pairs: SAIL iterations and pairing ablations
            res["self_reward_agreement"] = self_reward_agreement(run_dir / name)
    lines = [f"oracle report: {run_dir}  ({next(iter(results.values()))['n']} eval images per model, same seeds)"]
    width = max(8, *map(len, results))
    for name, res in results.items():
        line = f"{name:{width}s} oracle {res['mean']:.3f} ± {res['se']:.3f}"
        if "win_rate" in res:
            line += f"   vs base {res['delta']:+.3f} ± {res['delta_se']:.3f}, win rate {res['win_rate']:.2f}"
        else:
            line += " " * 43
        f = res["follows"]
        line += f"   follows colour {f['colour']:.2f} shape {f['shape']:.2f} size {f['size']:.2f} position {f['position']:.2f}"
        line += f"   taste {res['taste']:.3f}"
        if "self_reward_agreement" in res:
            line += f"   self-reward agrees with oracle {res['self_reward_agreement']:.2f}"
        lines.append(line)
    print("\n".join(lines))
    sc.write_json_atomic(run_dir / "eval" / "oracle_report.json", results)
    return results


# ---------------------------------------------------------------- command line
def main(args):
    run_dir = Path(args.run)
    sc.setup_logging(run_dir, f"toy_world {args.command}")
    sc.save_args(run_dir, f"toy_world.{args.command}", args)
    if args.command == "data":
        stats = make_run_data(run_dir, preset=args.preset, seed=args.seed, n_pools=args.n_pools, pool_size=args.pool_size,
                              n_eval=args.n_eval, seed_fraction=args.seed_fraction, pairs_per_prompt=args.pairs_per_prompt,
                              n_universe=args.n_universe, tie_margin=args.tie_margin, all_labels=args.all_labels,
                              device=args.device)
        log.info("data ready in %s: %s", run_dir, json.dumps(stats))
    else:
        if not (run_dir / "eval" / "prompts.jsonl").is_file():
            raise SailError(f"{run_dir / 'eval' / 'prompts.jsonl'}: file not found (run `python toy_world.py data --run {run_dir}` first)")
        report(run_dir, args.images_per_prompt, args.eval_seed, args.device)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the human seed pairs, prompt pools and eval prompts of a run")
    data.add_argument("--run", required=True, help="run folder, e.g. runs/toy")
    data.add_argument("--preset", default="toy", help="model that draws the seed pair images (toy, tiny-sd15, tiny-sdxl)")
    data.add_argument("--seed", type=int, default=0, help="seed of the prompt split, the seed pairs and their images")
    data.add_argument("--n-pools", type=int, default=3, help="number of SAIL iterations to make prompt pools for")
    data.add_argument("--pool-size", type=int, default=64, help="prompts per pool")
    data.add_argument("--n-eval", type=int, default=64, help="evaluation prompts")
    data.add_argument("--seed-fraction", type=float, default=0.06, help="share of the labelled pairs given as the human seed")
    data.add_argument("--pairs-per-prompt", type=int, default=14, help="labelled pairs per universe prompt")
    data.add_argument("--n-universe", type=int, default=None, help="universe prompts (default: all that are left)")
    data.add_argument("--tie-margin", type=float, default=0.02, help="oracle score gap below which a pair is a tie")
    data.add_argument("--all-labels", action="store_true", help="also label the whole universe: seed/all_pairs.jsonl")
    data.add_argument("--device", default=None)
    rep = sub.add_parser("report", help="oracle score of base and every checkpoint of a run")
    rep.add_argument("--run", required=True)
    rep.add_argument("--images-per-prompt", type=int, default=4)
    rep.add_argument("--eval-seed", type=int, default=0)
    rep.add_argument("--device", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sc.run_stage(main, parse_args())
