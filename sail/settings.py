"""Every preset and every setting of the stages in one place: the presets table (PRESETS: the
model, its generation and training settings, as in the paper, section 5.1, for sd15 and sdxl) and
one declaration per setting (SETTINGS: its flag, type, default, help, the stages that take it and
whether it decides their outputs).

A stage builds its parser from SETTINGS (`add_arguments`), fills what the command line left to the
preset through `settle`, and records the settings that decide its outputs through `record`, so a
setting added here shows in the stage's --help, in `bash run_all.sh --help` and, when it decides
the outputs, in the record beside them (a rerun with another value stops: files.check_settings).
The stages keep only their path arguments (--run, --iter, --ckpt, --pool, --out, ...).
"""
import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable

from sail.common import SailError

# Generation and training defaults follow the paper (section 5.1); `model` is a hub id, a local
# folder, or a kit-built model ("tiny:sd15", "tiny:sdxl", "toy"). SAIL_SD15_PATH / SAIL_SDXL_PATH
# point the real presets at a local copy of the weights.
PRESETS = {
    "sd15": dict(model=os.environ.get("SAIL_SD15_PATH", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
                 arch="sd15", resolution=512, sampler="ddpm", steps=50, cfg=7.5, optimizer="adamw",
                 mixed_precision="bf16", gen_batch=16, reward_batch=32, micro_batch=8, batch_size=128, epochs=1),
    "sdxl": dict(model=os.environ.get("SAIL_SDXL_PATH", "stabilityai/stable-diffusion-xl-base-1.0"),
                 arch="sdxl", resolution=1024, sampler="ddim", steps=20, cfg=5.0, optimizer="adafactor",
                 mixed_precision="bf16", gen_batch=8, reward_batch=16, micro_batch=2, batch_size=128, epochs=1,
                 gradient_checkpointing=True),  # as DiffusionDPO's SDXL training
    # tiny-*: the plumbing on random weights; lr 1e-4 so that two steps move the self-reward above
    # round-off (ties give no pair)
    "tiny-sd15": dict(model="tiny:sd15", arch="sd15", resolution=32, sampler="ddim", steps=4, cfg=3.0,
                      optimizer="adamw", mixed_precision="no", gen_batch=16, reward_batch=32, micro_batch=4,
                      max_steps=2, batch_size=8, lr=1e-4),
    "tiny-sdxl": dict(model="tiny:sdxl", arch="sdxl", resolution=32, sampler="ddim", steps=4, cfg=3.0,
                      optimizer="adafactor", mixed_precision="no", gen_batch=16, reward_batch=32, micro_batch=4,
                      max_steps=2, batch_size=8, lr=1e-4),
    # The CPU toy world (toy/world.py, toy/data.py): a briefly pretrained small model of the SD1.5
    # architecture; no flips, since its captions say left and right.
    "toy": dict(model="toy", arch="sd15", resolution=32, sampler="ddim", steps=20, cfg=1.0, no_flip=True,
                optimizer="adamw", mixed_precision="no", gen_batch=64, reward_batch=160, micro_batch=32,
                lr=1e-6, batch_size=32, max_steps=300),
}

BETA = 5000.0  # the paper's and DiffusionDPO's beta (sail/dpo.py explains its scale)
DRAW_SCHEMES = ("iid", "stratified", "antithetic", "stratified-antithetic")  # sail/self_reward.py:reward_draws
STAGES = {"generate": "01_generate.py", "self_reward": "02_self_reward.py", "mixup": "03_mixup.py",
          "train": "04_train.py (and 00_seed_dpo.py)", "eval": "05_eval.py"}


def scaled_lr(args):
    """--lr-per-pair x --batch-size (DiffusionDPO's scaled rule)"""
    return args.lr_per_pair * args.batch_size


def launcher_precision():
    """fp16/bf16 from `accelerate launch` (its config file or flag), else None (the preset decides).
    `accelerate launch` exports "no" also when there is no config at all, so "no" is not taken as a
    choice: pass --mixed-precision no to train in float32 under a config that says otherwise."""
    value = os.environ.get("ACCELERATE_MIXED_PRECISION", "").lower()
    return value if value in ("fp16", "bf16") else None


@dataclass(frozen=True)
class Setting:
    """One setting: args.<name>, given on the command line as --<name with dashes>.

    default: the paper's value; with from_preset, what applies where the preset has no value.
    type: None infers it from the default; a bool default makes an on/off switch (given: True).
    from_preset: not given -> the preset's value (PRESETS[preset][name]) when the stage settles.
    derive: not given and not in the preset -> derive(args), once the rest is settled.
    launcher, launcher_stages: in these stages `launcher()`, the value `accelerate launch` was
        given (its config file or flag), comes before the preset's.
    decides: the value decides the stage's outputs. It is recorded beside them; a rerun with another
        value stops instead of mixing outputs (05 measures a reward accuracy anew).
    finished_only: decides the outputs through a value the stage records instead (04 records the
        number of steps that --max-steps gives), so it is compared only with a finished output's
        arguments.
    recorded_as_negation: recorded under this name with the opposite value (the record names
        what is switched on).
    negatable: an on/off setting that also has --no-<name>; not given: None (the stage decides).
    omitted_at_default: recorded only when not at its default. For a setting added after run
        folders were recorded without it: at its default the record stays as those folders have
        it, so they continue.
    """
    name: str
    stages: str
    default: Any
    help: str
    type: Callable = None
    choices: tuple = None
    nargs: str = None
    append: bool = False
    metavar: str = None
    from_preset: bool = False
    negatable: bool = False
    derive: Callable = None
    launcher: Callable = None
    launcher_stages: str = ""
    decides: bool = False
    finished_only: bool = False
    recorded_as_negation: str = None
    omitted_at_default: bool = False

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def is_switch(self):
        return self.type is bool or isinstance(self.default, bool)

    def in_stage(self, stage):
        return stage in self.stages.split()


S = Setting
SETTINGS = (
    # What one pass holds (--gen-batch, --reward-batch, --micro-batch) and the speed options do not
    # decide outputs: they change them by float round-off at most, so a run killed for memory
    # continues with smaller passes.
    # what is drawn: 01 generation, the evaluation's images
    S("num_candidates", "generate", 8, "images per prompt (paper: N = 8)"),
    S("sampler", "generate eval", None, "sampler", choices=("ddpm", "ddim"), from_preset=True, decides=True),
    S("steps", "generate eval", None, "sampling steps", int, from_preset=True, decides=True),
    S("cfg", "generate eval", None, "classifier-free guidance scale", float, from_preset=True, decides=True),
    S("resolution", "generate train eval", None, "image side in pixels", int, from_preset=True, decides=True),
    S("gen_batch", "generate eval", None, "images per pipeline call", int, from_preset=True),
    S("limit", "generate eval", None, "only the first N prompts (of the pool; of each benchmark): a quick subset", int),
    # the self-reward (Eq. 8) and its pairs
    S("beta", "self_reward train eval", BETA, "beta of the DPO loss and of the implicit reward (paper: 5000)",
      decides=True),
    S("draws", "self_reward", 10, "K random (t, noise) draws per image (paper: 10)", decides=True),
    S("no_common_draws", "self_reward", False, "independent draws per image (default: the N candidates of a prompt "
      "share their K draws, common random numbers)", decides=True, recorded_as_negation="common_draws"),
    S("draw_scheme", "self_reward", "iid", "iid (the paper's), stratified timesteps, antithetic noise (eps, -eps) or "
      "both", choices=DRAW_SCHEMES, decides=True, omitted_at_default=True),
    S("pairing", "self_reward", "best-worst", "which two candidates form a prompt's pair: best vs worst (the paper's) "
      "or two at random (Table 5)", choices=("best-worst", "random")),
    S("min_p", "self_reward", 0.0, "drop pairs with sigmoid(r_w - r_l) below this"),
    S("reward_batch", "self_reward", None, "UNet inputs per forward pass", int, from_preset=True),
    # 03 mixup
    S("human_share", "mixup", 0.25, "fraction of human pairs in the mix (0 = no mixup)"),
    S("max_self", "mixup", None, "keep only the N most confident self pairs", int),
    # 04 DPO training
    S("batch_size", "train", None, "effective batch in pairs (paper: 128)", int, from_preset=True, decides=True),
    S("micro_batch", "train", None, "pairs per forward pass and process [default: from the GPU's memory "
      "(sail/memory.py); on the CPU the preset's]", int),
    S("lr", "train", None, "learning rate", float, from_preset=True,
      derive=scaled_lr, decides=True),
    S("lr_per_pair", "train", 1e-8, "learning rate per pair of the effective batch (DiffusionDPO's scaled rule)"),
    S("optimizer", "train", None, "paper: adamw SD1.5, adafactor SDXL (transformers', DiffusionDPO's); adamw8bit: "
      "bitsandbytes' 8-bit AdamW; adafactor-torch: torch's foreach Adafactor, whose steps scale with each weight's "
      "size (docs/training.md)", choices=("adamw", "adafactor", "adamw8bit", "adafactor-torch"), from_preset=True,
      decides=True),
    S("weight_decay", "train", 1e-2, "weight decay", decides=True),
    S("warmup_steps", "train", 0, "steps of linear learning-rate warm-up", decides=True),
    S("max_grad_norm", "train", 1.0, "gradient clipping norm (0: none)", decides=True),
    S("epochs", "train", None, "passes over the pair file (ignored with --max-steps)", float, from_preset=True),
    S("max_steps", "train", None, "optimizer steps", int, from_preset=True, decides=True, finished_only=True),
    S("random_crop", "train", False, "random instead of centre crop", decides=True),
    S("no_flip", "train", False, "no random horizontal flip", from_preset=True, decides=True),
    S("empty_prompt_prob", "train", 0.2, "share of empty captions (keeps CFG)", decides=True),
    S("mixed_precision", "generate self_reward train", None, "precision of the UNet passes",
      choices=("no", "fp16", "bf16"), from_preset=True, launcher=launcher_precision, launcher_stages="train",
      decides=True),
    S("gradient_checkpointing", "train", None, "trade compute for memory [default: where the GPU's memory needs it "
      "(sail/memory.py); on the CPU the preset's]", bool, negatable=True),
    S("num_workers", "train", None, "processes that read and transform the images ahead of the step [default: up to "
      "4 on a GPU, 0 on the CPU; 0: the training thread reads them]", int),
    S("vae_fp32", "train", None, "encode the training images with the VAE in float32, or (--no-vae-fp32) in the "
      "frozen models' precision [default: float32 for SDXL, whose VAE overflows in fp16; the frozen models' for "
      "SD1.5]", bool, negatable=True, decides=True, omitted_at_default=True),
    S("lora_rank", "train", 0, "train a LoRA of this rank instead of the whole UNet (0: whole UNet, the paper's "
      "setting)", decides=True),
    S("lora_alpha", "train", None, "LoRA scale is alpha / rank (default alpha: the rank)", float, decides=True),
    S("no_cache_latents", "train", False, "VAE-encode every step instead of once"),
    S("latent_cache_gb", "train", 8.0, "RAM for the latents of pairs seen again (epochs > 1); at one epoch nothing "
      "is cached"),
    S("log_every", "train", 10, "steps between log lines"),
    S("save_every", "train", 100, "steps between resumable states (0: never)"),
    S("keep_states", "train", 1, "resumable states kept (the newest N)"),
    S("report_to", "train", "none", "experiment tracker", choices=("none", "tensorboard", "wandb", "all")),
    S("validation_prompts", "train", "4", "N (the pair file's first N prompts) or a prompt file"),
    S("validation_every", "train", 0, "steps between validation images (0: none)"),
    S("restart", "train", False, "discard a killed run's state instead of resuming"),
    # 05 evaluation
    S("benchmark", "eval", ["parti"], "parti, hps, hps-<style>, pickapic, drawbench, pickapic-test-dedup, run, "
      "FILE.jsonl", nargs="+"),
    S("scorer_path", "eval", [], "METRIC=hub id, folder or file (see sail/scorers.py: LOCATIONS)", append=True),
    S("images_per_prompt", "eval", 1, "images per prompt and checkpoint", decides=True),
    S("score_batch", "eval", 32, "images per scorer call"),
    S("grid_rows", "eval", 8, "prompts in the image grid"),
    S("bootstrap", "eval", 1000, "bootstrap resamples for the 95% CIs"),
    S("draws", "eval", [10, 20, 30], "K (t, noise) draws per image (Figure 5)", int, nargs="+", decides=True),
    S("common_draws", "eval", "both", "the two images of a pair share their K draws (common random numbers), or "
      "not, or both", choices=("yes", "no", "both"), decides=True),
    S("draw_schemes", "eval", ["iid"], "how the K draws are made (02_self_reward.py --draw-scheme); several are "
      "compared", choices=DRAW_SCHEMES, nargs="+", decides=True),
    S("device", "eval", None, "default: cuda if available", str),
    # every stage
    S("seed", "generate self_reward mixup train eval", 0, "the seed every random draw of the stage derives from "
      "(sail/common.py: derive_seed)", decides=True),
    # speed options: they pay on a GPU; outputs equal the plain path's up to round-off. Training
    # does not fuse q/k/v: fusing replaces the trained layers with new ones.
    S("compile", "generate self_reward train", False, "torch.compile the UNet (pays on a GPU after a warm-up)"),
    S("fuse_qkv", "generate self_reward", False, "fused q/k/v attention projections (inference)"),
    S("channels_last", "generate self_reward train", False, "channels-last memory format for the UNet"),
)
del S


def get_preset(name):
    if name not in PRESETS:
        raise SailError(f"unknown preset '{name}'; choose one of: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def stage_settings(stage):
    """The settings `stage` takes, in the table's order."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    return [s for s in SETTINGS if s.in_stage(stage)]


def setting(stage, name):
    found = [s for s in stage_settings(stage) if s.name == name]
    if not found:
        raise KeyError(f"{stage} takes no setting {name!r}")
    return found[0]


def shown(value):
    """A value as the help texts write it."""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def default_text(s, stage):
    """The default as --help and `bash run_all.sh --help` say it."""
    if not s.from_preset:
        return shown(None if s.default == [] else s.default)
    found = ", ".join(f"{name} {shown(preset[s.name])}" for name, preset in PRESETS.items() if s.name in preset)
    text = f"the preset's ({found})" if found else "the preset's"
    if stage in s.launcher_stages.split():
        text = "the accelerate config's, else " + text
    fallback = s.derive.__doc__ if s.derive else shown(s.default) if s.default is not None else None
    return text + (f", else {fallback}" if fallback and found else "")


def add_arguments(parser, stage):
    """Add every setting of `stage` to an argparse parser. Settings left to the preset default to
    None on the command line; `settle` fills them."""
    for s in stage_settings(stage):
        say_default = s.from_preset or not (s.is_switch or s.default in (None, []))
        help_text = f"{s.help} [default: {default_text(s, stage)}]" if say_default else s.help
        help_text = help_text.replace("%", "%%")  # argparse formats help with %
        default = None if s.from_preset else s.default
        if s.negatable:
            parser.add_argument(s.flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        if s.is_switch:
            parser.add_argument(s.flag, action="store_const", const=True, default=default, help=help_text)
            continue
        kind = s.type or (type(s.default) if s.default is not None and not isinstance(s.default, list) else str)
        parser.add_argument(s.flag, type=kind, default=default, choices=s.choices, nargs=s.nargs, metavar=s.metavar,
                            action="append" if s.append else None, help=help_text)
    return parser


def settle(args, preset, stage):
    """Fill each setting of `stage` the command line left unset (None): `accelerate launch`'s value
    where the setting says so, else the preset's, else its default; then the derived ones."""
    unset = [s for s in stage_settings(stage) if s.from_preset and getattr(args, s.name, None) is None]
    for s in unset:
        value = s.launcher() if stage in s.launcher_stages.split() else None
        setattr(args, s.name, value if value is not None else preset.get(s.name, s.default))
    for s in unset:
        if s.derive is not None and getattr(args, s.name) is None:
            setattr(args, s.name, s.derive(args))
    return args


def record(args, stage):
    """The settings of `stage` that decide its outputs, as recorded beside them (files.check_settings)."""
    out = {}
    for s in stage_settings(stage):
        if not s.decides or s.finished_only:
            continue
        value = getattr(args, s.name)
        if s.omitted_at_default and value == s.default:
            continue
        if s.recorded_as_negation:
            out[s.recorded_as_negation] = not value
        else:
            out[s.name] = value
    return out


def compared_when_finished(stage):
    """Names of the settings a finished output's recorded arguments are compared with."""
    return [s.name for s in stage_settings(stage) if s.decides]


def describe(stages=tuple(STAGES)):
    """A plain-text table of the stages' settings, their flags and defaults (`bash run_all.sh --help`)."""
    lines = []
    for stage in stages:
        lines.append(f"{STAGES[stage]}:")
        for s in stage_settings(stage):
            mark = " *" if s.decides else ""
            lines.append(f"  {s.flag + mark:<26} {default_text(s, stage)}")
    lines += ["* decides the stage's outputs: recorded beside them, so that a rerun with another value never",
              "  mixes its outputs with theirs (it stops; 05 measures a reward accuracy anew)"]
    return "\n".join(lines)
