"""The toy world's data for a run: human seed pairs labelled by the hidden human, prompt pools and
evaluation prompts, all drawn from the world's captions.

Command:
    python -m toy.data --run runs/toy [--preset toy] [--seed 0] [--pool-size 64] [--all-labels]

Reads:  the preset's base model (the toy base is built by `python -m toy.base`; run_all.sh does it first).
Writes: runs/<run>/seed/pairs.jsonl + seed/images/ + seed/stats.json, pools/iter_01.jsonl ...,
        eval/prompts.jsonl (and seed/all_pairs.jsonl with --all-labels; val/pairs.jsonl with --val-pairs),
        toy_world.data.json (the settings; a rerun with other settings is refused), toy_world.data.args.json
        and log.txt. The world itself (renderer, hidden human) is toy/world.py.
"""
import argparse
import json
import logging
from pathlib import Path

import numpy as np

from sail import common, files, generation, models
from sail.common import SailError
from sail.settings import get_preset
from toy.world import all_captions, choice_from_scores, oracle_score, rater_choice

log = logging.getLogger("sail")


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
    return common.derive_seed(seed, "toy-split") % 2**32


def _label_pairs(slots, images, tie_margin, rater_noise=0.0, seed=0):
    """Labels for (row, j) slots whose two images are images[(pid, j, 'a'|'b')]; ties (oracle scores
    closer than tie_margin) dropped. rater_noise 0: the oracle's choice. rater_noise T > 0: a noisy
    rater, Bradley-Terry on the oracle's scores, P(a wins) = sigmoid((score_a - score_b) / T), drawn
    per slot from its own seed so that a slot has one label in every file. Returns (pairs, ties,
    share of the pairs whose winner the oracle prefers)."""
    pairs, ties, agree = [], 0, 0
    for row, j in slots:
        img_a, img_b = images[(row["prompt_id"], j, "a")], images[(row["prompt_id"], j, "b")]
        score_a, score_b = oracle_score(row["prompt"], img_a[1]), oracle_score(row["prompt"], img_b[1])
        choice = rater_choice(score_a, score_b, tie_margin, rater_noise, np.random.default_rng(
            common.derive_seed(seed, "toy-rater", row["prompt_id"], j) % 2**32).random)
        if choice is None:
            ties += 1
            continue
        oracle_choice = choice_from_scores(score_a, score_b, tie_margin)
        agree += choice == oracle_choice
        w, l = (img_a, img_b) if choice == 0 else (img_b, img_a)
        pairs.append(dict(prompt=row["prompt"], image_w=w[0], image_l=l[0], source="human", prompt_id=row["prompt_id"]))
    return pairs, ties, agree / max(1, len(pairs))


def _images_for(pipe, preset, slots, folder, seed, batch_size):
    """Generate (or find on disk) the two images of each slot; returns {(pid, j, side): (relpath, PIL)}."""
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [dict(key=(row["prompt_id"], j, side), name=f"{row['prompt_id']}_{j:02d}{side}.png", prompt=row["prompt"],
                 seed=common.derive_seed(seed, "human-pairs", row["prompt_id"], j, side))
            for row, j in slots for side in ("a", "b")]
    batches = generation.missing_batches(jobs, batch_size, lambda job: folder / job["name"])
    for done, (batch, images) in enumerate(generation.draw_batches(pipe, batches, preset["steps"], preset["cfg"],
                                                                   preset["resolution"], "human pair images"), 1):
        for job, img in zip(batch, images):
            if not files.image_is_complete(folder / job["name"]):
                files.save_image_atomic(img, folder / job["name"])
        if done == 1 or done % 5 == 0:
            log.info("human pair images: %d/%d batches", done, len(batches))
    return {job["key"]: (f"images/{job['name']}", files.load_image(folder / job["name"])) for job in jobs}


def make_run_data(run_dir, preset="toy", seed=0, n_pools=3, pool_size=64, n_eval=64, seed_fraction=0.06,
                  pairs_per_prompt=14, n_universe=None, tie_margin=0.02, all_labels=False, batch_size=64,
                  device=None, val_pairs=0, rater_noise=0.0):
    """Write a run's data: the human seed pairs (images drawn by the preset's base model, labelled
    by the oracle, ties dropped), one prompt pool per iteration and the evaluation prompts, all
    prompt sets disjoint. The labelled universe is pairs_per_prompt pairs for each universe prompt;
    the seed is a random seed_fraction of its pair slots; val_pairs more slots, never trained on, are
    labelled into val/pairs.jsonl (the drift guard's held-out pairs). rater_noise > 0 labels every file
    with a noisy rater instead of the oracle (_label_pairs). Files that exist are kept. Returns stats."""
    run_dir = Path(run_dir)
    settings = dict(preset=preset, seed=seed, n_pools=n_pools, pool_size=pool_size, n_eval=n_eval,
                    seed_fraction=seed_fraction, pairs_per_prompt=pairs_per_prompt, n_universe=n_universe,
                    tie_margin=tie_margin, **({"val_pairs": val_pairs} if val_pairs else {}),  # only when set: data made without them still matches
                    **({"rater_noise": rater_noise} if rater_noise else {}))
    made = run_dir / "toy_world.data.json"
    if made.is_file():
        before = json.loads(made.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SailError(f"{run_dir} holds data made with other settings ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                            f"use a new --run folder or the same settings")
    cfg = get_preset(preset)
    evals, pools, universe = split_prompts(seed, n_pools, pool_size, n_eval, n_universe)
    slots = [(row, j) for row in universe for j in range(pairs_per_prompt)]
    n_seed = max(1, round(seed_fraction * len(slots)))
    if val_pairs and not 0 < val_pairs <= len(slots) - n_seed:
        raise SailError(f"--val-pairs {val_pairs}: {len(slots) - n_seed} labelled pair slots are outside the seed set")
    files.write_json_atomic(made, settings)
    for k, pool in enumerate(pools, 1):
        path = files.pool_path(run_dir, k)
        if not path.is_file():
            files.write_jsonl_atomic(path, pool)
    if not (run_dir / "eval" / "prompts.jsonl").is_file():
        files.write_jsonl_atomic(run_dir / "eval" / "prompts.jsonl", evals)
    rng = np.random.default_rng(common.derive_seed(seed, "toy-seed-pairs") % 2**32)
    seed_index = sorted(rng.choice(len(slots), n_seed, replace=False))
    seed_slots = [slots[i] for i in seed_index]
    stats = dict(universe_prompts=len(universe), universe_slots=len(slots), seed_slots=n_seed)
    seed_dir = run_dir / "seed"
    wanted = [(seed_dir / "pairs.jsonl", seed_slots)] + ([(seed_dir / "all_pairs.jsonl", slots)] if all_labels else [])
    if val_pairs:
        rest = sorted(set(range(len(slots))) - set(seed_index))
        pick = np.random.default_rng(common.derive_seed(seed, "toy-val-pairs") % 2**32).choice(rest, val_pairs, replace=False)
        wanted.append((files.val_pairs_path(run_dir), [slots[i] for i in sorted(pick)]))
    pipe = None
    for path, chosen in wanted:
        if path.is_file():
            log.info("%s exists; kept", path)
            continue
        if pipe is None:
            device = models.pick_device(device)
            pipe = models.load_pipeline(models.describe_model(preset), device, models.inference_dtype(device, cfg["mixed_precision"]),
                                    sampler=cfg["sampler"])
        with files.folder_lock(seed_dir, "toy_world data"):
            images = _images_for(pipe, cfg, chosen, path.parent / "images", seed, batch_size)
            pairs, ties, agree = _label_pairs(chosen, images, tie_margin, rater_noise, seed)
            if not pairs:
                raise SailError(f"every one of the {len(chosen)} pairs for {path} is a tie (tie margin {tie_margin})")
            files.write_jsonl_atomic(path, pairs)
        stats[("val_" if path == files.val_pairs_path(run_dir) else "") + path.stem] = dict(
            slots=len(chosen), pairs=len(pairs), ties=ties, tie_rate=round(ties / len(chosen), 4), oracle_agreement=round(agree, 4))
        log.info("%s: %d pairs from %d slots (%.1f%% ties dropped), %.1f%% of them labelled as the oracle would",
                 path, len(pairs), len(chosen), 100 * ties / len(chosen), 100 * agree)
    stats_path = seed_dir / "stats.json"
    if len(stats) > 3 or not stats_path.is_file():
        old = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        files.write_json_atomic(stats_path, {**old, **stats})
    files.check_pools_disjoint(run_dir)
    return stats


def main(args):
    run_dir = Path(args.run)
    common.setup_logging(run_dir, "toy_world data")
    files.save_args(run_dir, "toy_world.data", args)
    stats = make_run_data(run_dir, preset=args.preset, seed=args.seed, n_pools=args.n_pools, pool_size=args.pool_size,
                          n_eval=args.n_eval, seed_fraction=args.seed_fraction, pairs_per_prompt=args.pairs_per_prompt,
                          n_universe=args.n_universe, tie_margin=args.tie_margin, all_labels=args.all_labels,
                          device=args.device, val_pairs=args.val_pairs, rater_noise=args.rater_noise)
    log.info("data ready in %s: %s", run_dir, json.dumps(stats))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder, e.g. runs/toy")
    p.add_argument("--preset", default="toy", help="model that draws the seed pair images (toy, tiny-sd15, tiny-sdxl)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split, the seed pairs and their images")
    p.add_argument("--n-pools", type=int, default=3, help="number of SAIL iterations to make prompt pools for")
    p.add_argument("--pool-size", type=int, default=64, help="prompts per pool")
    p.add_argument("--n-eval", type=int, default=64, help="evaluation prompts")
    p.add_argument("--seed-fraction", type=float, default=0.06, help="share of the labelled pairs given as the human seed")
    p.add_argument("--pairs-per-prompt", type=int, default=14, help="labelled pairs per universe prompt")
    p.add_argument("--n-universe", type=int, default=None, help="universe prompts (default: all that are left)")
    p.add_argument("--tie-margin", type=float, default=0.02, help="oracle score gap below which a pair is a tie")
    p.add_argument("--all-labels", action="store_true", help="also label the whole universe: seed/all_pairs.jsonl")
    p.add_argument("--val-pairs", type=int, default=0,
                      help="held-out labelled pairs, never trained on: val/pairs.jsonl (run_all.sh's drift guard reads it)")
    p.add_argument("--rater-noise", type=float, default=0.0,
                      help="0: the oracle labels every pair; T > 0: a noisy rater, P(a wins) = sigmoid(score gap / T)")
    p.add_argument("--device", default=None)
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
