"""sail/settings.py: one declaration per setting. A setting declared once shows in the stage's parser,
its --help, `bash run_all.sh --help` and, when it decides the outputs, in the record beside them; the
records equal the ones the stages wrote by hand before; a rerun with another value stops."""
import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, load_stage

from sail import common, files, memory, settings, training

generate, self_reward, mixup, train = (load_stage(n) for n in ("01_generate", "02_self_reward", "03_mixup", "04_train"))
PARSERS = {"generate": generate, "self_reward": self_reward, "mixup": mixup, "train": train}

# ---- the records as the stages built them by hand, transcribed from commit 692eb9a: 01_generate.py
# (PRESET_KEYS, main's generate.settings.json), 02_self_reward.py (main's fill and self_reward.settings.json),
# 04_train.py (SETTING_NAMES, PRESET_KEYS, setup's settling lines, training_settings, main's finished
# check) and sail/settings.py (fill_defaults; the toy preset said flip=False where it now says no_flip=True).
OLD_GENERATE_KEYS = ("sampler", "steps", "cfg", "resolution", "mixed_precision", "gen_batch")
OLD_SETTING_NAMES = ("beta", "batch_size", "lr", "optimizer", "weight_decay", "warmup_steps", "max_grad_norm",
                     "resolution", "random_crop", "no_flip", "empty_prompt_prob", "mixed_precision", "lora_rank",
                     "lora_alpha", "seed")
OLD_TRAIN_KEYS = ("resolution", "optimizer", "mixed_precision", "micro_batch", "epochs", "max_steps", "batch_size", "lr")
OLD_FLIP = {"toy": False}


def old_fill(args, preset, names):
    for name in names:
        if getattr(args, name, None) is None and name in preset:
            setattr(args, name, preset[name])


def old_generate(args, preset):
    old_fill(args, preset, OLD_GENERATE_KEYS)
    return dict(sampler=args.sampler, steps=args.steps, cfg=args.cfg, resolution=args.resolution,
                mixed_precision=args.mixed_precision, seed=args.seed)


def old_self_reward(args, preset):
    old_fill(args, preset, ("reward_batch", "mixed_precision"))
    return dict(draws=args.draws, common_draws=not args.no_common_draws, beta=args.beta, seed=args.seed,
                mixed_precision=args.mixed_precision,
                **({} if args.draw_scheme == "iid" else dict(draw_scheme=args.draw_scheme)))


def old_train(args, preset_name, accelerate):
    """04's settling lines; the old parser's switches were False where the new ones are None."""
    preset = settings.get_preset(preset_name)
    args.no_flip = bool(args.no_flip)
    args.gradient_checkpointing = bool(args.gradient_checkpointing)
    args.mixed_precision = args.mixed_precision or accelerate
    old_fill(args, preset, OLD_TRAIN_KEYS)
    args.gradient_checkpointing = args.gradient_checkpointing or preset.get("gradient_checkpointing", False)
    args.no_flip = args.no_flip or not OLD_FLIP.get(preset_name, True)
    args.lr = args.lr or args.lr_per_pair * args.batch_size
    return {name: getattr(args, name) for name in OLD_SETTING_NAMES}


ARGVS = {
    "generate": [[], ["--steps", "3", "--cfg", "2", "--sampler", "ddpm", "--seed", "4", "--gen-batch", "3",
                      "--mixed-precision", "fp16", "--resolution", "64", "--num-candidates", "3", "--limit", "2"]],
    "self_reward": [[], ["--draws", "3", "--no-common-draws", "--draw-scheme", "antithetic", "--pairing", "random",
                         "--min-p", "0.6", "--reward-batch", "4", "--mixed-precision", "no", "--seed", "2",
                         "--beta", "2500"], ["--draw-scheme", "iid", "--mixed-precision", "bf16"]],
    "train": [[], ["--lr", "1e-5", "--no-flip", "--random-crop", "--gradient-checkpointing", "--max-steps", "3",
                   "--batch-size", "4", "--micro-batch", "2", "--optimizer", "adafactor", "--weight-decay", "0",
                   "--warmup-steps", "3", "--max-grad-norm", "0", "--resolution", "64", "--empty-prompt-prob", "0",
                   "--mixed-precision", "fp16", "--lora-rank", "4", "--lora-alpha", "2", "--seed", "3"],
              ["--batch-size", "64", "--lr-per-pair", "2e-8", "--epochs", "2"]],
}


def parse(stage, argv):
    return PARSERS[stage].build_parser().parse_args(argv)


@pytest.mark.parametrize("preset", list(settings.PRESETS))
@pytest.mark.parametrize("which", range(3))
def test_records_equal_the_stages_old_records(preset, which, monkeypatch):
    cfg = settings.get_preset(preset)
    for stage, old in (("generate", old_generate), ("self_reward", old_self_reward)):
        if which < len(ARGVS[stage]):
            args = parse(stage, ARGVS[stage][which])
            expected = old(copy.deepcopy(args), cfg)
            assert settings.record(settings.settle(args, cfg, stage), stage) == expected, (stage, preset)
    for accelerate in (None, "bf16"):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", accelerate or "no")  # "no": also what no config exports
        args = parse("train", ARGVS["train"][which])
        old_args = copy.deepcopy(args)
        expected = old_train(old_args, preset, accelerate)
        settled = settings.settle(args, cfg, "train")
        # the micro batch and gradient checkpointing are the device's choice (sail/trainer.py:settle_device_choices),
        # on the CPU the preset's as before
        micro, checkpointing = memory.choose(cfg["arch"], None, 10**6, cfg["micro_batch"],
                                             cfg.get("gradient_checkpointing", False), settled.optimizer, settled.resolution,
                                             settled.mixed_precision, settled.micro_batch, settled.gradient_checkpointing)
        assert (micro, checkpointing) == (old_args.micro_batch, old_args.gradient_checkpointing)
        device_choices = ("micro_batch", "gradient_checkpointing")
        assert {k: v for k, v in vars(settled).items() if k not in device_choices} == \
            {k: v for k, v in vars(old_args).items() if k not in device_choices}  # what sail.json's args records
        assert settings.record(settled, "train") == expected
        args.init, args.pairs = "tiny-sd15", ROOT / "runs" / "r" / "pairs.jsonl"
        assert training.training_settings(args, 7, ROOT / "runs" / "r") == dict(
            expected, steps=7, init="tiny-sd15", pairs="pairs.jsonl")


def test_the_finished_checkpoint_is_compared_on_the_settings_that_decide_it(tmp_path):
    """The old check compared SETTING_NAMES but no_flip (whose old default, False, could not say "the
    preset's"), and max_steps; --no-flip now defaults to None (the preset's), so it joins the rest."""
    # vae_fp32 came with the option of a bf16 VAE; a checkpoint trained without it records no vae_fp32
    assert set(settings.compared_when_finished("train")) == set(OLD_SETTING_NAMES) | {"max_steps", "vae_fp32"}
    ckpt = tmp_path / "ckpt"
    args = settings.settle(parse("train", []), settings.get_preset("toy"), "train")
    files.write_json_atomic(ckpt / "sail.json", dict(args=vars(args)))
    names = settings.compared_when_finished("train")
    for argv in ([], ["--no-flip"], ["--max-steps", "300"], ["--lr", "1e-6", "--seed", "0"]):
        given = parse("train", argv)
        given.out = ckpt
        training.check_finished_settings(given, names)
    for argv, said in ((["--max-steps", "3"], "max_steps: 300 -> 3"), (["--lr", "1e-5"], "lr: 1e-06 -> 1e-05"),
                       (["--random-crop"], "random_crop: False -> True"), (["--seed", "2"], "seed: 0 -> 2")):
        given = parse("train", argv)
        given.out = ckpt
        with pytest.raises(common.SailError, match=said):
            training.check_finished_settings(given, names)


def other_value(s, value):
    if s.choices:
        return next(c for c in s.choices if c != value)
    if s.is_switch:
        return not value
    if isinstance(value, str):
        return value + "0"
    return (s.type or type(value))(2) if value is None else value + 1


@pytest.mark.parametrize("stage", ["generate", "self_reward", "train"])
def test_a_rerun_with_another_value_of_a_deciding_setting_stops(stage, tmp_path):
    args = settings.settle(parse(stage, []), settings.get_preset("tiny-sd15"), stage)
    record = tmp_path / "settings.json"
    files.check_settings(record, settings.record(args, stage), "start over")
    deciding = [s for s in settings.stage_settings(stage) if s.decides and not s.finished_only]
    assert deciding
    for s in deciding:
        changed = copy.deepcopy(args)
        setattr(changed, s.name, other_value(s, getattr(args, s.name)))
        key = s.recorded_as_negation or s.name
        with pytest.raises(common.SailError, match=f"holds work made with {key} = .* this run has {key} = "):
            files.check_settings(record, settings.record(changed, stage), "start over")
    for s in settings.stage_settings(stage):
        if not s.decides:  # batch sizes, speed options, logging: a rerun continues
            changed = copy.deepcopy(args)
            setattr(changed, s.name, other_value(s, getattr(args, s.name)))
            files.check_settings(record, settings.record(changed, stage), "start over")


def test_a_setting_added_in_one_place_shows_in_the_parser_the_help_the_record_and_the_table(monkeypatch):
    added = (settings.Setting("eta", "generate self_reward", 0.5, "DDIM's eta", decides=True),
             settings.Setting("noise_offset", "train", None, "noise offset", float, from_preset=True, decides=True),
             settings.Setting("warm_cache", "generate", False, "keep the pipeline in memory"))
    monkeypatch.setattr(settings, "SETTINGS", settings.SETTINGS + added)
    monkeypatch.setitem(settings.PRESETS, "toy", dict(settings.PRESETS["toy"], noise_offset=0.1))
    help_text = generate.build_parser().format_help()
    assert "--eta ETA" in help_text and "DDIM's eta [default: 0.5]" in help_text and "--warm-cache" in help_text
    args = parse("generate", ["--eta", "0.7", "--warm-cache"])
    assert args.eta == 0.7 and args.warm_cache is True
    record = settings.record(settings.settle(args, settings.get_preset("toy"), "generate"), "generate")
    assert record["eta"] == 0.7 and "warm_cache" not in record
    assert settings.record(settings.settle(parse("self_reward", []), {}, "self_reward"), "self_reward")["eta"] == 0.5
    assert "noise_offset" not in vars(parse("generate", []))
    for preset, value in (("toy", 0.1), ("sd15", None)):
        args = settings.settle(parse("train", []), settings.get_preset(preset), "train")
        assert args.noise_offset == value and settings.record(args, "train")["noise_offset"] == value
    assert "noise offset [default: the preset's (toy 0.1)]" in train.build_parser().format_help()
    assert "noise_offset" in settings.compared_when_finished("train")
    described = settings.describe()
    assert "--eta *" in described and "--noise-offset *" in described and "--warm-cache " in described


def test_run_all_help_lists_every_setting_of_every_stage():
    done = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--help"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "N            01 --num-candidates" in done.stdout and "HUMAN_SHARE  03 --human-share" in done.stdout
    for stage, script in settings.STAGES.items():
        section = done.stdout.split(f"{script}:\n")[1]
        for s in settings.stage_settings(stage):
            assert f"  {s.flag}" in section.split(":\n")[0], (stage, s.flag)


def test_every_setting_of_a_stage_is_in_its_parser_with_its_default():
    for stage, module in PARSERS.items():
        args = vars(module.build_parser().parse_args([]))
        for s in settings.stage_settings(stage):
            assert args[s.name] == (None if s.from_preset else s.default), (stage, s.name)
    evaluate = load_stage("05_eval").build_parser()
    assert evaluate.parse_args([]).draws == [10, 20, 30] and evaluate.parse_args(["--draws", "4"]).draws == [4]
    assert "--common-draws {yes,no,both}" in evaluate.format_help()


def test_the_record_follows_the_named_properties():
    args = settings.settle(parse("self_reward", ["--no-common-draws"]), settings.get_preset("sdxl"), "self_reward")
    record = settings.record(args, "self_reward")
    assert record["common_draws"] is False and "no_common_draws" not in record  # recorded_as_negation
    assert "draw_scheme" not in record  # omitted_at_default: folders recorded before the setting continue
    args.draw_scheme = "stratified"
    assert settings.record(args, "self_reward")["draw_scheme"] == "stratified"
    assert "max_steps" not in settings.record(settings.settle(parse("train", []), settings.get_preset("toy"), "train"),
                                              "train")  # finished_only: 04 records the steps it gives


@pytest.mark.parametrize("env, expected", [(None, None), ("no", None), ("bf16", "bf16"), ("FP16", "fp16")])
def test_mixed_precision_of_an_accelerate_config(monkeypatch, env, expected):
    if env is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", env)
    assert settings.launcher_precision() == expected
    args = settings.settle(parse("train", []), settings.get_preset("sd15"), "train")
    assert args.mixed_precision == (expected or "bf16")
    assert settings.settle(parse("generate", []), settings.get_preset("tiny-sd15"), "generate").mixed_precision == "no"


def test_settle_fills_only_what_the_command_line_left_unset():
    args = settings.settle(parse("train", ["--batch-size", "64"]), settings.get_preset("sd15"), "train")
    assert args.batch_size == 64 and args.lr == pytest.approx(64e-8)  # DiffusionDPO's rule
    assert args.micro_batch is None  # the device's choice (sail/trainer.py:settle_device_choices)
    args = settings.settle(parse("train", ["--lr", "3e-6"]), settings.get_preset("toy"), "train")
    assert args.lr == 3e-6 and args.no_flip is True and args.max_steps == 300 and args.epochs is None
    args = settings.settle(parse("train", []), settings.get_preset("sdxl"), "train")
    assert args.gradient_checkpointing is None and args.no_flip is False and args.optimizer == "adafactor"
    with pytest.raises(KeyError):
        settings.setting("mixup", "draws")
    assert json.loads(json.dumps(settings.record(args, "train"))) == settings.record(args, "train")
