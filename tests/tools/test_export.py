"""tools/export.py: the single file against diffusers' own loader (from_single_file) and against the key tables of
huggingface/diffusers scripts/convert_diffusers_to_original_stable_diffusion.py and
scripts/convert_diffusers_to_original_sdxl.py at commit 58eb52c0803ea9af3abec60841c2a093bdf1f951; the
export of a run folder (pipeline, LoRA, model card, upload list, rerun), and a push without network."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from helpers import coloured_image, make_pairs

from sail import models
from sail.common import SailError
from sail.configs import released_configs
from tools import export

LAYER_PREFIXES = {"sd15": ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."),
                  "sdxl": ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                           "conditioner.embedders.1.model.")}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_single_file_loads_back_in_diffusers_tensor_for_tensor(arch, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file
    folder = models.resolve_model_path(f"tiny:{arch}")  # SDXL's second encoder wider, as released: loaders tell them apart so
    path = tmp_path / "model.safetensors"
    export.write_single_file(folder, path)
    keys = load_file(path).keys()
    assert all(k.startswith(LAYER_PREFIXES[arch]) for k in keys)
    for prefix in LAYER_PREFIXES[arch]:
        assert any(k.startswith(prefix) for k in keys), prefix
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                "model.diffusion_model.middle_block.1.proj_in.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight",
                "first_stage_model.encoder.mid.attn_1.q.weight", "first_stage_model.quant_conv.weight"):
        assert key in keys, key
    if arch == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
        assert "conditioner.embedders.1.model.text_projection" in keys and "model.diffusion_model.label_emb.0.0.weight" in keys

    cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    extra = {} if arch == "sdxl" else dict(safety_checker=None, requires_safety_checker=False)
    back = cls.from_single_file(str(path), config=str(folder), local_files_only=True, **extra)
    original = cls.from_pretrained(folder, **extra)
    for part in ["unet", "vae", "text_encoder"] + ["text_encoder_2"] * (arch == "sdxl"):
        want, got = getattr(original, part).state_dict(), getattr(back, part).state_dict()
        assert want.keys() == got.keys(), part
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        assert not differ, f"{part}: {differ[:5]}"

    export.write_single_file(folder, tmp_path / "model-fp16.safetensors", half=True)
    half = load_file(tmp_path / "model-fp16.safetensors")
    full = load_file(path)
    assert half.keys() == full.keys() and all(v.dtype == torch.float16 for v in half.values())
    assert all(torch.equal(half[k], full[k].half()) for k in full)


def test_sharded_pipeline_folder_gives_the_same_single_file(tmp_path):
    """A full-size SDXL UNet in float32 (10.3 GB) is saved in shards by save_pretrained (10 GB each)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    folder = models.resolve_model_path("tiny:sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert list((tmp_path / "sharded" / "unet").glob("*.safetensors.index.json"))
    export.write_single_file(folder, tmp_path / "whole.safetensors")
    export.write_single_file(tmp_path / "sharded", tmp_path / "sharded.safetensors")
    whole, sharded = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "sharded.safetensors")
    assert whole.keys() == sharded.keys() and all(torch.equal(whole[k], sharded[k]) for k in whole)


# ---------------------------------------------------------------- the scripts' tables, transcribed
SCRIPT_UNET_TOP = [("time_embed.0.weight", "time_embedding.linear_1.weight"), ("time_embed.0.bias", "time_embedding.linear_1.bias"),
                   ("time_embed.2.weight", "time_embedding.linear_2.weight"), ("time_embed.2.bias", "time_embedding.linear_2.bias"),
                   ("input_blocks.0.0.weight", "conv_in.weight"), ("input_blocks.0.0.bias", "conv_in.bias"),
                   ("out.0.weight", "conv_norm_out.weight"), ("out.0.bias", "conv_norm_out.bias"),
                   ("out.2.weight", "conv_out.weight"), ("out.2.bias", "conv_out.bias")]
SCRIPT_UNET_SDXL = [("label_emb.0.0.weight", "add_embedding.linear_1.weight"), ("label_emb.0.0.bias", "add_embedding.linear_1.bias"),
                    ("label_emb.0.2.weight", "add_embedding.linear_2.weight"), ("label_emb.0.2.bias", "add_embedding.linear_2.bias")]
SCRIPT_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
                 ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]


def script_unet_layers(sdxl):
    """unet_conversion_map_layer as each script builds it, block counts hard-coded."""
    layer = []
    for i in range(3 if sdxl else 4):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            if (i > 0) if sdxl else (i < 3):
                layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(4 if sdxl else 3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            if (i < 2) if sdxl else (i > 0):
                layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < 3:
            layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            layer.append((f"output_blocks.{3 * i + 2}.{1 if i == 0 else 2}.", f"up_blocks.{i}.upsamplers.0."))
    if sdxl:
        layer.append(("output_blocks.2.2.conv.", "output_blocks.2.1.conv."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    return layer + [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]


def script_convert_unet(state, sdxl):
    mapping = {k: k for k in state}
    for sd_name, hf_name in SCRIPT_UNET_TOP + SCRIPT_UNET_SDXL * sdxl:
        mapping[hf_name] = sd_name
    for k, v in mapping.items():
        if "resnets" in k:
            for sd_part, hf_part in SCRIPT_RESNET:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    for k, v in mapping.items():
        for sd_part, hf_part in script_unet_layers(sdxl):
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    return {"model.diffusion_model." + v: state[k] for k, v in mapping.items()}


def script_convert_vae(state):
    """vae_conversion_map and convert_vae_state_dict of the SDXL script; the SD1.5 script builds the same
    map and reaches the same names for diffusers' to_q/to_k/to_v/to_out.0 through its vae_extra_conversion_map."""
    vae_map = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(4):
        for j in range(2):
            vae_map.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        if i < 3:
            vae_map.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            vae_map.append((f"up.{3 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        for j in range(3):
            vae_map.append((f"decoder.up.{3 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
    for i in range(2):
        vae_map.append((f"mid.block_{i + 1}.", f"mid_block.resnets.{i}."))
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    mapping = {k: k for k in state}
    for k, v in mapping.items():
        for sd_part, hf_part in vae_map:
            v = v.replace(hf_part, sd_part)
        mapping[k] = v
    for k, v in mapping.items():
        if "attentions" in k:
            for sd_part, hf_part in attn:
                v = v.replace(hf_part, sd_part)
            mapping[k] = v
    new = {v: state[k] for k, v in mapping.items()}
    for k, v in new.items():
        for name in ["q", "k", "v", "proj_out"]:
            if f"mid.attn_1.{name}.weight" in k:
                new[k] = v.reshape(*v.shape, 1, 1)
    return {"first_stage_model." + k: v for k, v in new.items()}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_key_maps_equal_the_scripts_on_the_released_architectures(arch):
    """The released models have the block counts the scripts hard-code: there tools/export.py must give the
    scripts' names to every weight (of the full-size models, built without memory on the meta device)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    configs = released_configs(arch)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"])
    for model, ours, theirs in ((unet, lambda s: export.convert_unet(s, unet.config), lambda s: script_convert_unet(s, arch == "sdxl")),
                                (vae, lambda s: export.convert_vae(s, vae.config), script_convert_vae)):
        state = {k: torch.tensor([float(i)]) for i, k in enumerate(model.state_dict())}  # each value names its weight
        got, want = ours(state), theirs(state)
        assert len(got) == len(state) and got.keys() == want.keys()
        assert all(got[k].shape == want[k].shape and torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------- a run folder, exported
def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def perturbed_unet(seed):
    unet = models.load_unet(models.describe_model("tiny-sd15"))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return unet


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two iterations of tiny-sd15 as the stages leave them, the first checkpoint's path recorded from another
    working folder (as after moving the run), the second with a LoRA, and 05_eval.py's table and grid."""
    run = tmp_path_factory.mktemp("export") / "runs" / "toy"
    make_pairs(run / "seed", n=4)
    write_json(run / "seed" / "stats.json", {"universe_slots": 70, "seed_slots": 5, "pairs": {"pairs": 4, "ties": 1}})
    write_json(run / "toy_world.data.args.json", {"command": "data", "seed": 0})
    common = dict(base_model="tiny:sd15", arch="sd15", preset="tiny-sd15", steps=2, effective_batch=8, lr=1e-4, beta=5000.0,
                  optimizer="adamw")
    models.save_checkpoint(perturbed_unet(1), run / "iter_00" / "ckpt",
                           dict(common, iteration=0, parent="tiny:sd15", pair_counts={"human": 4, "self": 0}, lora=None))
    write_json(run / "iter_00" / "train.args.json", {"batch_size": 8, "lr": 1e-4, "max_steps": 2})
    it1 = run / "iter_01"
    write_json(it1 / "generate.args.json", {"num_candidates": 4, "steps": 4})
    write_json(it1 / "self_reward.args.json", {"draws": 10, "no_common_draws": False, "pairing": "best-worst"})
    write_json(it1 / "mixup.args.json", {"human_share": 0.25})
    write_json(it1 / "train.args.json", {"batch_size": 8, "lr": 1e-4, "lora_rank": 4})
    (it1 / "generations.jsonl").write_text("".join(json.dumps({"prompt_id": f"p{i // 4}", "index": i % 4}) + "\n" for i in range(12)))
    models.save_checkpoint(perturbed_unet(2), it1 / "ckpt",
                           dict(common, iteration=1, parent="elsewhere/runs/toy/iter_00/ckpt", pair_counts={"self": 3, "human": 1},
                                lora={"rank": 4, "alpha": 4.0, "target_modules": ["to_q"]}))
    from safetensors.torch import save_file
    (it1 / "ckpt" / "lora").mkdir()
    save_file({"unet.down.lora.up.weight": torch.zeros(2, 2)}, it1 / "ckpt" / "lora" / "pytorch_lora_weights.safetensors")
    (run / "eval").mkdir()
    (run / "eval" / "table_bench.md").write_text("## bench: base, iter_01\n\n| Model | Tiny PickScore |\n|---|---|\n| iter_01 | 1.5 |\n")
    coloured_image((200, 40, 40), 64).save(run / "eval" / "grid_bench.png")
    return run


def run_export(*argv):
    export.main(export.build_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def exported(run):
    out = run.parent.parent / "exports" / "toy-sail"
    run_export("--ckpt", run / "iter_01" / "ckpt", "--out", out, "--single-file")
    return out


def test_export_writes_the_checkpoint_as_pipeline_single_file_and_lora(run, exported):
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file
    trained = models.load_unet(models.describe_model(str(run / "iter_01" / "ckpt"))).state_dict()
    pipe = DiffusionPipeline.from_pretrained(exported)
    assert all(torch.equal(v, trained[k]) for k, v in pipe.unet.state_dict().items())
    single = load_file(exported / "toy-sail.safetensors")
    assert torch.equal(single["model.diffusion_model.input_blocks.0.0.weight"], trained["conv_in.weight"])
    assert (exported / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert export.upload_list(exported) == sorted(
        ["README.md", "grid_bench.png", "lora/pytorch_lora_weights.safetensors", "toy-sail.safetensors", "model_index.json"]
        + [p.relative_to(exported).as_posix() for p in exported.glob("*/*") if p.parent.name != "lora"])
    assert not {"export.args.json", "export.settings.json", "log.txt", ".lock", "README.md.sha256"} & set(export.upload_list(exported))


def test_model_card_metadata_and_training_story(exported):
    from huggingface_hub import ModelCard, metadata_load
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert card.data.tags == ["stable-diffusion", "text-to-image", "diffusers", "dpo", "sail"]
    assert card.data.base_model is None and card.data.license is None  # a kit-built base: no Hub id, no licence
    assert metadata_load(exported / "README.md")["library_name"] == "diffusers"
    text = card.text
    assert "Human seed: 4 preference pairs" in text and "toy world" in text and '"seed_slots": 5' in text
    assert "| 0 | – | – | – | – | – | 0 + 4 | 2 | 8 | 0.0001 | 5000.0 | adamw |" in text
    assert "| 1 | 3 | 4 | 10 (common) | best-worst | 0.25 | 3 + 1 | 2 | 8 | 0.0001 | 5000.0 | adamw, LoRA rank 4 |" in text
    assert "### bench: base, iter_01" in text and "](grid_bench.png)" in text and (exported / "grid_bench.png").is_file()
    assert "models/checkpoints" in text and "from_single_file(\"toy-sail.safetensors\")" in text
    assert "load_lora_weights" in text and "not this model" in text  # the adapter was trained on iteration 0
    assert "no `base_model` and no `license`" in text


def test_hub_base_model_names_base_and_licence(tmp_path):
    from huggingface_hub import metadata_load
    for arch, base, licence, tag in (("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "creativeml-openrail-m", "stable-diffusion"),
                                     ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "openrail++", "stable-diffusion-xl")):
        ckpt = tmp_path / arch / "iter_00" / "ckpt"
        write_json(ckpt / "unet" / "config.json", {})
        write_json(ckpt / "sail.json", dict(base_model=base, arch=arch, preset=arch, iteration=0, parent=base))
        args = export.build_parser().parse_args(["--ckpt", str(ckpt), "--out", str(tmp_path / "out")])
        (tmp_path / f"{arch}.md").write_text(export.card_text(ckpt, tmp_path / "out", args, None))
        meta = metadata_load(tmp_path / f"{arch}.md")
        assert (meta["base_model"], meta["license"], meta["tags"][0]) == (base, licence, tag)


def test_rerun_keeps_finished_parts_and_edited_card_and_refuses_another_checkpoint(run, exported):
    files = [exported / "toy-sail.safetensors", exported / "unet" / "diffusion_pytorch_model.safetensors", exported / "README.md"]
    stamps = [f.stat().st_mtime_ns for f in files]
    run_export("--ckpt", run / "iter_01" / "ckpt", "--out", exported, "--single-file")
    assert [f.stat().st_mtime_ns for f in files] == stamps
    card = (exported / "README.md").read_text()
    (exported / "README.md").write_text(card + "\nA note by hand.\n")
    run_export("--ckpt", run / "iter_01" / "ckpt", "--out", exported)
    assert (exported / "README.md").read_text().endswith("A note by hand.\n")
    (exported / "README.md").write_text(card)
    with pytest.raises(SailError, match="ckpt"):
        run_export("--ckpt", run / "iter_00" / "ckpt", "--out", exported)
    with pytest.raises(SailError, match="USER/REPO"):
        run_export("--ckpt", run / "iter_01" / "ckpt", "--out", exported, "--push-to-hub", "not a repo")


def test_push_without_network_stops_with_one_clear_line(run, exported):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "tools.export", "--ckpt", str(run / "iter_01" / "ckpt"), "--out", str(exported),
                             "--push-to-hub", "someone/toy-sail"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--push-to-hub someone/toy-sail failed: OfflineModeIsEnabled" in error[0]
    assert "the export" in error[0] and "complete" in error[0]
