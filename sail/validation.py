"""Validation images during training: fixed prompts drawn on fixed seeds with the start model and
then every --validation-every steps, saved per step and as one grid, and sent to the trackers.
"""
import contextlib
import logging
import shutil
from pathlib import Path

import torch
from PIL import Image

from sail import common, dpo, files, generation, models
from sail.training import autocast

log = logging.getLogger("sail")


def validation_prompts(spec, pairs):
    """--validation-prompts: N (the first N distinct prompts of the pair file) or a prompt file
    ({"prompt_id", "prompt"} per line, as the prompt pools)."""
    if spec.isdigit():
        prompts = list(dict.fromkeys(r["prompt"] for r in pairs))[:int(spec)]
        if not prompts:
            raise common.SailError(f"--validation-prompts {spec}: give at least 1 prompt")
        return prompts
    return [r["prompt"] for r in files.read_prompts(spec)]


def start_validation(job, resumed):
    """Fix the prompts and seeds, record them (validation/settings.json), and draw the start model's
    column unless a resumed run has it. A fresh start discards an earlier start's images."""
    args, preset, accelerator = job.args, job.preset, job.accelerator
    job.validation = None
    if not args.validation_every:
        return
    folder = job.out.parent / files.VALIDATION_DIR
    if not resumed and folder.exists() and accelerator.is_main_process:
        log.info("discarding %s: it belongs to an earlier start of this training", folder)
        shutil.rmtree(folder)
    prompts = validation_prompts(args.validation_prompts, job.pairs)
    job.validation = dict(folder=folder, prompts=prompts, seeds=[common.derive_seed(args.seed, "validation", i) for i in range(len(prompts))],
                          sampler=preset.get("sampler", "ddim"), steps=preset.get("steps", 20), cfg=preset.get("cfg", 5.0),
                          batch=preset.get("gen_batch", 8))
    if accelerator.is_main_process:
        settings = {k: v for k, v in job.validation.items() if k != "folder"}
        files.check_settings(folder / "settings.json", dict(settings, resolution=args.resolution), f"delete {folder}")
    accelerator.wait_for_everyone()
    if not complete(column_dir(job, 0), len(prompts)):
        validate(job, 0)


def column_dir(job, step):
    return job.validation["folder"] / f"step-{step:06d}"


def complete(folder, n):
    return all((folder / f"{i:03d}.png").is_file() for i in range(n))


def validate(job, step):
    """Draw the validation prompts with the weights of `step` (0: the start model) on their fixed seeds,
    save them, rebuild grid.png (rows: prompts; columns: start, then each drawn step) and send it to the
    trackers. Every process draws (a sharded model needs them all); the main process writes.
    Generation has its own generators, and torch's global RNG is restored after it."""
    v, accelerator = job.validation, job.accelerator
    images = []
    devices = [job.device] if job.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), drawing_pipe(job, start=step == 0) as pipe, autocast(job):
        for _, batch in generation.draw_images(pipe, v["prompts"], v["seeds"], v["steps"], v["cfg"], job.args.resolution,
                                           v["batch"], label="validation"):
            images += batch
    if not accelerator.is_main_process:
        return
    folder = column_dir(job, step)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        files.save_image_atomic(img, folder / f"{i:03d}.png")
    grid, steps = write_grid(v["folder"], len(images), job.args.resolution)
    log.info("validation images of step %d: %s (columns: steps %s)", step, folder, steps)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np
            tracker.log_images({"validation": np.asarray(grid)[None]}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [grid]}, step)


@contextlib.contextmanager
def drawing_pipe(job, start):
    """job.pipe with the model to draw with: the start model (for full training the frozen reference,
    for a LoRA the UNet with its adapter off) or the trained UNet as it is now; and a fresh sampler, so
    that the training's noise scheduler is not touched."""
    from accelerate.utils import DistributedType
    pipe, accelerator = job.pipe, job.accelerator
    fsdp1 = accelerator.distributed_type == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False)
    trained = job.unet if fsdp1 else accelerator.unwrap_model(job.unet)
    saved = pipe.unet, pipe.scheduler
    models.use_sampler(pipe, job.validation["sampler"])
    lora_off = start and job.args.lora_rank
    if not (start and saved[0] is not None):
        pipe.unet = trained
    trained.eval()
    try:
        with dpo.adapters_off(accelerator.unwrap_model(job.unet)) if lora_off else contextlib.nullcontext():
            yield pipe
    finally:
        pipe.unet, pipe.scheduler = saved
        trained.train()


def write_grid(folder, n_prompts, resolution):
    """validation/grid.png from every complete column (rows: prompts, columns: steps, start first) and
    grid.json naming the columns; returns the grid image and its steps."""
    columns = sorted(p for p in Path(folder).glob("step-*") if p.is_dir() and complete(p, n_prompts))
    steps = [int(p.name.split("-")[1]) for p in columns]
    grid = Image.new("RGB", (len(columns) * resolution, n_prompts * resolution), "white")
    for c, column in enumerate(columns):
        for r in range(n_prompts):
            with Image.open(column / f"{r:03d}.png") as img:
                grid.paste(img.convert("RGB").resize((resolution, resolution)), (c * resolution, r * resolution))
    files.save_image_atomic(grid, Path(folder) / "grid.png")
    files.write_json_atomic(Path(folder) / "grid.json", {"columns": ["start" if s == 0 else f"step {s}" for s in steps],
                                                            "steps": steps})
    return grid, steps
