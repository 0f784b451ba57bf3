"""Candidate generation: N images for every prompt of an iteration's pool, with the current model.

Each image has its own seed, derive_seed(--seed, prompt_id, index), so a rerun reproduces it
bit for bit on the same hardware and batch size. Prompts are batched; a killed run, rerun,
generates only the images that are missing. Paper defaults come from the checkpoint's preset:
SD1.5 DDPM 50 steps CFG 7.5 at 512 px, SDXL DDIM 20 steps CFG 5 at 1024 px, N = 8.

Command (iteration i of a run):
    python 01_generate.py --run runs/toy --iter 1
is short for
    python 01_generate.py --ckpt runs/toy/iter_00/ckpt --pool runs/toy/pools/iter_01.jsonl --out runs/toy/iter_01
Several GPUs: `accelerate launch 01_generate.py ...` shards the images over processes; the files
are the same as from one process.

Reads:  the prompt pool ({"prompt_id", "prompt"} per line), the checkpoint and its base model;
        with --run, every pool, seed and eval prompt file of the run (they must be disjoint).
Writes: <out>/images/<prompt_id>_<index>.png, then <out>/generations.jsonl (one line per image:
        prompt_id, prompt, index, seed, image path relative to <out>), generate.args.json, log.txt,
        generate.settings.json (what decides the images: a rerun with other settings stops rather
        than mix images), generate.<rank>.timing.json.
"""
import argparse
import logging
import time
from pathlib import Path

from sail import common, files, generation, models, settings

log = logging.getLogger("sail")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder; with --iter, sets --ckpt/--pool/--out")
    p.add_argument("--iter", type=int, help="iteration number (1, 2, ...)")
    p.add_argument("--ckpt", help="model to sample from: checkpoint folder (or preset / pipeline)")
    p.add_argument("--pool", type=Path, help="prompt pool JSONL")
    p.add_argument("--out", type=Path, help="iteration folder to write images/ and generations.jsonl into")
    return settings.add_arguments(p, "generate")


def resolve_paths(args):
    if args.run is not None and args.iter is not None:
        args.ckpt = args.ckpt or str(files.checkpoint_dir(args.run, args.iter - 1))
        args.pool = args.pool or files.pool_path(args.run, args.iter)
        args.out = args.out or files.iteration_dir(args.run, args.iter)
    if not (args.ckpt and args.pool and args.out):
        raise common.SailError("give --run and --iter, or all of --ckpt, --pool and --out")
    return args


def main(args):
    state = models.process_state()
    args = resolve_paths(args)
    out = Path(args.out)
    if state.is_main_process:
        common.setup_logging(out, "generate")
    finished = out / "generations.jsonl"
    if finished.exists():
        log.info("%s exists; skipping generation (delete it to generate again)", finished)
        return
    desc = models.describe_model(args.ckpt)
    settings.settle(args, settings.get_preset(desc.preset or "sd15"), "generate")
    if args.run is not None:
        files.check_pools_disjoint(args.run)
    prompts = files.read_prompts(args.pool)[: args.limit]
    jobs = generation.candidate_jobs(prompts, args.num_candidates, args.seed)
    if state.is_main_process:  # what decides an image; a rerun with other settings stops rather than mix images
        generation.check_generation_settings(args, out)
        files.save_args(out, "generate", args, num_processes=state.num_processes, model=desc)
    state.wait_for_everyone()
    (out / "images").mkdir(parents=True, exist_ok=True)
    batches = generation.missing_batches(jobs, args.gen_batch, lambda job: out / job["image"])
    mine = batches[state.process_index::state.num_processes]  # whole batches: the same batches as one process draws
    todo = sum(len(batch) for batch in batches)
    files.check_free_space(out, todo * args.resolution ** 2 * 3 // 2, f"{todo} PNG images")  # PNG ~ half of raw
    log.info("%d prompts x %d candidates from %s: %d images in batches to draw (%d there already) | %s %d steps cfg %g %dpx",
             len(prompts), args.num_candidates, args.ckpt, todo, len(jobs) - todo, args.sampler, args.steps,
             args.cfg, args.resolution)

    if mine:
        dtype = models.inference_dtype(state.device, args.mixed_precision)
        pipe = models.load_pipeline(desc, state.device, dtype, sampler=args.sampler)
        pipe.unet = models.speed_up(pipe.unet, args.compile, args.fuse_qkv, args.channels_last)
        start = time.time()
        made = generation.draw_into(pipe, mine, out, args, f"generate[{state.process_index}]")
        timing = files.save_timing(out, f"generate.{state.process_index}", made, "images", time.time() - start)
        log.info("made %d images in %.1f s (%.2f images/s)", made, timing["seconds"], timing["rate"])

    state.wait_for_everyone()
    if state.is_main_process:
        missing = [j["image"] for j in jobs if not (out / j["image"]).is_file()]
        if missing:
            raise common.SailError(f"{len(missing)} images missing after generation, e.g. {out / missing[0]}")
        files.write_jsonl_atomic(finished, jobs)
        log.info("wrote %s (%d images)", finished, len(jobs))


def locked_main(args):
    args = resolve_paths(args)
    with files.folder_lock(args.out, "generate"):
        main(args)


if __name__ == "__main__":
    common.run_stage(locked_main, build_parser().parse_args())
