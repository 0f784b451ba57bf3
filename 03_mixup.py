"""Ranked preference mixup: the training set of an iteration mixes its self-labelled pairs with
pairs drawn from the human seed set, so that self-training keeps hold of the human prior
(the paper's experience-replay argument, section 4.2).

--human-share h is the fraction of human pairs in the mixed set: all self pairs are kept and
round(n_self * h / (1 - h)) human pairs are drawn without replacement (with replacement, said
in the log, only if the seed set is smaller than that). The paper reads two ways:
  - its text: "mix ratio of human preference data and generated preference data as 0.25":
    a quarter of the mix is human, h = 0.25 (the default; it fits 50K seed pairs against
    10-20K new pairs per iteration);
  - its Algorithm 1: D_i = alpha * D_i + (1 - alpha) * D_init with alpha = 0.25 drawn from the
    generated pairs: three quarters human, h = 0.75.
h = 0 trains on the self pairs alone (no mixup, the Table 6 ablation). --max-self keeps only
the most confident self pairs (ranked by p = sigmoid(r_w - r_l)). The result is deterministic
given --seed and the iteration folder's name.

Command (iteration i of a run):
    python 03_mixup.py --run runs/toy --iter 1
is short for
    python 03_mixup.py --self-pairs runs/toy/iter_01/pairs.jsonl --human-pairs runs/toy/seed/pairs.jsonl \
        --out runs/toy/iter_01/train_pairs.jsonl

Reads:  the self pairs (02_self_reward.py) and the human seed pairs, with their images.
Writes: the mixed pair file (image paths rewritten relative to its folder; each line keeps its
        `source` and says where it came from in `origin`), mixup.args.json, log.txt.
"""
import argparse
import logging
import random
from pathlib import Path

from sail import common, files, settings

log = logging.getLogger("sail")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder; with --iter, sets the three paths")
    p.add_argument("--iter", type=int, help="iteration number (1, 2, ...)")
    p.add_argument("--self-pairs", type=Path)
    p.add_argument("--human-pairs", type=Path)
    p.add_argument("--out", type=Path)
    return settings.add_arguments(p, "mixup")


def resolve_paths(args):
    if args.run is not None and args.iter is not None:
        folder = files.iteration_dir(args.run, args.iter)
        args.self_pairs = args.self_pairs or folder / "pairs.jsonl"
        args.human_pairs = args.human_pairs or files.seed_pairs_path(args.run)
        args.out = args.out or folder / "train_pairs.jsonl"
    if not (args.self_pairs and args.out and (args.human_pairs or args.human_share == 0)):
        raise common.SailError("give --run and --iter, or --self-pairs, --human-pairs and --out")
    if not 0 <= args.human_share < 1:
        raise common.SailError(f"--human-share must be in [0, 1), got {args.human_share}")
    return args


def mix(self_rows, human_rows, human_share, max_self, seed):
    """The mixed list of pair rows (with absolute image paths), shuffled."""
    rng = random.Random(seed)
    if max_self is not None:
        self_rows = sorted(self_rows, key=lambda r: -r.get("p", 0.5))[:max_self]
    n_human = round(len(self_rows) * human_share / (1 - human_share))
    if n_human <= len(human_rows):
        chosen = rng.sample(human_rows, n_human)
    else:
        log.info("the seed set has %d pairs, fewer than the %d asked for: drawing with replacement", len(human_rows), n_human)
        chosen = [rng.choice(human_rows) for _ in range(n_human)]
    rows = list(self_rows) + chosen
    rng.shuffle(rows)
    return rows


def main(args):
    args = resolve_paths(args)
    out = Path(args.out)
    common.setup_logging(out.parent, "mixup")
    if out.exists():
        log.info("%s exists; skipping (delete it to mix again)", out)
        return
    self_rows = files.read_pairs(args.self_pairs)
    human_rows = files.read_pairs(args.human_pairs) if args.human_share > 0 else []
    for rows, path in ((self_rows, args.self_pairs), (human_rows, args.human_pairs)):
        for row in rows:
            row["origin"] = f"{files.relative_to(path, out.parent)}:{row['_line']}"
    files.save_args(out.parent, "mixup", args)
    mixed = mix(self_rows, human_rows, args.human_share, args.max_self, common.derive_seed(args.seed, "mixup", out.parent.name))
    lines = []
    for row in mixed:
        line = files.strip_private(row)
        line["image_w"] = files.relative_to(row["_image_w"], out.parent)
        line["image_l"] = files.relative_to(row["_image_l"], out.parent)
        lines.append(line)
    files.write_jsonl_atomic(out, lines)
    n_human = sum(r["source"] == "human" for r in lines)
    log.info("wrote %s: %d pairs, %d self + %d human (human share %.3f, asked %.3f)", out, len(lines), len(lines) - n_human,
             n_human, n_human / len(lines), args.human_share)


def locked_main(args):
    args = resolve_paths(args)
    with files.folder_lock(Path(args.out).parent, "mixup"):
        main(args)


if __name__ == "__main__":
    common.run_stage(locked_main, build_parser().parse_args())
