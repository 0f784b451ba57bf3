"""The DPO training job that 04_train.py runs: `start(args)` settles the arguments, reads the pairs,
loads the models and starts afresh or resumes; `train_step(job, step)` trains one optimizer step and
returns its metrics by name. 04_train.py keeps the loop, the logging, the states and the checkpoint;
bench/speed.py times the same two functions.
"""
import logging
import math
import random
import shutil
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sail import batches, common, dpo, files, memory, models, optim, settings, training, validation
from sail.lora import LORA_TARGETS, add_lora, lora_config

log = logging.getLogger("sail")
METRICS = ("loss", "implicit_acc", "reward_margin")  # the fields of dpo.DPOOutput a step reports


class StepMetrics(NamedTuple):
    """One optimizer step: the means over its pairs, and the gradient norm before clipping (nan without clipping)."""
    loss: float
    implicit_acc: float
    reward_margin: float
    grad_norm: float


@dataclass(eq=False, slots=True)
class Job:
    """A training run in progress: what start() settles and loads, and what every step reads."""
    args: Namespace                 # 04_train.py's arguments, settled (preset defaults, device choices)
    init: models.ModelDescription   # the start model, which is also the frozen reference
    preset: dict                    # the preset's settings (validation images draw with its sampler)
    accelerator: Any                # accelerate's Accelerator: processes, precision, accumulation, trackers
    device: torch.device            # this process's device
    out: Path                       # the checkpoint folder to write
    partial: Path                   # <out>.partial: resumable states, recorded settings and the train log while running
    pairs: list                     # the pair file's rows, each with its _index and _file
    counts: dict                    # pairs per source: {"human": n, "self": n}
    micro: int                      # pairs per forward pass and process
    total_steps: int                # optimizer steps of the whole run
    start_step: int = 0             # the first step this start trains (after a resumed state's)
    order: list = None              # pair indices in training order: one shuffle per epoch, one after another
    frozen_dtype: torch.dtype = None  # precision of the frozen models (text encoders, VAE, reference UNet)
    pipe: Any = None                # the pipeline: tokenizers, text encoders, VAE, reference UNet (none with LoRA)
    unet: Any = None                # the trained UNet, prepared by accelerate
    ref_unet: Any = None            # the reference: the frozen start UNet, or with LoRA the trained one, adapter off
    ref_dtype: torch.dtype = None   # precision the reference runs in
    optimizer: Any = None           # the optimizer, prepared by accelerate
    schedule: Any = None            # the learning-rate warm-up, stepped once per optimizer step
    noise_scheduler: Any = None     # DDPM's forward process (dpo.forward_process)
    latent_cache: batches.LatentCache = None  # VAE latents of pairs this process sees again
    images: Any = None              # the image loader's iterator (batches.image_loader), made at the first step
    validation: dict = None         # validation prompts, seeds and sampler (sail/validation.py), or None


def start(args):
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
    settle_device_choices(args, preset, init.arch, accelerator, per_process)
    job = Job(args=args, init=init, preset=preset, accelerator=accelerator, device=accelerator.device, out=out,
              partial=out.with_name(out.name + ".partial"), pairs=pairs, micro=args.micro_batch,
              counts={src: sum(r["source"] == src for r in pairs) for src in ("human", "self")},
              total_steps=args.max_steps or max(1, math.ceil(args.epochs * len(pairs) / args.batch_size)))
    training.configure_accumulation(accelerator, per_process // job.micro, job.micro, args.max_grad_norm)
    load_models(job)
    resume_or_start(job)
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
    return job


def settle_device_choices(args, preset, arch, accelerator, per_process):
    """The choices that depend on this process's device: the micro batch and gradient checkpointing
    (from the GPU's memory, sail/memory.py; on the CPU the preset's) and the image loader's workers. Each
    flag given stays as given."""
    device = accelerator.device
    memory_gib = memory.device_memory_gib(device)
    micro, checkpointing = memory.choose(arch, memory_gib, per_process, preset.get("micro_batch", per_process),
                                         preset.get("gradient_checkpointing", False), args.optimizer, args.resolution,
                                         args.mixed_precision, micro=args.micro_batch, checkpointing=args.gradient_checkpointing)
    if memory_gib is not None and (args.micro_batch is None or args.gradient_checkpointing is None):
        log.info("micro batch %d, gradient checkpointing %s: chosen for %.0f GiB of GPU memory (--micro-batch and "
                 "--[no-]gradient-checkpointing choose otherwise)", micro, "on" if checkpointing else "off", memory_gib)
    args.micro_batch, args.gradient_checkpointing = training.micro_batch(micro, per_process), checkpointing
    if args.num_workers is None:
        args.num_workers = batches.default_workers(device, accelerator.num_processes)
    if args.num_workers < 0:
        raise common.SailError(f"--num-workers {args.num_workers}: give 0 (read images in the training thread) or more")


def load_models(job):
    """The pipeline (frozen VAE, text encoders; the reference UNet), the trained UNet (whole, or a
    LoRA on it whose adapter switched off is the reference), the optimizer and its schedule."""
    args, device = job.args, job.device
    job.frozen_dtype = models.inference_dtype(device, args.mixed_precision)
    job.pipe = pipe = models.load_pipeline(job.init, device, job.frozen_dtype, encoding=True, vae_fp32=args.vae_fp32)
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
    recorded = training.training_settings(args, job.total_steps, job.out.parent)
    if (partial / "progress.json").is_file():
        if not (partial / "settings.json").is_file():
            raise common.SailError(f"{partial} records no settings.json, so it cannot be resumed safely: add --restart")
        files.check_settings(partial / "settings.json", recorded, "add --restart to discard it")
        job.start_step, state = training.resume_state(partial)
        accelerator.load_state(str(state))
        if accelerator.is_main_process:
            training.trim_log(partial / "train_log.jsonl", job.start_step)
        log.info("resuming from %s at step %d", partial, job.start_step)
    elif accelerator.is_main_process:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "train_log.jsonl").write_text("")
        files.check_settings(partial / "settings.json", recorded, "add --restart to discard it")
    if accelerator.is_main_process:
        files.save_args(job.out.parent, "train", args, num_processes=accelerator.num_processes, num_pairs=len(job.pairs))


def train_step(job, step):
    """One optimizer step on --batch-size pairs, in micro batches accumulated by accelerate (equal micro
    batches, so its mean of means is the mean over pairs). The metrics add up on the device and reach the
    host once per step, before the optimizer step, which a non-finite loss stops. Returns StepMetrics."""
    args, accelerator = job.args, job.accelerator
    accelerator.step = 0  # this step's micro batches count from 0 whatever the micro batch of an earlier start
    sums = torch.zeros(1 + len(METRICS), dtype=torch.float64, device=job.device)  # non-finite losses, metric x pairs
    try:
        for m, indices in enumerate(batches.micro_batches(job.order, step, args.batch_size, accelerator.process_index,
                                                          accelerator.num_processes, job.micro)):
            result = micro_step(job, step, m, indices)
            sums += torch.stack([(~torch.isfinite(result.loss.detach())).double()]
                                + [getattr(result, name).detach().double() * len(indices) for name in METRICS])
        grad_norm = accelerator.clip_grad_norm_(job.unet.parameters(), args.max_grad_norm) if args.max_grad_norm else None
        total = accelerator.reduce(sums.float(), "sum")
        values = torch.cat([total[:1], total[1:] / args.batch_size]).double()
        values = torch.cat([values, norm_tensor(grad_norm, job.device)]).tolist()  # the step's one wait for the device
        if values[0] > 0:
            raise common.SailError(f"non-finite DPO loss at step {step} (lr {args.lr:g}, beta {args.beta:g}); "
                                   f"no checkpoint written. Lower --lr or use --mixed-precision no/bf16")
        job.optimizer.step()
        job.schedule.step()
        job.optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError:
        raise common.SailError(memory.out_of_memory_message(step, job.micro, args.gradient_checkpointing)) from None
    return StepMetrics(*values[1:])


def micro_step(job, step, m, indices):
    """Forward and backward pass of micro batch m of `step` (its loss divided by the number of micro
    batches, by accelerate): the DPOOutput. Empty captions, noise and timestep depend on (step, pair) only."""
    args, accelerator, device = job.args, job.accelerator, job.device
    rows = [job.pairs[i] for i in indices]
    prompts = ["" if random.Random(common.derive_seed(args.seed, "empty", step, r["_index"])).random() < args.empty_prompt_prob
               else r["prompt"] for r in rows]
    latents = batches.pair_latents(job, rows, loaded_images(job, step, m))
    # the same for any number of processes and micro batches
    gens = [torch.Generator().manual_seed(common.derive_seed(args.seed, "noise", step, r["_index"])) for r in rows]
    noise = torch.cat([torch.randn((1, *latents.shape[1:]), generator=g) for g in gens]).to(device)
    t = torch.cat([torch.randint(0, job.noise_scheduler.config.num_train_timesteps, (1,), generator=g) for g in gens])
    cond = batches.encode_prompts(job.pipe, prompts, device)
    with accelerator.accumulate(job.unet), training.autocast(job):
        result = dpo.dpo_micro_batch(job.unet, job.ref_unet, job.noise_scheduler, latents, noise, t.to(device),
                                     cond, args.resolution, args.beta, job.ref_dtype, lora_reference=bool(args.lora_rank))
        accelerator.backward(result.loss)
    return result


def loaded_images(job, step, m):
    """The image loader's (pair indices, uint8 images) for micro batch m of `step`. A step asked for out
    of training order (a benchmark timing steps on its own) starts the loader again from that step."""
    for _ in range(2):
        if job.images is None:
            job.images = batches.image_loader(job, step)
        key, images, error = next(job.images, (None, None, None))
        if key is not None and tuple(key[:2]) == (step, m):
            if error is not None:
                raise error
            return key[2], images
        job.images = None
    raise common.SailError(f"the image loader has no micro batch {m} of step {step} (the run has {job.total_steps} steps)")


def norm_tensor(grad_norm, device):
    """The gradient norm as a float64 tensor of one value on the device (nan where nothing was clipped)."""
    if grad_norm is None:
        return torch.full((1,), math.nan, dtype=torch.float64, device=device)
    if hasattr(grad_norm, "full_tensor"):  # FSDP2 returns it as a DTensor
        grad_norm = grad_norm.full_tensor()
    return torch.as_tensor(grad_norm, device=device).detach().double().reshape(1)
