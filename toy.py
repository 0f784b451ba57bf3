"""The toy world's command line: a run's data, and the oracle's report on its checkpoints.

    python toy.py data --run runs/toy [--preset toy] [--seed 0] [--pool-size 64] [--all-labels]
    python toy.py report --run runs/toy [--images-per-prompt 4]

The toy base model is built by `python toy_base.py` (run_all.sh does it first). `data` reads the
preset's base model and writes runs/<run>/seed/pairs.jsonl + seed/images/ + seed/stats.json,
pools/iter_01.jsonl ..., eval/prompts.jsonl (and seed/all_pairs.jsonl with --all-labels),
toy_world.data.json (the settings; a rerun with other settings is refused), toy_world.data.args.json
and log.txt. `report` reads the run's checkpoints (iter_XX/ckpt) and iter_XX/pairs.jsonl, caches
its images and scores under eval/oracle/<name>/, prints one line per model and writes
eval/oracle_report.json. The world itself (renderer, hidden human) is toy_world.py.
"""
import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

import run_files
import sail_models as models
from run_files import SailError
from toy_world import all_captions, attribute_rates, choice_from_scores, oracle_details, oracle_score, rater_choice

log = logging.getLogger("sail")


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
    return models.derive_seed(seed, "toy-split") % 2**32


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
            models.derive_seed(seed, "toy-rater", row["prompt_id"], j) % 2**32).random)
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
    todo, out = [], {}
    for row, j in slots:
        for side in ("a", "b"):
            name = f"{row['prompt_id']}_{j:02d}{side}.png"
            key = (row["prompt_id"], j, side)
            if run_files.image_is_complete(folder / name):
                out[key] = (f"images/{name}", run_files.load_image(folder / name))
            else:
                todo.append((key, name, row["prompt"], models.derive_seed(seed, "human-pairs", row["prompt_id"], j, side)))
    batches = models.draw_images(pipe, [c[2] for c in todo], [c[3] for c in todo], preset["steps"], preset["cfg"],
                                 preset["resolution"], batch_size, "human pair images")
    for first, images in batches:
        for (key, name, _, _), img in zip(todo[first:], images):
            run_files.save_image_atomic(img, folder / name)
            out[key] = (f"images/{name}", img)
        if first == 0 or (first // batch_size) % 5 == 4:
            log.info("human pair images: %d/%d", first + len(images), len(todo))
    return out


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
                    tie_margin=tie_margin, **({"val_pairs": val_pairs} if val_pairs else {}),  # older folders have none
                    **({"rater_noise": rater_noise} if rater_noise else {}))
    made = run_dir / "toy_world.data.json"
    if made.is_file():
        before = json.loads(made.read_text())
        changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v}
        if changed:
            raise SailError(f"{run_dir} holds data made with other settings ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in changed.items())}); "
                            f"use a new --run folder or the same settings")
    cfg = models.get_preset(preset)
    evals, pools, universe = split_prompts(seed, n_pools, pool_size, n_eval, n_universe)
    slots = [(row, j) for row in universe for j in range(pairs_per_prompt)]
    n_seed = max(1, round(seed_fraction * len(slots)))
    if val_pairs and not 0 < val_pairs <= len(slots) - n_seed:
        raise SailError(f"--val-pairs {val_pairs}: {len(slots) - n_seed} labelled pair slots are outside the seed set")
    run_files.write_json_atomic(made, settings)
    for k, pool in enumerate(pools, 1):
        path = run_files.pool_path(run_dir, k)
        if not path.is_file():
            run_files.write_jsonl_atomic(path, pool)
    if not (run_dir / "eval" / "prompts.jsonl").is_file():
        run_files.write_jsonl_atomic(run_dir / "eval" / "prompts.jsonl", evals)
    rng = np.random.default_rng(models.derive_seed(seed, "toy-seed-pairs") % 2**32)
    seed_index = sorted(rng.choice(len(slots), n_seed, replace=False))
    seed_slots = [slots[i] for i in seed_index]
    stats = dict(universe_prompts=len(universe), universe_slots=len(slots), seed_slots=n_seed)
    seed_dir = run_dir / "seed"
    wanted = [(seed_dir / "pairs.jsonl", seed_slots)] + ([(seed_dir / "all_pairs.jsonl", slots)] if all_labels else [])
    if val_pairs:
        rest = sorted(set(range(len(slots))) - set(seed_index))
        pick = np.random.default_rng(models.derive_seed(seed, "toy-val-pairs") % 2**32).choice(rest, val_pairs, replace=False)
        wanted.append((run_files.val_pairs_path(run_dir), [slots[i] for i in sorted(pick)]))
    pipe = None
    for path, chosen in wanted:
        if path.is_file():
            log.info("%s exists; kept", path)
            continue
        if pipe is None:
            device = models.pick_device(device)
            pipe = models.load_pipeline(models.describe_model(preset), device, models.inference_dtype(device, cfg["mixed_precision"]),
                                    sampler=cfg["sampler"])
        with run_files.folder_lock(seed_dir, "toy_world data"):
            images = _images_for(pipe, cfg, chosen, path.parent / "images", seed, batch_size)
            pairs, ties, agree = _label_pairs(chosen, images, tie_margin, rater_noise, seed)
            if not pairs:
                raise SailError(f"every one of the {len(chosen)} pairs for {path} is a tie (tie margin {tie_margin})")
            run_files.write_jsonl_atomic(path, pairs)
        stats[("val_" if path == run_files.val_pairs_path(run_dir) else "") + path.stem] = dict(
            slots=len(chosen), pairs=len(pairs), ties=ties, tie_rate=round(ties / len(chosen), 4), oracle_agreement=round(agree, 4))
        log.info("%s: %d pairs from %d slots (%.1f%% ties dropped), %.1f%% of them labelled as the oracle would",
                 path, len(pairs), len(chosen), 100 * ties / len(chosen), 100 * agree)
    stats_path = seed_dir / "stats.json"
    if len(stats) > 3 or not stats_path.is_file():
        old = json.loads(stats_path.read_text()) if stats_path.is_file() else {}
        run_files.write_json_atomic(stats_path, {**old, **stats})
    run_files.check_pools_disjoint(run_dir)
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
                prompts=models.derive_seed(*[r["prompt_id"] + r["prompt"] for r in prompts]))
    scores_path = folder / "scores.jsonl"
    if scores_path.is_file() and (folder / "meta.json").is_file():
        if json.loads((folder / "meta.json").read_text()) == meta:
            return run_files.read_jsonl(scores_path)
        log.info("%s was scored with other settings; scoring it again", folder)
        shutil.rmtree(folder)
    cfg = models.get_preset(preset)
    desc = models.describe_model(preset if model == "base" else model)
    device = models.pick_device(device)
    pipe = models.load_pipeline(desc, device, models.inference_dtype(device, cfg["mixed_precision"]), sampler=cfg["sampler"])
    jobs = [(r, i, models.derive_seed(seed, "toy-eval", r["prompt_id"], i)) for r in prompts for i in range(n_images_per_prompt)]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = []
    batches = models.draw_images(pipe, [r["prompt"] for r, _, _ in jobs], [s for _, _, s in jobs], cfg["steps"], cfg["cfg"],
                                 cfg["resolution"], batch_size, f"oracle {name}")
    for first, images in batches:
        for (r, i, s), img in zip(jobs[first:], images):
            rel = f"images/{r['prompt_id']}_{i}.png"
            img.save(tmp / rel)
            d = oracle_details(r["prompt"], img)
            rows.append(dict(prompt_id=r["prompt_id"], prompt=r["prompt"], index=i, seed=s, image=rel, score=d["score"],
                             prompt_score=d["prompt"], taste=d["taste"], follows=attribute_rates([d], [r["prompt"]])))
    run_files.write_jsonl_atomic(tmp / "scores.jsonl", rows)
    run_files.write_json_atomic(tmp / "meta.json", meta)
    os.replace(tmp, folder)
    return run_files.read_jsonl(folder / "scores.jsonl")


def score_checkpoints(run_dir, ckpts, n_images_per_prompt=4, seed=0, preset=None, device=None, batch_size=64):
    """Oracle score of each model ("base" or a checkpoint folder) on run_dir/eval/prompts.jsonl, with
    the same seeds for every model, and its win rate against the base on those seeds. Returns
    {name: dict(mean, se, n, prompt, taste, follows, win_rate, delta, delta_se)}; name is "base",
    iter_XX for runs/<run>/iter_XX/ckpt, else the folder's name. Cached under eval/oracle/<name>/."""
    run_dir = Path(run_dir)
    prompts = [run_files.strip_private(r) for r in run_files.read_prompts(run_dir / "eval" / "prompts.jsonl")]
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
    pairs = run_files.read_pairs(Path(iter_dir) / "pairs.jsonl")
    agree = [oracle_score(p["prompt"], run_files.load_image(p["_image_w"])) > oracle_score(p["prompt"], run_files.load_image(p["_image_l"]))
             for p in pairs]
    return float(np.mean(agree))


def report(run_dir, n_images_per_prompt=4, seed=0, device=None):
    """Score base and every finished checkpoint of the run (iter_*/ckpt, then any other */ckpt such
    as the study's ablations); print a table; write eval/oracle_report.json."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("*/ckpt"), key=lambda p: (run_files.iteration_number(p.parent.name) is None, p.parent.name))
    ckpts = ["base"] + [p for p in found if (p / "sail.json").is_file()]
    with run_files.folder_lock(run_dir / "eval", "toy_world report"):
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
    run_files.write_json_atomic(run_dir / "eval" / "oracle_report.json", results)
    return results


# ---------------------------------------------------------------- command line
def main(args):
    run_dir = Path(args.run)
    run_files.setup_logging(run_dir, f"toy_world {args.command}")
    run_files.save_args(run_dir, f"toy_world.{args.command}", args)
    if args.command == "data":
        stats = make_run_data(run_dir, preset=args.preset, seed=args.seed, n_pools=args.n_pools, pool_size=args.pool_size,
                              n_eval=args.n_eval, seed_fraction=args.seed_fraction, pairs_per_prompt=args.pairs_per_prompt,
                              n_universe=args.n_universe, tie_margin=args.tie_margin, all_labels=args.all_labels,
                              device=args.device, val_pairs=args.val_pairs, rater_noise=args.rater_noise)
        log.info("data ready in %s: %s", run_dir, json.dumps(stats))
    else:
        if not (run_dir / "eval" / "prompts.jsonl").is_file():
            raise SailError(f"{run_dir / 'eval' / 'prompts.jsonl'}: file not found (run `python toy.py data --run {run_dir}` first)")
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
    data.add_argument("--val-pairs", type=int, default=0,
                      help="held-out labelled pairs, never trained on: val/pairs.jsonl (run_all.sh's drift guard reads it)")
    data.add_argument("--rater-noise", type=float, default=0.0,
                      help="0: the oracle labels every pair; T > 0: a noisy rater, P(a wins) = sigmoid(score gap / T)")
    data.add_argument("--device", default=None)
    rep = sub.add_parser("report", help="oracle score of base and every checkpoint of a run")
    rep.add_argument("--run", required=True)
    rep.add_argument("--images-per-prompt", type=int, default=4)
    rep.add_argument("--eval-seed", type=int, default=0)
    rep.add_argument("--device", default=None)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_files.run_stage(main, parse_args())
