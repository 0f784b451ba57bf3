"""Small data the tests make for themselves: coloured images, pair files, prompt pools."""
import json
from pathlib import Path

import numpy as np
from conftest import load_stage
from PIL import Image

from sail import common

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 210, 40), (200, 40, 200), (30, 200, 200)]


def coloured_image(colour, size=32, seed=0):
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), colour, dtype=np.float32) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def make_pairs(folder, n=6, source="human", size=32, prompt="a {} square", name="pairs.jsonl"):
    """n pairs under folder/images/, paths relative to folder; returns the pair file's path."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        paths = []
        for side, colour in (("w", COLOURS[i % len(COLOURS)]), ("l", COLOURS[(i + 3) % len(COLOURS)])):
            rel = f"images/{source}_{i}_{side}.png"
            coloured_image(colour, size, seed=i).save(folder / rel)
            paths.append(rel)
        rows.append({"prompt": prompt.format(i), "image_w": paths[0], "image_l": paths[1], "source": source,
                     "prompt_id": f"{source}{i}"})
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_pool(path, ids, prefix="prompt"):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt_id": f"{prefix}{i}", "prompt": f"{prefix} number {i}"}) + "\n" for i in ids))
    return path


def run_train(*argv):
    """04_train.py in this process, as its command line would run it."""
    train = load_stage("04_train")
    common.run_stage(train.locked_main, train.build_parser().parse_args([str(a) for a in argv]))


def unet_state(ckpt):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel.from_pretrained(ckpt / "unet").state_dict()
