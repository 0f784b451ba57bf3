"""Did it get better? Evaluate checkpoints the way the paper does (Tables 1-3, Figure 5), with
paired comparisons and confidence intervals.

    python 05_eval.py --ckpt runs/r/iter_02/ckpt --benchmark parti        # one checkpoint
    python 05_eval.py --run runs/r --benchmark parti hps --limit 64      # base + every iter_*/ckpt
    python 05_eval.py --reward-accuracy runs/r/val/pairs.jsonl --run runs/r --draws 10 20 30

Benchmark mode: every checkpoint draws one image per prompt (--images-per-prompt) with the seed
derive_seed(--seed, prompt_id, index), the same for every checkpoint, so all are compared on the
same noise, with the sampler, steps, CFG and resolution of the checkpoint's preset. The images are
scored by --metrics (default: PickScore, ImageReward, aesthetic, HPSv2; tiny-* on the tiny presets,
the oracle on the toy preset). Benchmarks: parti, hps (hps-anime, -concept-art, -paintings, -photo),
pickapic, pickapic-test-dedup, drawbench (the kit's prompts/), run (<run>/eval/prompts.jsonl), FILE.jsonl.
Reward accuracy (Figure 5): on held-out human pairs, the share with sigma(r_w - r_l) > 0.5 for the
implicit reward of Eq. 8 (the checkpoint against its base model), for each K of --draws, with and without
common random numbers; ties count as wrong and are counted. --metrics adds the scorers' accuracy.

Reads: checkpoint folders (sail.json + unet/) or a preset name, prompts/*.jsonl, a pair file.
Writes under --out (default <run>/eval): <ckpt>/<benchmark>/images/*.png, scores.jsonl (per prompt,
per image and metric), generation.json, eval.json (mean, std, n, 95% CI per metric);
table_<benchmark>.md, grid_<benchmark>.png, plot_<benchmark>.png across all checkpoints evaluated
there; <ckpt>/reward_accuracy.json and reward_accuracy.md; 05_eval.args.json, log.txt.
Rerun: finished images, scores and reward accuracies are reused; other generation settings are refused.
"""
import argparse
import dataclasses
import gc
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sail import files, reports
from sail.batches import encode_images, encode_prompts
from sail.common import SailError, derive_seed, progress, run_stage, setup_logging
from sail.files import (
    folder_lock,
    image_is_complete,
    image_name,
    iteration_checkpoints,
    iteration_name,
    iteration_number,
    load_image,
    read_jsonl,
    read_pairs,
    save_args,
    save_image_atomic,
    strip_private,
    write_json_atomic,
    write_jsonl_atomic,
)
from sail.generation import draw_batches, missing_batches
from sail.metrics import METRICS, LazyScorer, check_metric, load_scorer
from sail.models import describe_model, inference_dtype, load_pipeline, load_unet, pick_device, read_checkpoint_info
from sail.self_reward import self_rewards
from sail.settings import PRESETS, add_arguments, settle

log = logging.getLogger("sail")
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
BENCHMARKS = {"parti": "parti.jsonl", "hps-anime": "hpsv2_anime.jsonl", "hps-concept-art": "hpsv2_concept-art.jsonl",
              "hps-paintings": "hpsv2_paintings.jsonl", "hps-photo": "hpsv2_photo.jsonl", "drawbench": "drawbench.jsonl",
              "pickapic": "pickapic_val_unique.jsonl", "pickapic-test-dedup": "pickapic_v2_test_dedup.jsonl"}
GROUPS = {"hps": ["hps-anime", "hps-concept-art", "hps-paintings", "hps-photo"]}
SHORT = {"hps-anime": "Ani.", "hps-concept-art": "Con.", "hps-paintings": "Paint.", "hps-photo": "Photo"}
PAPER_METRICS = ["pickscore", "imagereward", "aesthetic", "hpsv2"]
PRESET_METRICS = {"tiny-sd15": ["tiny-pickscore", "tiny-aesthetic"], "tiny-sdxl": ["tiny-pickscore", "tiny-aesthetic"],
                  "toy": ["oracle"]}


def read_benchmark(spec, run=None):
    """A --benchmark value -> [(name, prompt rows)]; rows get a prompt_id where the file has none."""
    out = []
    if spec == "run":
        if not run:
            raise SailError("--benchmark run reads <run>/eval/prompts.jsonl: give --run")
        spec = str(Path(run) / "eval" / "prompts.jsonl")
    for name in GROUPS.get(spec, [spec]):
        if name in BENCHMARKS:
            path = PROMPTS_DIR / BENCHMARKS[name]
            if not path.is_file():
                raise SailError(f"{path} is not shipped with the kit; write it (prompt_id, prompt per line) from the "
                                f"Pick-a-Pic v2 validation_unique captions, or pass --benchmark FILE.jsonl")
        elif spec.endswith(".jsonl"):
            path, name = Path(spec), Path(spec).stem
        else:
            raise SailError(f"unknown benchmark '{spec}'; choose from {', '.join([*BENCHMARKS, *GROUPS])}, run or FILE.jsonl")
        rows = read_jsonl(path, required=("prompt",), types={"prompt": str, "prompt_id": str})
        seen = {}
        for i, row in enumerate(rows):
            row.setdefault("prompt_id", f"{name}-{i:05d}")
            if not row["prompt"].strip() or row["prompt_id"] in seen:
                raise SailError(f"{path}:{row['_line']}: empty prompt or duplicate prompt_id '{row['prompt_id']}'")
            seen[row["prompt_id"]] = row["_line"]
        out.append((name, rows))
    return out


def resolve_checkpoints(args):
    """--ckpt values, or with --run alone the run's base model and every finished iteration checkpoint -> {name: desc}."""
    specs = list(args.ckpt or [])
    if args.run and not specs:
        found = iteration_checkpoints(args.run)
        if not found:
            raise SailError(f"{args.run}: no finished iteration checkpoint (iter_XX/ckpt) to evaluate")
        info = read_checkpoint_info(found[0])
        specs = [info.get("preset") or info["base_model"]] + [str(p) for p in found]
    if not specs:
        raise SailError("give --ckpt (a checkpoint folder, preset or pipeline; repeatable) or --run")
    ckpts = {}
    for spec in specs:
        desc = describe_model(spec)
        folder = Path(desc.ckpt or ".")
        name = (iteration_name(int(desc.iteration)) if desc.iteration is not None else "base" if not desc.ckpt
                else folder.parent.name if folder.name == "ckpt" else folder.name)
        if name in ckpts:
            raise SailError(f"two checkpoints are both named {name}: {spec} and {ckpts[name]['ckpt'] or 'the base'}")
        ckpts[name] = desc
    return ckpts


def preset_of(desc):
    return PRESETS.get(desc.preset) or PRESETS[desc.arch]  # the sd15/sdxl presets carry the arch's name


def model_order(name):
    number = iteration_number(name)
    return (0, -1, name) if name == "base" else (1, number, name) if number is not None else (2, 0, name)


def generate(desc, bench_dir, rows, settings, gen_batch, device, pipe_cache):
    """Draw the missing images of one checkpoint on one benchmark; finished ones are kept."""
    info = bench_dir / "generation.json"
    if info.is_file() and json.loads(info.read_text()) != settings:
        raise SailError(f"{bench_dir} was generated with other settings ({info.read_text().strip()}); "
                        f"use another --out or delete that folder")
    write_json_atomic(info, settings)
    (bench_dir / "images").mkdir(parents=True, exist_ok=True)
    jobs = [dict(prompt=r["prompt"], path=bench_dir / "images" / image_name(r["prompt_id"], k),
                 seed=derive_seed(settings["seed"], r["prompt_id"], k))
            for r in rows for k in range(settings["images_per_prompt"])]
    batches = missing_batches(jobs, gen_batch, lambda job: job["path"])
    todo = sum(len(batch) for batch in batches)
    log.info("%s: %d images in batches to draw, %d there already", bench_dir, todo, len(jobs) - todo)
    if not batches:
        return
    if "pipe" not in pipe_cache:
        dtype = inference_dtype(device, preset_of(desc)["mixed_precision"])
        pipe_cache["pipe"] = load_pipeline(desc, device, dtype, sampler=settings["sampler"])
    for batch, images in draw_batches(pipe_cache["pipe"], batches, settings["steps"], settings["cfg"], settings["resolution"]):
        for job, image in zip(batch, images):
            if not image_is_complete(job["path"]):
                save_image_atomic(image, job["path"])


def read_scores(bench_dir):
    path = bench_dir / "scores.jsonl"
    return {r["prompt_id"]: strip_private(r) for r in read_jsonl(path, allow_truncated_tail=True)} if path.is_file() else {}


def score(scorer, metric, bench_dir, rows, settings, chunk=256):
    """Add `metric` to scores.jsonl for every prompt that lacks it; other rows and metrics are kept."""
    table, k = read_scores(bench_dir), settings["images_per_prompt"]
    for r in rows:
        table.setdefault(r["prompt_id"], dict(prompt_id=r["prompt_id"], prompt=r["prompt"], scores={},
                                              images=[f"images/{image_name(r['prompt_id'], i)}" for i in range(k)],
                                              seeds=[derive_seed(settings["seed"], r["prompt_id"], i) for i in range(k)]))
    todo = [table[r["prompt_id"]] for r in rows if len(table[r["prompt_id"]]["scores"].get(metric, [])) != k]
    if not todo:
        return
    for start in progress(range(0, len(todo), chunk), desc=metric):
        part = todo[start:start + chunk]
        prompts = [row["prompt"] for row in part for _ in row["images"]]
        paths = [bench_dir / p for row in part for p in row["images"]]
        values = scorer(prompts, [load_image(p, where=str(bench_dir)) for p in paths], names=paths)  # NaN: an error naming it
        for i, row in enumerate(part):
            row["scores"][metric] = values[i * k:(i + 1) * k]
    write_jsonl_atomic(bench_dir / "scores.jsonl", table.values())
    log.info("%s: %s scored for %d prompts", bench_dir, metric, len(todo))


def per_prompt(bench_dir, metric):
    return {pid: float(np.mean(r["scores"][metric])) for pid, r in read_scores(bench_dir).items() if r["scores"].get(metric)}


def report(out, group, members, metrics, settings, args):
    """Table, grid and plot across every checkpoint evaluated under `out` with the same settings."""
    models = sorted({d.parent.parent.name for name, _ in members for d in out.glob(f"*/{name}/eval.json")
                     if json.loads(d.read_text())["generation"] == settings}, key=model_order)
    if not models:
        return
    cols, values = [], {}
    for name, rows in members:
        for m in metrics:
            label, dec, _ = METRICS[m]
            cols.append(((name, m), f"{SHORT.get(name, name)} {label}" if len(members) > 1 else label, dec))
            values[(name, m)] = {model: per_prompt(out / model / name, m) for model in models}
    ref = "base" if "base" in models else models[0]
    stats = reports.compare(values, models, ref, args.bootstrap)
    title = f"{group}: {', '.join(models)} ({settings['sampler']} {settings['steps']} steps, cfg {settings['cfg']})"
    table = reports.markdown_table(title, cols, models, stats, ref)
    files.write_text_atomic(out / f"table_{group}.md", table)
    log.info("\n%s", table)
    series = {}
    for (name, m), _, _ in cols:
        series.setdefault(METRICS[m][0], {})[SHORT.get(name, name)] = [
            (s["mean"], *s["ci95"]) if (s := stats[(name, m)]["summary"].get(model)) else None for model in models]
    reports.plot_metrics(series, models, out / f"plot_{group}.png", title=group)
    for name, rows in members:
        paths = ((r["prompt"], [out / m / name / "images" / image_name(r["prompt_id"], 0) for m in models]) for r in rows)
        grid = [row for row in paths if all(p.is_file() for p in row[1])][:args.grid_rows]
        if grid:
            reports.image_grid(grid, models, out / f"grid_{name}.png")
    log.info("wrote %s/table_%s.md, plot_%s.png, grid_*.png", out, group, group)


def fit(image, size):
    """Short side to `size`, then a centre crop: the square the model was trained at."""
    scale = size / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def reward_accuracy(args, ckpts, out, device):
    pairs = read_pairs(args.reward_accuracy)
    modes = {"yes": [True], "no": [False], "both": [True, False]}[args.common_draws]
    setting = dict(pairs=str(Path(args.reward_accuracy).resolve()), n=len(pairs), draws=args.draws, modes=modes,
                   beta=args.beta, seed=args.seed, resolution=args.resolution,
                   **({} if args.draw_schemes == ["iid"] else dict(schemes=args.draw_schemes)))
    for name, desc in ckpts.items():
        path = out / name / "reward_accuracy.json"
        if path.is_file():
            same = json.loads(path.read_text())["setting"] == setting
            log.info("%s: %s", path, "there already" if same else "made with other settings, replacing it")
            if same:
                continue
        preset, res = preset_of(desc), args.resolution or preset_of(desc)["resolution"]
        dtype = inference_dtype(device, preset["mixed_precision"])
        pipe = load_pipeline(desc, device, dtype, sampler="ddpm", encoding=True)  # as 02_self_reward
        ref = load_unet(dataclasses.replace(desc, unet=None, ckpt=None), dtype).to(device).eval()
        margins = {(k, c, scheme): [] for k in args.draws for c in modes for scheme in args.draw_schemes}
        for i, pair in enumerate(progress(pairs, desc=f"reward {name}")):
            images = [fit(load_image(pair[f"_image_{s}"]), res) for s in "wl"]
            latents, cond = encode_images(pipe.vae, images, device).to(dtype), encode_prompts(pipe, [pair["prompt"]], device)
            for (k, common, scheme), found in margins.items():
                r, _ = self_rewards(pipe.unet, ref, pipe.scheduler, latents, cond, res, draws=k, beta=args.beta,
                                    common_draws=common, seed=derive_seed(args.seed, "pair", i),
                                    batch_size=preset["reward_batch"], scheme=scheme)
                found.append(float(r[0] - r[1]))
        write_json_atomic(path, dict(setting=setting, checkpoint=name, results=[
            dict(method=f"self-reward K={k} {'common' if c else 'own'} draws" + ("" if scheme == "iid" else f" {scheme}"),
                 **reports.pair_accuracy(m, args.bootstrap))
            for (k, c, scheme), m in margins.items()]))
        del pipe, ref
        free_memory()
    results = {p.parent.name: json.loads(p.read_text())["results"] for p in
               sorted(out.glob("*/reward_accuracy.json"), key=lambda p: model_order(p.parent.name))
               if json.loads(p.read_text())["setting"] == setting}
    for metric in args.metrics or []:  # the external scorers of Figure 5 on the same pairs
        scorer = load_scorer(metric, device, dict(args.scorer_path).get(metric), args.score_batch)
        margins = [np.subtract(*scorer([p["prompt"]] * 2, [load_image(p["_image_w"]), load_image(p["_image_l"])],
                                       names=[p["_image_w"], p["_image_l"]])) for p in progress(pairs, desc=metric)]
        results.setdefault("scorers", []).append(dict(method=metric, **reports.pair_accuracy(margins, args.bootstrap)))
    table = reports.accuracy_table(f"Accuracy on {len(pairs)} human pairs of {args.reward_accuracy}", results)
    files.write_text_atomic(out / "reward_accuracy.md", table)
    log.info("\n%s", table)


def evaluate(args, ckpts, out, device):
    """Benchmark mode: images, then scores (one metric model at a time), then eval.json and reports."""
    first = next(iter(ckpts.values()))
    chosen = settle(argparse.Namespace(**vars(args)), preset_of(first), "eval")  # the first checkpoint's preset
    settings = dict(sampler=chosen.sampler, steps=chosen.steps, cfg=chosen.cfg, resolution=chosen.resolution,
                    seed=args.seed, images_per_prompt=args.images_per_prompt)
    metrics = args.metrics or PRESET_METRICS.get(first.preset, PAPER_METRICS)
    for metric in metrics:
        check_metric(metric)
    groups = {spec: [(n, rows[:args.limit] if args.limit else rows) for n, rows in read_benchmark(spec, args.run)]
              for spec in args.benchmark}
    benches = [b for members in groups.values() for b in members]
    log.info("checkpoints %s | benchmarks %s | metrics %s | %s", ", ".join(ckpts), ", ".join(n for n, _ in benches),
             ", ".join(metrics), settings)
    for name, desc in ckpts.items():
        pipe_cache = {}
        for bench, rows in benches:
            generate(desc, out / name / bench, rows, settings, chosen.gen_batch, device, pipe_cache)
        del pipe_cache
        free_memory()
    for metric in metrics:
        scorer = LazyScorer(metric, device=device, path=dict(args.scorer_path).get(metric),
                                    batch_size=args.score_batch)
        for name in ckpts:
            for bench, rows in benches:
                score(scorer, metric, out / name / bench, rows, settings)
        del scorer
        free_memory()
    for name, desc in ckpts.items():
        for bench, rows in benches:
            values = {m: per_prompt(out / name / bench, m) for m in metrics}
            write_json_atomic(out / name / bench / "eval.json", dict(
                benchmark=bench, checkpoint=name, generation=settings, n_prompts=len(rows),
                model={k: getattr(desc, k) for k in ("ckpt", "base_model", "preset", "iteration")}, per_prompt_scores="scores.jsonl",
                metrics={m: reports.summarize([v[r["prompt_id"]] for r in rows], args.bootstrap) for m, v in values.items()}))
    for group, members in groups.items():
        report(out, group if group in GROUPS else members[0][0], members, metrics, settings, args)


def main(args):
    device = pick_device(args.device)
    args.scorer_path = [tuple(kv.split("=", 1)) for kv in args.scorer_path]
    if any(len(kv) != 2 for kv in args.scorer_path):
        raise SailError("--scorer-path takes METRIC=PATH")
    ckpts = resolve_checkpoints(args)
    out = (Path(args.out) if args.out else Path(args.run) / "eval" if args.run else
           next((Path(d.ckpt).resolve().parent.parent / "eval" for d in ckpts.values() if d.ckpt), None))
    if out is None:
        raise SailError("--out (or --run) is needed when no checkpoint folder of a run is given")
    with folder_lock(out, "05_eval"):
        setup_logging(out, "05_eval")
        save_args(out, "05_eval", args, device=str(device))
        (reward_accuracy if args.reward_accuracy else evaluate)(args, ckpts, out, device)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()  # a no-op where CUDA was never used


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", action="append", help="checkpoint folder, preset name or pipeline folder (repeatable)")
    p.add_argument("--run", help="run folder: evaluates its base model and every iter_*/ckpt unless --ckpt is given")
    p.add_argument("--out", help="output folder (default <run>/eval)")
    p.add_argument("--reward-accuracy", metavar="PAIRS.jsonl", help="measure the self-reward's accuracy on these human pairs")
    p.add_argument("--metrics", nargs="+", help=f"from {', '.join(METRICS)} (default: by preset)")
    return add_arguments(p, "eval")


if __name__ == "__main__":
    run_stage(main, build_parser().parse_args())
