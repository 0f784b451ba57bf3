"""Training helpers of the DPO job (sail/trainer.py, 04_train.py): experiment trackers, resumable
states and the settings recorded with them, gradient accumulation through accelerate, and the whole
UNet of a sharded model.

Nothing here runs on its own (04_train.py's docstring says what training reads and writes). Beside
the checkpoint it adds <out parent>/tracker/ (TensorBoard events, wandb's local files). Docs: docs/training.md.
"""
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from sail import common, files, models, settings

log = logging.getLogger("sail")


TRACKER_PROJECT = "sail-dpo"


TRACKERS = ("tensorboard", "wandb")  # --report-to all: those of these that are installed


def tracker_names(report_to):
    """--report-to -> accelerate's log_with list. accelerate drops a tracker whose package is missing
    without a word; the kit stops instead, naming what to install."""
    if report_to == "none":
        return []
    installed = [name for name in TRACKERS if _importable(name)]
    if report_to == "all":
        if not installed:
            raise common.SailError("--report-to all found neither tensorboard nor wandb: pip install tensorboard (or wandb)")
        return installed
    if report_to not in installed:
        raise common.SailError(f"--report-to {report_to} needs the {report_to} package, which is not installed: "
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
        (job.out.parent / files.TRACKER_DIR).mkdir(parents=True, exist_ok=True)  # wandb's dir= must exist
    job.accelerator.init_trackers(TRACKER_PROJECT, config=config,
                                  init_kwargs={"wandb": {"name": str(job.out.parent), "dir": str(job.out.parent / files.TRACKER_DIR)}})


def make_accelerator(mixed_precision, report_to, folder):
    """The run's Accelerator: trackers logging under folder/tracker; a schedule stepped once per optimizer
    step (accelerate would step a prepared schedule once per process: a warm-up N times too short)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available(), log_with=tracker_names(report_to) or None,
                       step_scheduler_with_optimizer=False,
                       project_config=ProjectConfiguration(str(folder), logging_dir=str(Path(folder) / files.TRACKER_DIR)))


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
        raise common.SailError(f"the accelerate config sets gradient_accumulation_steps {theirs}, but --batch-size, the "
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


def training_settings(args, total_steps, folder):
    """What decides the trained weights (sail/settings.py: the settings that decide 04's outputs, and
    the steps, start model and pairs), recorded with a killed run's state: a resume with other values
    would mix two trainings. Batch sizes of a pass and the latent cache only change memory and
    round-off, so a run killed for memory can resume with a smaller micro batch."""
    return dict(settings.record(args, "train"), steps=total_steps, init=models.model_setting(args.init, folder),
                pairs=files.relative_to(args.pairs, folder))


def check_finished_settings(args, names):
    """A finished checkpoint (args.out) is kept only if the settings given now are the ones it was
    trained with; settings left to the preset (None now) are settled only when training starts."""
    sail_json = Path(args.out) / "sail.json"
    recorded = json.loads(sail_json.read_text()).get("args", {}) if sail_json.is_file() else {}
    differ = [f"{name}: {recorded[name]} -> {getattr(args, name)}" for name in names
              if getattr(args, name) is not None and name in recorded and recorded[name] != getattr(args, name)]
    if differ:
        raise common.SailError(f"{args.out} is finished but was trained with other settings ({', '.join(differ)}); "
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
        files.write_json_atomic(partial / "progress.json", {"step": step})
        for old in state_dirs(partial)[:-keep]:
            shutil.rmtree(old)


def resume_state(partial):
    """(step, state folder) of the newest complete state that progress.json names."""
    step = json.loads((Path(partial) / "progress.json").read_text())["step"]
    folder = Path(partial) / f"state-{step}"
    if folder.is_dir():
        return step, folder
    raise common.SailError(f"{partial}/progress.json names step {step}, whose state-{step}/ is missing: add --restart")


def trim_log(path, step):
    """Drop train-log rows past the resumed step (the steps after it are trained and logged again) and a
    last line torn by the kill."""
    lines = [line for line in Path(path).read_text().splitlines(keepends=True) if line.endswith("\n")]
    Path(path).write_text("".join(line for line in lines if json.loads(line)["step"] <= step))
