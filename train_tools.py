"""Training helpers of 04_train.py: experiment trackers, validation images drawn during training,
the latent cache, resumable states, gradient accumulation through accelerate,
mixed precision from an accelerate config, and the whole UNet of a sharded model.

Nothing here runs on its own (04_train.py's docstring says what training reads and writes). Beside
the checkpoint it adds <out parent>/tracker/ (TensorBoard events, wandb's local files) and
<out parent>/validation/ (a folder of images per drawn step, grid.png, grid.json). Docs: docs/training.md.
"""
import contextlib
import importlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

import dpo_maths
import run_files
import sail_models as models

log = logging.getLogger("sail")
TRACKER_PROJECT = "sail-dpo"
TRACKERS = ("tensorboard", "wandb")  # --report-to all: those of these that are installed


# ---------------------------------------------------------------- trackers and memory
def tracker_names(report_to):
    """--report-to -> accelerate's log_with list. accelerate drops a tracker whose package is missing
    without a word; the kit stops instead, naming what to install."""
    if report_to == "none":
        return []
    installed = [name for name in TRACKERS if _importable(name)]
    if report_to == "all":
        if not installed:
            raise run_files.SailError("--report-to all found neither tensorboard nor wandb: pip install tensorboard (or wandb)")
        return installed
    if report_to not in installed:
        raise run_files.SailError(f"--report-to {report_to} needs the {report_to} package, which is not installed: "
                                  f"pip install {report_to}")
    return [report_to]


def _importable(module):
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def start_trackers(job):
    """Open the trackers with the run's arguments as hyperparameters (TensorBoard: tracker/sail-dpo/)."""
    if not job.accelerator.log_with:
        return
    config = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in vars(job.args).items()}
    if job.accelerator.is_main_process:
        (job.out.parent / run_files.TRACKER_DIR).mkdir(parents=True, exist_ok=True)  # wandb's dir= must exist
    job.accelerator.init_trackers(TRACKER_PROJECT, config=config,
                                  init_kwargs={"wandb": {"name": str(job.out.parent), "dir": str(job.out.parent / run_files.TRACKER_DIR)}})


# ---------------------------------------------------------------- accelerate: precision, accumulation, saving
def make_accelerator(mixed_precision, report_to, folder):
    """The run's Accelerator: trackers logging under folder/tracker; a schedule stepped once per optimizer
    step (accelerate would step a prepared schedule once per process: a warm-up N times too short)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=tracker_names(report_to) or None,
                       step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(str(folder), logging_dir=str(Path(folder) / run_files.TRACKER_DIR)))


def mixed_precision_from_accelerate():
    """fp16/bf16 from `accelerate launch` (its config file or flag), else None (the preset decides).
    `accelerate launch` exports "no" also when there is no config at all, so "no" is not taken as a
    choice: pass --mixed-precision no to train in float32 under a config that says otherwise."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    return value if value in ("fp16", "bf16") else None


def micro_batch(wanted, per_process):
    """The largest micro batch <= wanted that divides the process's pairs: accelerate's accumulation
    weighs micro batches equally, so equal micro batches keep the loss the mean over pairs."""
    micro = max(m for m in range(1, min(wanted, per_process) + 1) if per_process % m == 0)
    if micro < wanted and wanted <= per_process:
        log.info("micro batch %d instead of %d: it must divide the %d pairs per process and step", micro, wanted, per_process)
    return micro


def configure_accumulation(accelerator, steps, micro, max_grad_norm):
    """Accumulate `steps` micro batches of `micro` pairs per optimizer step (before prepare). An accelerate
    config that sets another number stops: the kit derives it from --batch-size and --micro-batch."""
    from accelerate.utils import DistributedType
    theirs = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        theirs = theirs or (None if config.get("gradient_accumulation_steps", "auto") == "auto" else config["gradient_accumulation_steps"])
        config.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=steps, gradient_clipping=max_grad_norm)
    if theirs not in (None, "auto") and int(theirs) not in (1, steps):
        raise run_files.SailError(f"the accelerate config sets gradient_accumulation_steps {theirs}, but --batch-size, the "
                                  f"processes and --micro-batch make {steps} micro batches per step: remove it from the config")
    accelerator.gradient_accumulation_steps = steps


def autocast(job):
    """accelerate's autocast; under DeepSpeed (whose engine holds the UNet in half precision and leaves
    autocast off) torch's, so that the float32 inputs meet the half-precision weights."""
    from accelerate.utils import DistributedType
    if job.accelerator.distributed_type == DistributedType.DEEPSPEED and job.args.mixed_precision in ("fp16", "bf16"):
        return torch.autocast(job.device.type, dtype=models.torch_dtype(job.args.mixed_precision))
    return job.accelerator.autocast()


def whole_unet(job, lora_setup=None):
    """Every process calls this; on the main process it returns the trained UNet, whole: under
    FSDP or DeepSpeed a fresh UNet (with the LoRA, through lora_setup) loaded with the gathered weights."""
    from accelerate.utils import DistributedType
    accelerator = job.accelerator
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.unwrap_model(job.unet)
    state = accelerator.get_state_dict(job.unet)
    if not accelerator.is_main_process:
        return None
    fresh = models.load_unet(job.init, torch.float32)
    if lora_setup:
        fresh = lora_setup(fresh)
    fresh.load_state_dict(state)
    return fresh


# ---------------------------------------------------------------- the latent cache
class LatentCache:
    """VAE latents of the pairs this process will see again: at one epoch nothing is kept. A pair's
    latents are dropped after its last use, and none are added past max_bytes (those are encoded
    again when they come back)."""

    def __init__(self, future_uses, max_bytes):
        self.uses, self.max_bytes, self.store, self.nbytes = Counter(future_uses), max_bytes, {}, 0

    def get(self, index):
        return self.store.get(index)

    def used(self, index, latents):
        self.uses[index] -= 1
        if self.uses[index] <= 0:
            dropped = self.store.pop(index, None)
            self.nbytes -= 0 if dropped is None else dropped.nbytes
        elif index not in self.store and self.nbytes + latents.nbytes <= self.max_bytes:
            self.store[index] = latents.cpu()
            self.nbytes += latents.nbytes


def future_uses(order, start_step, total_steps, batch_size, rank, num_processes):
    """Pair indices this process trains on from start_step on, each as often as it comes."""
    return [i for step in range(start_step, total_steps)
            for i in order[step * batch_size:(step + 1) * batch_size][rank::num_processes]]


def pair_latents(job, rows):
    """VAE latents of the pairs' transformed images (job.latent_cache keeps those seen again):
    (2B, C, h, w), all preferred images first, then all dispreferred."""
    args, cache = job.args, job.latent_cache
    found = {r["_index"]: cache.get(r["_index"]) for r in rows}
    todo = [r for r in rows if found[r["_index"]] is None]
    if todo:
        images = [img for r in todo for img in dpo_maths.load_pair_pixels(r, args.resolution, args.seed, args.random_crop, not args.no_flip)]
        gens = [torch.Generator().manual_seed(models.derive_seed(args.seed, "vae", r["_index"], side)) for r in todo for side in "wl"]
        lat = dpo_maths.encode_images(job.pipe.vae, images, job.device, sample_generator=gens).to(job.frozen_dtype)
        for j, r in enumerate(todo):
            found[r["_index"]] = lat[2 * j:2 * j + 2]
    for r in rows:
        cache.used(r["_index"], found[r["_index"]])
    batch = torch.stack([found[r["_index"]].to(job.device) for r in rows])
    return torch.cat([batch[:, 0], batch[:, 1]]).float()


# ---------------------------------------------------------------- resumable states
def check_finished_settings(args, names):
    """A finished checkpoint (args.out) is kept only if the settings given now are the ones it was
    trained with; settings left to the preset (None now) are settled only when training starts."""
    sail_json = Path(args.out) / "sail.json"
    recorded = json.loads(sail_json.read_text()).get("args", {}) if sail_json.is_file() else {}
    differ = [f"{name}: {recorded[name]} -> {getattr(args, name)}" for name in names
              if getattr(args, name) is not None and name in recorded and recorded[name] != getattr(args, name)]
    if differ:
        raise run_files.SailError(f"{args.out} is finished but was trained with other settings ({', '.join(differ)}); "
                                  "delete it to train again, or write to another --out")


def state_dirs(partial):
    """The complete states of a killed run, oldest first: state-<step>/ (written as .tmp, then renamed)."""
    found = [(int(p.name.split("-")[1]), p) for p in Path(partial).glob("state-*") if p.name.split("-")[1].isdigit()]
    return [p for _, p in sorted(found)]


def save_state(job, step, keep):
    """Every process: accelerate's state of step `step` into state-<step>/, then progress.json points to it
    and only the newest `keep` states stay."""
    accelerator, partial = job.accelerator, job.partial
    accelerator.wait_for_everyone()
    tmp = partial / f"state-{step}.tmp"
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every shard is written before the rename
    if accelerator.is_main_process:
        tmp.rename(partial / f"state-{step}")
        run_files.write_json_atomic(partial / "progress.json", {"step": step})
        for old in state_dirs(partial)[:-keep]:
            shutil.rmtree(old)
        shutil.rmtree(partial / "state", ignore_errors=True)  # the single state of earlier versions


def resume_state(partial):
    """(step, state folder) of the newest complete state that progress.json names."""
    step = json.loads((Path(partial) / "progress.json").read_text())["step"]
    for folder in (Path(partial) / f"state-{step}", Path(partial) / "state"):
        if folder.is_dir():
            return step, folder
    raise run_files.SailError(f"{partial}/progress.json names step {step}, whose state-{step}/ is missing: add --restart")


def trim_log(path, step):
    """Drop train-log rows past the resumed step (the steps after it are trained and logged again) and a
    last line torn by the kill."""
    lines = [line for line in Path(path).read_text().splitlines(keepends=True) if line.endswith("\n")]
    Path(path).write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


# ---------------------------------------------------------------- validation images during training
def validation_prompts(spec, pairs):
    """--validation-prompts: N (the first N distinct prompts of the pair file) or a prompt file
    ({"prompt_id", "prompt"} per line, as the prompt pools)."""
    if spec.isdigit():
        prompts = list(dict.fromkeys(r["prompt"] for r in pairs))[:int(spec)]
        if not prompts:
            raise run_files.SailError(f"--validation-prompts {spec}: give at least 1 prompt")
        return prompts
    return [r["prompt"] for r in run_files.read_prompts(spec)]


def start_validation(job, resumed):
    """Fix the prompts and seeds, record them (validation/settings.json), and draw the start model's
    column unless a resumed run has it. A fresh start discards an earlier start's images."""
    args, preset, accelerator = job.args, job.preset, job.accelerator
    job.validation = None
    if not args.validation_every:
        return
    folder = job.out.parent / run_files.VALIDATION_DIR
    if not resumed and folder.exists() and accelerator.is_main_process:
        log.info("discarding %s: it belongs to an earlier start of this training", folder)
        shutil.rmtree(folder)
    prompts = validation_prompts(args.validation_prompts, job.pairs)
    job.validation = dict(folder=folder, prompts=prompts, seeds=[models.derive_seed(args.seed, "validation", i) for i in range(len(prompts))],
                          sampler=preset.get("sampler", "ddim"), steps=preset.get("steps", 20), cfg=preset.get("cfg", 5.0),
                          batch=preset.get("gen_batch", 8))
    if accelerator.is_main_process:
        settings = {k: v for k, v in job.validation.items() if k != "folder"}
        run_files.check_settings(folder / "settings.json", dict(settings, resolution=args.resolution), f"delete {folder}")
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
        for _, batch in models.draw_images(pipe, v["prompts"], v["seeds"], v["steps"], v["cfg"], job.args.resolution,
                                           v["batch"], label="validation"):
            images += batch
    if not accelerator.is_main_process:
        return
    folder = column_dir(job, step)
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        run_files.save_image_atomic(img, folder / f"{i:03d}.png")
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
        with dpo_maths.adapters_off(accelerator.unwrap_model(job.unet)) if lora_off else contextlib.nullcontext():
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
    run_files.save_image_atomic(grid, Path(folder) / "grid.png")
    run_files.write_json_atomic(Path(folder) / "grid.json", {"columns": ["start" if s == 0 else f"step {s}" for s in steps],
                                                            "steps": steps})
    return grid, steps
