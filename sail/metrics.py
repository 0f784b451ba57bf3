"""The metrics of the evaluation by name (pickscore, hpsv2, imagereward, aesthetic, oracle and the
tiny ones): what each needs installed, loading a scorer, and loading it only when first used.
"""
import torch

from sail.common import SailError
from sail.imagereward import ImageReward, tiny_imagereward
from sail.scorers import (
    Aesthetic,
    HPSv2,
    PickScore,
    Scorer,
    _tiny_aesthetic,
    optional_import,
    tiny_clip,
)

# name -> (table label, decimals, factory(path, **kw))
METRICS = {
    "pickscore": ("P.S.", 2, lambda path, **kw: PickScore(model=path, **kw)),
    "imagereward": ("I.R.", 4, lambda path, **kw: ImageReward(model=path, **kw)),
    "aesthetic": ("Aes.", 2, lambda path, **kw: Aesthetic(mlp=path, **kw)),
    "hpsv2": ("HPSv2", 2, lambda path, **kw: HPSv2("hpsv2", checkpoint=path, **kw)),
    "hpsv2.1": ("HPSv2.1", 2, lambda path, **kw: HPSv2("hpsv2.1", checkpoint=path, **kw)),
    "oracle": ("Oracle", 4, lambda path, **kw: Oracle(**kw)),
    "tiny-pickscore": ("tiny P.S.", 4, lambda path, **kw: PickScore(*tiny_clip(), **kw)),
    "tiny-aesthetic": ("tiny Aes.", 4, lambda path, **kw: _tiny_aesthetic(**kw)),
    "tiny-imagereward": ("tiny I.R.", 4, lambda path, **kw: ImageReward(model=tiny_imagereward(), **kw)),
}


# metric -> (module it imports, how to get it)
NEEDS = {"hpsv2": ("open_clip", "pip install open_clip_torch"), "hpsv2.1": ("open_clip", "pip install open_clip_torch"),
         "oracle": ("toy.world", "it is the kit's toy/world.py: run from the kit's folder")}


def check_metric(name):
    """Fail early, before any image is generated, on an unknown metric or a missing extra."""
    if name not in METRICS:
        raise SailError(f"unknown metric '{name}'; choose from: {', '.join(METRICS)}")
    if name in NEEDS:
        optional_import(*NEEDS[name], name)


def load_scorer(name, device="cpu", path=None, batch_size=None, dtype=torch.float32):
    check_metric(name)
    scorer = METRICS[name][2](path, device=device, dtype=dtype, batch_size=batch_size)
    scorer.name = name
    return scorer


class LazyScorer:
    """load_scorer on the first call: a rerun that finds every score there never loads the model."""

    def __init__(self, name, **kw):
        self.name, self.kw, self.scorer = name, kw, None

    def __call__(self, prompts, images, names=None):
        self.scorer = self.scorer or load_scorer(self.name, **self.kw)
        return self.scorer(prompts, images, names)


class Oracle(Scorer):
    """The toy world's ground truth: toy.world.oracle_score(prompt, image)."""
    name = "oracle"

    def score_batch(self, prompts, images):
        toy_world = optional_import(*NEEDS["oracle"], "oracle")
        return [toy_world.oracle_score(p, img) for p, img in zip(prompts, images)]
