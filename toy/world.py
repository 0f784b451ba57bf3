"""The toy world: a CPU-sized stand-in for SD1.5 + Pick-a-Pic + human raters, so the whole SAIL
loop runs end to end on a laptop CPU, with a hidden "human" to tell whether it worked.
This file is the world alone (numpy): its pictures and its hidden human. `toy/data.py` writes a run's
data from it and reports the oracle's scores; `toy/base.py` pretrains the toy base model on it.

- The world: 32x32 pictures of one coloured shape ("a small red circle at the top left"; 8 colours,
  4 shapes, 3 sizes, 9 positions = 864 captions), drawn by a procedural renderer. The pretraining
  pictures are drawn like web images: often blurred, noisy, speckled, off-colour or miscaptioned.
- The toy base model (toy/base.py): the real architectures (AutoencoderKL with 4x downsampling,
  32x32x3 pixels to 8x8x4 latents; CLIPTextModel with a CLIPTokenizer that has one token per word
  of the world; UNet2DConditionModel; DDIMScheduler), briefly pretrained on that world,
  deterministically, and cached. Brief pretraining on messy data leaves it imperfect, as a base
  model should be: it often ignores parts of the caption and draws poorly.
- The hidden human: oracle_score(prompt, image), pure numpy on pixels, half prompt following
  (colour, shape, position, size as the caption says) and half taste (a clean render: sharp edges,
  plain background, no specks, a well drawn shape). The loop never sees it; it labels the human
  seed pairs (ties dropped) and scores the evaluation.
"""
import itertools
import math

import numpy as np
from PIL import Image

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
    return choice_from_scores(oracle_score(prompt, img_a), oracle_score(prompt, img_b), tie_margin)


def choice_from_scores(a, b, tie_margin=0.02):
    """The oracle's choice between two images scored a and b: 0, 1, or None for a tie."""
    if abs(a - b) < tie_margin:
        return None
    return 0 if a > b else 1


def rater_win_probability(a, b, rater_noise):
    """The noisy rater's chance of choosing the image scored a over the one scored b: Bradley-Terry
    on the oracle's scores at temperature rater_noise (toy.data --rater-noise)."""
    return 1 / (1 + math.exp(-(a - b) / rater_noise))


def rater_choice(a, b, tie_margin, rater_noise, uniform):
    """The toy's human between images scored a and b: None for a tie (scores closer than tie_margin),
    else 0 (the first) or 1: the oracle's choice, or at rater_noise > 0 the Bradley-Terry rater's,
    drawn with uniform(), which is called only then."""
    choice = choice_from_scores(a, b, tie_margin)
    if choice is None or rater_noise <= 0:
        return choice
    return 0 if uniform() < rater_win_probability(a, b, rater_noise) else 1


def found_attributes(details):
    """The object the oracle found, in the caption's words: colour, shape, size and position (None
    each where it found no object)."""
    got = dict(colour=details.get("found_colour"), shape=details.get("found_shape"), size=None, position=None)
    if details.get("found"):
        cx, cy = details["found_xy"]
        got["position"] = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)
        got["size"] = min(SIZES, key=lambda k: abs(SIZES[k] - details["found_r"]))
    return got


def attribute_rates(details, prompts):
    """How often the drawn object has the caption's colour, shape, size and position."""
    hits = {k: [] for k in ("colour", "shape", "size", "position")}
    for d, p in zip(details, prompts):
        want, got = parse_caption(p), found_attributes(d)
        for k in hits:
            if want[k]:
                hits[k].append(got[k] == want[k])
    return {k: float(np.mean(v)) if v else float("nan") for k, v in hits.items()}


def diversity(images):
    """How different a prompt's images are from each other: the mean over pairs of the RMS pixel
    difference (0-1) and of the share of the found object's four attributes that differ (0-1)."""
    arrays = [_as_array(im) for im in images]
    found = [found_attributes(oracle_details("", a)) for a in arrays]
    pairs = list(itertools.combinations(range(len(arrays)), 2))
    if not pairs:
        return dict(pixels=0.0, attributes=0.0)
    pixels = [float(np.sqrt(np.mean((arrays[i] - arrays[j]) ** 2))) / 255 for i, j in pairs]
    attrs = [np.mean([found[i][k] != found[j][k] for k in found[i]]) for i, j in pairs]
    return dict(pixels=float(np.mean(pixels)), attributes=float(np.mean(attrs)))
