"""The pairing rule: which two of a prompt's scored candidates become its self-labelled pair
(best vs worst by default, the paper's; random for the Table 5 ablation), and when they tie.
"""
import random

from sail import common


def choose_pair(pid, group, pairing, seed, tolerance=0.0, same_image=lambda a, b: False):
    """(winner, loser) rows of one prompt, or None when they tie: rewards within `tolerance`, or
    `same_image(winner, loser)`."""
    if pairing == "best-worst":
        ranked = sorted(group, key=lambda r: (r["reward"], -r["index"]))
        low, high = ranked[0], ranked[-1]
    else:
        a, b = random.Random(common.derive_seed(seed, "pair", pid)).sample(group, 2)
        low, high = sorted((a, b), key=lambda r: r["reward"])
    if high["reward"] - low["reward"] <= tolerance or same_image(high, low):
        return None
    return high, low


def tie_tolerance(beta):
    """Rewards closer than this are equal up to round-off: the errors are float32 means of squares
    (about 1, summed to ~1e-6 relative precision), and the reward scales them by beta / 2."""
    return beta * 1e-6


def same_file_bytes(folder):
    return lambda a, b: (folder / a["image"]).read_bytes() == (folder / b["image"]).read_bytes()
