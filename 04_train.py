"""DiffusionDPO on a pair file: the preference-optimisation step of every SAIL iteration.

The start model is also the frozen reference (the paper's setting: iteration i trains from
epsilon^i with epsilon^i as reference). Each pair's two images get the same crop, flip,
timestep and noise; the preferred and dispreferred halves go through the UNet as one batch,
the reference runs once per batch without gradients. Loss: sail/dpo.py (beta 5000). The job (its
settings, models and one optimizer step) is sail/trainer.py's start and train_step; this file runs
the loop, logs, saves the resumable states and writes the checkpoint.

The whole UNet is trained by default, as in the paper and DiffusionDPO. --lora-rank R trains a
LoRA of rank R on the attention projections instead (needs `pip install peft`): the reference is
then the same UNet with its adapter switched off, so only one UNet is in memory, and the
adapter is merged into the weights on save, so the checkpoint is an ordinary full UNet that
the next iteration starts from (with a fresh LoRA on top).

Commands (iteration i of a run; iteration 0 is the seed DPO, see 00_seed_dpo.py):
    python 04_train.py --run runs/toy --iter 1
is short for
    python 04_train.py --init runs/toy/iter_00/ckpt --pairs runs/toy/iter_01/train_pairs.jsonl \
        --out runs/toy/iter_01/ckpt
Several GPUs: `accelerate launch 04_train.py ...` (the effective batch stays --batch-size pairs; FSDP
and DeepSpeed configs for 8 GPUs in configs/, see docs/training.md). Trackers: --report-to tensorboard
(`tensorboard --logdir runs/toy/iter_01/tracker`); images during training: --validation-every 50.

Reads:  the pair file and its images; the start checkpoint (ckpt/unet + sail.json) or, for
        iteration 0, the preset's base model.
Writes: <out>/unet/ (diffusers safetensors), <out>/sail.json (where it came from),
        <out>/train_log.jsonl; with --lora-rank also <out>/lora/, the adapter alone, for a pipeline
        of the start model (`pipe.load_lora_weights("<out>/lora")`); train.args.json, log.txt and
        train.timing.json beside <out>, and there with --report-to tracker/, with
        --validation-every validation/ (images per drawn step, grid.png). While it runs,
        <out>.partial/ holds a resumable state every --save-every steps (state-<step>/, the newest
        --keep-states of them) and the settings that decide the weights; a killed run continues
        from the newest state when rerun with the same settings (other ones stop it; --restart
        discards the state). A finished <out> is never overwritten.

Learning rate: DiffusionDPO's scaled rule, lr = 1e-8 per pair x effective batch (128 -> 1.28e-6).
"""
import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

from sail import common, files, models, settings, trainer, training, validation
from sail.lora import LORA_TARGETS, add_lora, lora_config, save_lora

log = logging.getLogger("sail")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder; with --iter, sets --init/--pairs/--out")
    p.add_argument("--iter", type=int, help="iteration number (0 = seed DPO on seed/pairs.jsonl)")
    p.add_argument("--preset", help="preset name (default: the start checkpoint's)")
    p.add_argument("--init", help="start and reference model: checkpoint folder, preset or pipeline")
    p.add_argument("--pairs", type=Path, help="pair file to train on")
    p.add_argument("--out", type=Path, help="checkpoint folder to write")
    p.add_argument("--export-pipeline", type=Path, help="also write a full diffusers pipeline folder here")
    return settings.add_arguments(p, "train")


def resolve_paths(args):
    if args.run is not None and args.iter is not None:
        it = args.iter
        if it == 0 and not (args.init or args.preset):
            raise common.SailError("iteration 0 starts from a base model: give --preset (or --init)")
        args.init = args.init or (args.preset if it == 0 else str(files.checkpoint_dir(args.run, it - 1)))
        args.pairs = args.pairs or (files.seed_pairs_path(args.run) if it == 0 else files.iteration_dir(args.run, it) / "train_pairs.jsonl")
        args.out = args.out or files.checkpoint_dir(args.run, it)
    if not (args.init and args.pairs and args.out):
        raise common.SailError("give --run and --iter, or all of --init, --pairs and --out")
    return args


def main(args):
    args = resolve_paths(args)
    if Path(args.out).exists():
        training.check_finished_settings(args, settings.compared_when_finished("train"))
        print(f"{args.out} is finished already; skipping (delete it to train again)")
        return
    job = trainer.start(args)
    window, since, started = [], time.time(), time.time()
    for step in common.progress(range(job.start_step, job.total_steps), initial=job.start_step, total=job.total_steps,
                                desc="train"):
        window.append(trainer.train_step(job, step))
        if (step + 1) % args.log_every == 0 or step + 1 == job.total_steps:
            log_metrics(job, step, window, time.time() - since)
            window, since = [], time.time()
        validate_and_save(job, step)
    finish(job, time.time() - started)


def log_metrics(job, step, window, seconds):
    """The means of the steps since the last log line, to the log, <out>.partial/train_log.jsonl and the trackers."""
    if not job.accelerator.is_main_process:
        return
    mean = {name: sum(getattr(metrics, name) for metrics in window) / len(window) for name in trainer.StepMetrics._fields}
    rate = len(window) * job.args.batch_size / seconds
    row = dict(step=step + 1, loss=round(mean["loss"], 5), implicit_acc=round(mean["implicit_acc"], 4),
               reward_margin=round(mean["reward_margin"], 4), lr=job.schedule.get_last_lr()[0], pairs_per_s=round(rate, 2))
    row.update({"grad_norm": round(mean["grad_norm"], 5)} if math.isfinite(mean["grad_norm"]) else {}, **files.peak_memory())
    log.info("step %d/%d loss %.4f implicit_acc %.3f margin %.3f lr %.3g | %.1f pairs/s",
             step + 1, job.total_steps, mean["loss"], mean["implicit_acc"], mean["reward_margin"], row["lr"], rate)
    with open(job.partial / "train_log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    job.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)


def validate_and_save(job, step):
    """Every --validation-every steps and at the end, validation images; every --save-every steps, the resumable state."""
    args = job.args
    if job.validation and ((step + 1) % args.validation_every == 0 or step + 1 == job.total_steps):
        validation.validate(job, step + 1)
    if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < job.total_steps:
        training.save_state(job, step + 1, args.keep_states)


def finish(job, seconds):
    """Write the checkpoint (the LoRA merged in, the adapter beside it) with where it came from."""
    args, accelerator, init, partial, out = job.args, job.accelerator, job.init, job.partial, job.out
    accelerator.wait_for_everyone()
    model = training.whole_unet(job, args.lora_rank and (lambda unet: add_lora(unet, lora_config(args.lora_rank, args.lora_alpha), args.seed)))
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    timing = files.save_timing(out.parent, "train", (job.total_steps - job.start_step) * args.batch_size, "pairs", seconds)
    iteration = args.iter if args.iter is not None else 0 if init.iteration is None else init.iteration + 1
    info = dict(base_model=init.base_model, arch=init.arch, preset=args.preset or init.preset,
                parent=init.ckpt or init.base_model, iteration=iteration, pairs=str(args.pairs), pair_counts=job.counts,
                steps=job.total_steps, effective_batch=args.batch_size, lr=args.lr, beta=args.beta, optimizer=args.optimizer,
                num_processes=accelerator.num_processes,
                lora=dict(rank=args.lora_rank, alpha=args.lora_alpha, target_modules=LORA_TARGETS) if args.lora_rank else None,
                args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    if args.lora_rank:
        shutil.rmtree(partial / "lora", ignore_errors=True)
        save_lora(model, partial / "lora", init.arch)
        model.fuse_lora()  # W += alpha / rank * B A, then plain layers again: an ordinary UNet2DConditionModel
        model.unload_lora()
    models.save_checkpoint(model, out, info)
    shutil.move(str(partial / "train_log.jsonl"), out / "train_log.jsonl")
    if args.lora_rank:
        shutil.move(str(partial / "lora"), out / "lora")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("wrote %s (%.1f pairs/s, peak RAM %.2f GiB%s)", out, timing["rate"], timing["peak_ram_gib"],
             f", peak GPU memory {timing['peak_gpu_gib']:.2f} GiB" if "peak_gpu_gib" in timing else "")
    if args.export_pipeline:
        models.export_pipeline(out, args.export_pipeline)
        log.info("wrote full pipeline %s", args.export_pipeline)


def locked_main(args):
    args = resolve_paths(args)
    with files.folder_lock(Path(args.out).parent, "train"):
        main(args)


if __name__ == "__main__":
    common.run_stage(locked_main, build_parser().parse_args())
