"""DiffusionDPO on a pair file: the preference-optimisation step of every SAIL iteration.

The start model is also the frozen reference (the paper's setting: iteration i trains from
epsilon^i with epsilon^i as reference). Each pair's two images get the same crop, flip,
timestep and noise; the preferred and dispreferred halves go through the UNet as one batch,
the reference runs once per batch without gradients. Loss: sail/dpo.py (beta 5000).

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
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from sail import batches, common, dpo, files, models, optim, settings, training, validation
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
    job = setup(args)
    for step in common.progress(range(job.start_step, job.total_steps), initial=job.start_step, total=job.total_steps,
                                   desc="train"):
        totals = train_step(job, step)
        log_and_save(job, step, totals)
    finish(job)


def setup(args):
    """Settle the arguments, read the pairs, load the models, and start afresh or resume: the job."""
    init = models.describe_model(args.init)
    preset = settings.get_preset(args.preset or init.preset or "sd15")
    settings.settle(args, preset, "train")  # what the command line left unset: accelerate's, the preset's, derived
    if args.lora_rank < 0:
        raise common.SailError(f"--lora-rank {args.lora_rank}: expected 0 (whole UNet) or a positive rank")
    args.lora_alpha = (args.lora_alpha or float(args.lora_rank)) if args.lora_rank else None
    if args.keep_states < 1:
        raise common.SailError(f"--keep-states {args.keep_states}: keep at least 1")
    out = Path(args.out)
    accelerator = training.make_accelerator(args.mixed_precision, args.report_to, out.parent)
    if accelerator.is_main_process:
        common.setup_logging(out.parent, "train")
    pairs = files.read_pairs(args.pairs)
    for i, row in enumerate(pairs):
        row["_index"], row["_file"] = i, str(args.pairs)
    per_process = args.batch_size // accelerator.num_processes
    if per_process * accelerator.num_processes != args.batch_size or per_process < 1:
        raise common.SailError(f"--batch-size {args.batch_size} must be a multiple of the {accelerator.num_processes} processes")
    job = SimpleNamespace(args=args, init=init, preset=preset, accelerator=accelerator, device=accelerator.device, out=out,
                          pairs=pairs, partial=out.with_name(out.name + ".partial"),
                          micro=training.micro_batch(args.micro_batch or per_process, per_process),
                          total_steps=args.max_steps or max(1, math.ceil(args.epochs * len(pairs) / args.batch_size)),
                          window=[], start_step=0)
    training.configure_accumulation(accelerator, per_process // job.micro, job.micro, args.max_grad_norm)
    load_models(job)
    resume_or_start(job)
    job.counts = {src: sum(r["source"] == src for r in pairs) for src in ("human", "self")}
    log.info("DPO: %d pairs (%d human, %d self) from %s | init %s | %d steps x %d pairs | lr %.3g | beta %g | %s | "
             "%d process(es), %s, micro batch %d", len(pairs), job.counts["human"], job.counts["self"], args.pairs, args.init,
             job.total_steps, args.batch_size, args.lr, args.beta, args.optimizer, accelerator.num_processes,
             accelerator.distributed_type.value, job.micro)
    job.order = []
    for epoch in range(math.ceil(job.total_steps * args.batch_size / len(pairs)) + 1):
        seed = common.derive_seed(args.seed, "order", epoch)
        job.order += torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    uses = batches.future_uses(job.order, job.start_step, job.total_steps, args.batch_size, accelerator.process_index,
                             accelerator.num_processes)
    job.latent_cache = batches.LatentCache(uses, 0 if args.no_cache_latents else args.latent_cache_gb * 2**30)
    training.start_trackers(job)
    validation.start_validation(job, resumed=job.start_step > 0)
    job.timer = job.loop_start = time.time()
    return job


def load_models(job):
    """The pipeline (frozen VAE, text encoders; the reference UNet), the trained UNet (whole, or a
    LoRA on it whose adapter switched off is the reference), the optimizer and its schedule."""
    args, device = job.args, job.device
    job.frozen_dtype = models.inference_dtype(device, args.mixed_precision)
    job.pipe = pipe = models.load_pipeline(job.init, device, job.frozen_dtype, encoding=True)
    unet = models.load_unet(job.init, torch.float32)
    n_params = sum(p.numel() for p in unet.parameters())
    states = 3 * args.keep_states if args.save_every else 0  # each: the weights and AdamW's two moments
    files.check_free_space(job.out.parent, n_params * 4 * (2 + states), "the checkpoint and resumable states")
    if args.lora_rank:
        unet = add_lora(unet, lora_config(args.lora_rank, args.lora_alpha), args.seed).to(device)
        job.ref_unet, job.ref_dtype = unet, torch.float32  # unwrapped, so switching its adapter off never goes through DDP
        pipe.unet = None  # the second copy of the UNet is not needed
        log.info("LoRA rank %d alpha %g on %s: %d trainable of %d parameters", args.lora_rank, args.lora_alpha,
                 "/".join(LORA_TARGETS), sum(p.numel() for p in unet.parameters() if p.requires_grad), n_params)
    else:
        unet = unet.to(device)
        job.ref_unet, job.ref_dtype = pipe.unet.eval().requires_grad_(False), job.frozen_dtype  # the start model, frozen
    for module in (pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    models.speed_up(unet, args.compile, channels_last=args.channels_last)
    if not args.lora_rank:
        models.speed_up(job.ref_unet, args.compile, channels_last=args.channels_last)
    optimizer = optim.make_optimizer(args.optimizer, [p for p in unet.parameters() if p.requires_grad], args.lr,
                                         args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)))
    job.unet, job.optimizer, job.schedule = job.accelerator.prepare(unet, optimizer, schedule)
    job.noise_scheduler = dpo.forward_process(pipe.scheduler)


def resume_or_start(job):
    """Continue a killed run's state made with the same settings (other settings stop), or start one."""
    args, accelerator, partial = job.args, job.accelerator, job.partial
    if partial.exists() and args.restart and accelerator.is_main_process:
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    settings = training.training_settings(args, job.total_steps, job.out.parent)
    if (partial / "progress.json").is_file():
        if not (partial / "settings.json").is_file():
            raise common.SailError(f"{partial} records no settings.json, so it cannot be resumed safely: add --restart")
        files.check_settings(partial / "settings.json", settings, "add --restart to discard it")
        job.start_step, state = training.resume_state(partial)
        accelerator.load_state(str(state))
        if accelerator.is_main_process:
            training.trim_log(partial / "train_log.jsonl", job.start_step)
        log.info("resuming from %s at step %d", partial, job.start_step)
    elif accelerator.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "train_log.jsonl").write_text("")
        files.check_settings(partial / "settings.json", settings, "add --restart to discard it")
    if accelerator.is_main_process:
        files.save_args(job.out.parent, "train", args, num_processes=accelerator.num_processes, num_pairs=len(job.pairs))


def train_step(job, step):
    """One optimizer step on --batch-size pairs, in micro batches accumulated by accelerate (equal micro
    batches, so its mean of means is the mean over pairs); returns the batch's mean loss, implicit
    accuracy and reward margin, and the gradient norm before clipping."""
    args, accelerator, device = job.args, job.accelerator, job.device
    step_rows = [job.pairs[i] for i in job.order[step * args.batch_size:(step + 1) * args.batch_size]]
    mine = step_rows[accelerator.process_index::accelerator.num_processes]
    stats = []
    accelerator.step = 0  # this step's micro batches count from 0 whatever the micro batch of an earlier start
    for m in range(0, len(mine), job.micro):
        rows = mine[m:m + job.micro]
        prompts = ["" if random.Random(common.derive_seed(args.seed, "empty", step, r["_index"])).random() < args.empty_prompt_prob
                   else r["prompt"] for r in rows]
        latents = batches.pair_latents(job, rows)
        # noise and timestep depend on (step, pair) only: the same for any number of processes
        gens = [torch.Generator().manual_seed(common.derive_seed(args.seed, "noise", step, r["_index"])) for r in rows]
        noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in gens]).to(device)
        t = torch.cat([torch.randint(0, job.noise_scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens])
        cond = batches.encode_prompts(job.pipe, prompts, device)
        with accelerator.accumulate(job.unet), training.autocast(job):
            result = dpo.dpo_micro_batch(job.unet, job.ref_unet, job.noise_scheduler, latents, noise, t.to(device),
                                               cond, args.resolution, args.beta, job.ref_dtype,
                                               lora_reference=bool(args.lora_rank))
            accelerator.backward(result.loss)  # divided by the number of micro batches
        stats.append([x.item() * len(rows) for x in result[:3]])
    finite = torch.tensor([1.0 if all(math.isfinite(s[0]) for s in stats) else 0.0], device=device)
    if accelerator.reduce(finite, "min").item() < 1:
        raise common.SailError(f"non-finite DPO loss at step {step} (lr {args.lr:g}, beta {args.beta:g}); "
                                  f"no checkpoint written. Lower --lr or use --mixed-precision no/bf16")
    grad_norm = accelerator.clip_grad_norm_(job.unet.parameters(), args.max_grad_norm) if args.max_grad_norm else None
    job.optimizer.step()
    job.schedule.step()
    job.optimizer.zero_grad(set_to_none=True)
    totals = (accelerator.reduce(torch.tensor([sum(c) for c in zip(*stats)], device=device), "sum") / args.batch_size).tolist()
    return totals + [float("nan") if grad_norm is None else float(grad_norm)]


def log_and_save(job, step, totals):
    """Log the mean of the last --log-every steps (log, train_log.jsonl, trackers); every --save-every
    steps, the resumable state; every --validation-every steps and at the end, validation images."""
    args, accelerator, partial = job.args, job.accelerator, job.partial
    job.window.append(totals)
    if accelerator.is_main_process and ((step + 1) % args.log_every == 0 or step + 1 == job.total_steps):
        mean = [sum(col) / len(job.window) for col in zip(*job.window)]
        rate = len(job.window) * args.batch_size / (time.time() - job.timer)
        row = dict(step=step + 1, loss=round(mean[0], 5), implicit_acc=round(mean[1], 4), reward_margin=round(mean[2], 4),
                   lr=job.schedule.get_last_lr()[0], pairs_per_s=round(rate, 2))
        row.update({"grad_norm": round(mean[3], 5)} if math.isfinite(mean[3]) else {}, **files.peak_memory())
        log.info("step %d/%d loss %.4f implicit_acc %.3f margin %.3f lr %.3g | %.1f pairs/s",
                 step + 1, job.total_steps, mean[0], mean[1], mean[2], row["lr"], rate)
        with open(partial / "train_log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step + 1)
        job.timer, job.window = time.time(), []
    if job.validation and ((step + 1) % args.validation_every == 0 or step + 1 == job.total_steps):
        validation.validate(job, step + 1)
    if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < job.total_steps:
        training.save_state(job, step + 1, args.keep_states)


def finish(job):
    """Write the checkpoint (the LoRA merged in, the adapter beside it) with where it came from."""
    args, accelerator, init, partial, out = job.args, job.accelerator, job.init, job.partial, job.out
    accelerator.wait_for_everyone()
    model = training.whole_unet(job, args.lora_rank and (lambda unet: add_lora(unet, lora_config(args.lora_rank, args.lora_alpha), args.seed)))
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    timing = files.save_timing(out.parent, "train", (job.total_steps - job.start_step) * args.batch_size, "pairs",
                                   time.time() - job.loop_start)
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
