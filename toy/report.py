"""The toy world's report: the hidden human's (oracle's) score of the base model and of every
checkpoint of a run, and how often the self-labelled pairs agree with it.

Command:
    python -m toy.report --run runs/toy [--images-per-prompt 4]

Reads:  the run's checkpoints (iter_XX/ckpt), iter_XX/pairs.jsonl and eval/prompts.jsonl (from toy.data).
Writes: eval/oracle/<name>/ (cached images and scores), eval/oracle_report.json, toy_world.report.args.json
        and log.txt; prints one line per model.
"""
import argparse
import json
import logging
import math
import os
import shutil
from pathlib import Path

import numpy as np

from sail import common, files, generation, models
from sail.common import SailError
from sail.settings import get_preset
from toy.world import attribute_rates, oracle_details, oracle_score

log = logging.getLogger("sail")


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
                prompts=common.derive_seed(*[r["prompt_id"] + r["prompt"] for r in prompts]))
    scores_path = folder / "scores.jsonl"
    if scores_path.is_file() and (folder / "meta.json").is_file():
        if json.loads((folder / "meta.json").read_text()) == meta:
            return files.read_jsonl(scores_path)
        log.info("%s was scored with other settings; scoring it again", folder)
        shutil.rmtree(folder)
    cfg = get_preset(preset)
    desc = models.describe_model(preset if model == "base" else model)
    device = models.pick_device(device)
    pipe = models.load_pipeline(desc, device, models.inference_dtype(device, cfg["mixed_precision"]), sampler=cfg["sampler"])
    jobs = [(r, i, common.derive_seed(seed, "toy-eval", r["prompt_id"], i)) for r in prompts for i in range(n_images_per_prompt)]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    rows = []
    batches = generation.draw_images(pipe, [r["prompt"] for r, _, _ in jobs], [s for _, _, s in jobs], cfg["steps"], cfg["cfg"],
                                 cfg["resolution"], batch_size, f"oracle {name}")
    for first, images in batches:
        for (r, i, s), img in zip(jobs[first:], images):
            rel = f"images/{r['prompt_id']}_{i}.png"
            img.save(tmp / rel)
            d = oracle_details(r["prompt"], img)
            rows.append(dict(prompt_id=r["prompt_id"], prompt=r["prompt"], index=i, seed=s, image=rel, score=d["score"],
                             prompt_score=d["prompt"], taste=d["taste"], follows=attribute_rates([d], [r["prompt"]])))
    files.write_jsonl_atomic(tmp / "scores.jsonl", rows)
    files.write_json_atomic(tmp / "meta.json", meta)
    os.replace(tmp, folder)
    return files.read_jsonl(folder / "scores.jsonl")


def score_checkpoints(run_dir, ckpts, n_images_per_prompt=4, seed=0, preset=None, device=None, batch_size=64):
    """Oracle score of each model ("base" or a checkpoint folder) on run_dir/eval/prompts.jsonl, with
    the same seeds for every model, and its win rate against the base on those seeds. Returns
    {name: dict(mean, se, n, prompt, taste, follows, win_rate, delta, delta_se)}; name is "base",
    iter_XX for runs/<run>/iter_XX/ckpt, else the folder's name. Cached under eval/oracle/<name>/."""
    run_dir = Path(run_dir)
    prompts = [files.strip_private(r) for r in files.read_prompts(run_dir / "eval" / "prompts.jsonl")]
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
    pairs = files.read_pairs(Path(iter_dir) / "pairs.jsonl")
    agree = [oracle_score(p["prompt"], files.load_image(p["_image_w"])) > oracle_score(p["prompt"], files.load_image(p["_image_l"]))
             for p in pairs]
    return float(np.mean(agree))


def report(run_dir, n_images_per_prompt=4, seed=0, device=None):
    """Score base and every finished checkpoint of the run (iter_*/ckpt, then any other */ckpt such
    as the study's ablations); print a table; write eval/oracle_report.json."""
    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("*/ckpt"), key=lambda p: (files.iteration_number(p.parent.name) is None, p.parent.name))
    ckpts = ["base"] + [p for p in found if (p / "sail.json").is_file()]
    with files.folder_lock(run_dir / "eval", "toy_world report"):
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
    files.write_json_atomic(run_dir / "eval" / "oracle_report.json", results)
    return results


def main(args):
    run_dir = Path(args.run)
    common.setup_logging(run_dir, "toy_world report")
    files.save_args(run_dir, "toy_world.report", args)
    if not (run_dir / "eval" / "prompts.jsonl").is_file():
        raise SailError(f"{run_dir / 'eval' / 'prompts.jsonl'}: file not found (run `python -m toy.data --run {run_dir}` first)")
    report(run_dir, args.images_per_prompt, args.eval_seed, args.device)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--eval-seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
