"""The pairing rule of 02_self_reward.py: which two of a prompt's scored candidates become its
self-labelled preference pair, with what confidence, and when the prompt gives no pair.
"""
import math
import random

from sail import common
from sail.settings import BETA

TIE = "tie"
BELOW_MIN_P = "below --min-p"


def self_pair(pid, candidates, pairing="best-worst", seed=0, beta=BETA, min_p=0.0, same_image=lambda a, b: False):
    """A prompt's scored candidates (rows with prompt, index, image and reward, Eq. 8) -> (its pair
    row, None), or (None, why there is none).

    pairing "best-worst" (the paper's): the highest reward against the lowest (equal rewards: the
    lower index ranks higher). "random" (the Table 5 ablation): two candidates drawn with a seed per
    prompt, the higher reward wins. The pair's p = sigmoid(r_w - r_l) is the self-reward's
    Bradley-Terry probability that w is preferred.
    No pair (TIE) when the two rewards are equal up to round-off (`tie_tolerance`: e.g. a model
    equal to its reference gives every image reward 0) or `same_image(w, l)` (two byte-identical
    files, which draws of their own would rank by noise alone); no pair (BELOW_MIN_P) when p < min_p.
    """
    if pairing == "best-worst":
        ranked = sorted(candidates, key=lambda r: (r["reward"], -r["index"]))
        lose, win = ranked[0], ranked[-1]
    else:
        a, b = random.Random(common.derive_seed(seed, "pair", pid)).sample(candidates, 2)
        lose, win = sorted((a, b), key=lambda r: r["reward"])
    margin = win["reward"] - lose["reward"]
    if margin <= tie_tolerance(beta) or same_image(win, lose):
        return None, TIE
    p = 1.0 / (1.0 + math.exp(-margin))
    if p < min_p:
        return None, BELOW_MIN_P
    return dict(prompt=win["prompt"], prompt_id=pid, image_w=win["image"], image_l=lose["image"], source="self",
                p=round(p, 6), reward_w=win["reward"], reward_l=lose["reward"]), None


def tie_tolerance(beta):
    """Rewards closer than this are equal up to round-off: the errors are float32 means of squares
    (about 1, summed to ~1e-6 relative precision), and the reward scales them by beta / 2."""
    return beta * 1e-6


def same_file_bytes(folder):
    """same_image for image paths relative to `folder`: the two files hold the same bytes."""
    return lambda a, b: (folder / a["image"]).read_bytes() == (folder / b["image"]).read_bytes()
