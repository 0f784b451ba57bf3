"""The way out of the kit: a trained checkpoint as a diffusers pipeline folder, a single .safetensors file in
the original Stable Diffusion layout (ComfyUI, AUTOMATIC1111), its LoRA, a model card; a push to the Hub.

    python -m tools.export --ckpt runs/toy/iter_02/ckpt --out exports/toy-sail
    python -m tools.export --ckpt runs/sdxl/iter_02/ckpt --out exports/sdxl-sail --single-file --half --push-to-hub USER/REPO

The single file holds the UNet (model.diffusion_model.*), the VAE (first_stage_model.*) and the text encoder(s):
cond_stage_model.transformer.* (SD1.5); conditioner.embedders.0.transformer.* and, in OpenCLIP layout with q/k/v
fused into in_proj, conditioner.embedders.1.model.* (SDXL). The key maps are transcribed from huggingface/diffusers
scripts/convert_diffusers_to_original_stable_diffusion.py and scripts/convert_diffusers_to_original_sdxl.py at commit
58eb52c0803ea9af3abec60841c2a093bdf1f951 (not installed with the diffusers package), block counts read from the config.

Reads:  the checkpoint (sail.json, unet/, lora/) and its base model; for the card, the run folder: each iteration's
        sail.json (by `parent`), {train,generate,self_reward,mixup}.args.json, generations.jsonl, seed/pairs.jsonl and
        stats.json, eval/table_*.md, grid_*.png, reward_accuracy.md.
Writes: <out>/: the pipeline folder (model_index.json last), <name>.safetensors (--half: <name>-fp16), lora/, README.md
        (the card; kept once edited by hand), grid_*.png; and, not uploaded, export.args.json, export.settings.json
        (another checkpoint into the same folder is refused), log.txt, README.md.sha256. Finished parts are skipped.
"""
import argparse
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from sail import common, models, settings
from sail.common import SailError
from sail.files import check_settings, folder_lock, read_jsonl, save_args, seed_pairs_path

log = logging.getLogger("sail")
NOT_UPLOADED = ["*.args.json", "*.settings.json", "*.sha256", "log.txt", ".lock", "*.tmp", "*.tmp.*"]
LICENCES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++"}  # of the released base models

# ---------------------------------------------------------------- diffusers -> original key maps
# (original, diffusers) pairs, in the scripts' order; the last two rows are the SDXL script's.
UNET_TOP = [("time_embed.0.", "time_embedding.linear_1."), ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out."),
            ("label_emb.0.0.", "add_embedding.linear_1."), ("label_emb.0.2.", "add_embedding.linear_2.")]
UNET_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"),
               ("out_layers.3", "conv2"), ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
VAE_ATTN = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
OPENCLIP = [("transformer.resblocks.", "text_model.encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
            (".c_fc.", ".fc1."), (".c_proj.", ".fc2."), (".attn", ".self_attn"), ("ln_final.", "text_model.final_layer_norm."),
            ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight")]
ORIGINAL_UNET_MODULES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.", "output_blocks.", "out.")


def rename(name, pairs):
    for original, diffusers in pairs:
        name = name.replace(diffusers, original)
    return name


def unet_layer_map(config):
    """The scripts' unet_conversion_map_layer for the config's block count and layers per block (the scripts
    hard-code 4 x 2 for SD1.5 and 3 x 2 for SDXL): each original block holds layers_per_block + 1 numbered
    modules; an upsampler sits after the attention where its block has one."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    down_attn, up_attn = (["CrossAttn" in t for t in config[key]] for key in ("down_block_types", "up_block_types"))
    pairs = []
    for i in range(n):
        for j in range(per):
            pairs.append((f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            pairs += [(f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")] * down_attn[i]
        for j in range(per + 1):
            pairs.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs += [(f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")] * up_attn[i]
        if i < n - 1:
            pairs += [(f"input_blocks.{(per + 1) * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."),
                      (f"output_blocks.{(per + 1) * i + per}.{2 if up_attn[i] else 1}.", f"up_blocks.{i}.upsamplers.0.")]
    return pairs + [("middle_block.1.", "mid_block.attentions.0.")] + \
        [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]


def convert_unet(state, config):
    layers, new = unet_layer_map(config), {}
    for key, weight in state.items():
        name = next((original + key[len(hf):] for original, hf in UNET_TOP if key.startswith(hf)), key)
        name = rename(rename(name, UNET_RESNET) if "resnets" in key else name, layers)
        if not name.startswith(ORIGINAL_UNET_MODULES):
            raise SailError(f"the UNet weight {key} has no place in the original layout")
        new["model.diffusion_model." + name] = weight
    return new


def convert_vae(state, config):
    """The scripts' vae_conversion_map for the config's block counts; the original numbers decoder blocks in reverse."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0.")]
    for i in range(n):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(per)]
        pairs += [(f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                  (f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")] * (i < n - 1)
        pairs += [(f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.") for j in range(per + 1)]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    new = {}
    for key, weight in state.items():
        name = rename(rename(key, pairs), VAE_ATTN if "attentions" in key else [])
        if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", name):
            weight = weight.reshape(*weight.shape, 1, 1)  # a linear layer in diffusers, a 1x1 convolution in the original
        new["first_stage_model." + name] = weight
    return new


def convert_openclip(state):
    """The SDXL script's convert_openclip_text_enc_state_dict: keys renamed in one pass, q/k/v fused in that order."""
    import torch
    protected = {re.escape(hf): original for original, hf in OPENCLIP}
    relabel = lambda k: re.sub("|".join(protected), lambda m: protected[re.escape(m.group(0))], k)  # noqa: E731
    new, fused = {}, {}
    for key, weight in state.items():
        qkv = re.fullmatch(r"(.*\.self_attn)\.([qkv])_proj\.(weight|bias)", key)
        if qkv:
            fused.setdefault((qkv[1], qkv[3]), {})[qkv[2]] = weight
        else:
            new[relabel(key)] = weight
    for (prefix, kind), parts in fused.items():
        new[f"{relabel(prefix)}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    new["text_projection"] = new.pop("text_projection.weight").T.contiguous()
    return new


def read_weights(folder, half=False):
    """All tensors of one component folder of a pipeline (its .safetensors file, or the shards its index lists)."""
    from safetensors.torch import load_file
    index = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted({folder / f for f in json.loads(index[0].read_text())["weight_map"].values()}) if index else \
        sorted(folder.glob("*.safetensors"))
    if len(files) != 1 and not index:
        raise SailError(f"{folder}: expected one .safetensors file or an index of shards, found {len(files)} files")
    return {k: v.half() if half else v for f in files for k, v in load_file(f).items()}  # one file in float32 at a time


def write_single_file(pipe_dir, path, half=False):
    """The pipeline folder's UNet, VAE and text encoder(s) as one file in the original SD1.5 / SDXL layout."""
    from safetensors.torch import save_file
    pipe_dir, path = Path(pipe_dir), Path(path)
    config = lambda name: json.loads((pipe_dir / name / "config.json").read_text())  # noqa: E731
    state = convert_unet(read_weights(pipe_dir / "unet", half), config("unet"))
    state.update(convert_vae(read_weights(pipe_dir / "vae", half), config("vae")))
    # transformers >= 5.6 saves CLIPTextModel without its `text_model.` level, which the original layout has
    texts = [{k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v for k, v in
              read_weights(pipe_dir / name, half).items()} for name in ("text_encoder", "text_encoder_2") if (pipe_dir / name).is_dir()]
    if len(texts) == 2:  # SDXL
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in texts[0].items()})
        state.update({"conditioner.embedders.1.model." + k: v for k, v in convert_openclip(texts[1]).items()})
    else:
        state.update({"cond_stage_model.transformer." + k: v for k, v in texts[0].items()})
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    shutil.copymode(pipe_dir / "model_index.json", tmp)  # safetensors writes 0600; the pipeline's files follow the umask
    os.replace(tmp, path)


# ---------------------------------------------------------------- the model card, from the run folder
def read_args(folder, stage):
    path = Path(folder) / f"{stage}.args.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as err:
        raise SailError(f"{path}: malformed JSON ({err.msg})") from None


def lineage(ckpt):
    """[(checkpoint, sail.json)] from the first iteration to `ckpt` by `parent` (moved run: the iter_XX/ckpt beside)."""
    chain, seen = [], set()
    while ckpt is not None and ckpt.resolve() not in seen:
        seen.add(ckpt.resolve())
        chain.append((ckpt, models.read_checkpoint_info(ckpt)))
        parent = chain[-1][1].get("parent")
        ckpt = next((c for c in (Path(parent), ckpt.parent.parent / Path(parent).parent.name / Path(parent).name)
                     if (c / "sail.json").is_file()), None) if parent else None
    return chain[::-1]


def iteration_row(folder, info):
    gen, reward, mix = (read_args(folder, stage) for stage in ("generate", "self_reward", "mixup"))
    train = {**read_args(folder, "train"), **info}  # sail.json holds what training settled on
    prompts = len({r["prompt_id"] for r in read_jsonl(folder / "generations.jsonl", required=("prompt_id",))}) \
        if (folder / "generations.jsonl").is_file() else "–"
    counts, lora, lr = info.get("pair_counts"), info.get("lora"), train.get("lr")
    cells = [info.get("iteration", "?"), prompts, gen.get("num_candidates", "–"),
             f"{reward['draws']} ({'own' if reward.get('no_common_draws') else 'common'})" if reward else "–",
             reward.get("pairing", "–"), mix.get("human_share", "–"),
             f"{counts.get('self', 0)} + {counts.get('human', 0)}" if counts else "–", train.get("steps", "–"),
             train.get("effective_batch", train.get("batch_size", "–")), f"{lr:.3g}" if isinstance(lr, float) else lr or "–",
             train.get("beta", "–"), train.get("optimizer", "–") + (f", LoRA rank {lora['rank']}" if lora else "")]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def seed_lines(run):
    pairs, stats = seed_pairs_path(run), run / "seed" / "stats.json"
    if not pairs.is_file():
        return []
    source = ("Pick-a-Pic v2 through tools/prepare_pickapic.py" if (run / "pickapic.args.json").is_file() else
              "the toy world's hidden human through toy.data" if (run / "toy_world.data.args.json").is_file() else "a pair file")
    n = sum(1 for line in pairs.read_text().splitlines() if line.strip())
    return [f"Human seed: {n} preference pairs (seed/pairs.jsonl) from {source}.", ""] + \
        (["<details><summary>seed/stats.json</summary>", "", "```json", stats.read_text().strip(), "```", "</details>", ""]
         if stats.is_file() else [])


def eval_lines(run, out):
    """The run's evaluation as 05_eval.py wrote it; its grids are copied beside the card."""
    ev, lines = run / "eval", []
    for table in sorted(ev.glob("table_*.md")) + sorted(ev.glob("reward_accuracy.md")):
        lines += [re.sub(r"^## ", "### ", table.read_text().strip(), flags=re.M), ""]
        grid = ev / f"grid_{table.stem[len('table_'):]}.png"
        if grid.is_file():
            shutil.copyfile(grid, out / (grid.name + ".tmp"))
            os.replace(out / (grid.name + ".tmp"), out / grid.name)
            lines += [f"![rows: prompts; columns: the models above on the same seed]({grid.name})", ""]
    return lines or [f"None in the run folder yet: `python 05_eval.py --run {run}` writes it (toy runs: add "
                     "`--benchmark run --metrics oracle`)."]


def is_hub_id(name):
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name or "")) and not Path(name).exists()


def card_text(ckpt, out, args, single_file):
    from huggingface_hub import ModelCardData
    chain = lineage(ckpt)
    info, run, where = chain[-1][1], ckpt.parent.parent, args.push_to_hub or str(out)
    arch, base, parent = info["arch"], info["base_model"], info.get("parent")
    hub_base, preset = base if is_hub_id(base) else None, settings.PRESETS.get(info.get("preset") or "", {})
    steps, cfg, size = preset.get("steps", 50), preset.get("cfg", 7.5), preset.get("resolution", 512)
    name, cls = ("SDXL", "StableDiffusionXLPipeline") if arch == "sdxl" else ("Stable Diffusion 1.5", "StableDiffusionPipeline")
    meta = ModelCardData(base_model=hub_base, license=LICENCES[arch] if hub_base else None, library_name="diffusers",
                         pipeline_tag="text-to-image", tags=["stable-diffusion-xl" if arch == "sdxl" else "stable-diffusion",
                                                             "text-to-image", "diffusers", "dpo", "sail"])
    lines = ["---", meta.to_yaml(), "---", "", f"# {out.name}", "", f"{name} aligned to human preferences with SAIL "
             "(iterative DiffusionDPO on a small human seed set and self-labelled pairs): iteration "
             f"{info.get('iteration')} of the run `{run.name}`, from the base model `{base}`.", ""]
    lines += [] if hub_base else [f"`{base}` is no Hub model (a kit-built model or a local folder), so the metadata names no "
                                  "`base_model` and no `license`: add the base model's before sharing this model.", ""]
    lines += ["## Use it", "", "diffusers (the folder is a full pipeline):", "", "```python", "import torch",
              "from diffusers import DiffusionPipeline",
              f'pipe = DiffusionPipeline.from_pretrained("{where}", torch_dtype=torch.float16).to("cuda")',
              f'image = pipe("a red fox in the snow", num_inference_steps={steps}, guidance_scale={cfg}, height={size}, '
              f'width={size}).images[0]', "```", ""]
    lines += [f"Single file `{single_file}` (the original Stable Diffusion checkpoint layout): ComfyUI: copy it into "
              "`ComfyUI/models/checkpoints/` and pick it in a Load Checkpoint node; AUTOMATIC1111 web UI: into "
              f'`stable-diffusion-webui/models/Stable-diffusion/`; diffusers: `{cls}.from_single_file("{single_file}")`.',
              ""] if single_file else []
    if (out / "lora").is_dir():
        lines += [f"LoRA `lora/`: the adapter the last iteration trained on `{parent}`, merged into the pipeline above "
                  "already. On a pipeline of that start model it gives this model:", "", "```python",
                  f'pipe = DiffusionPipeline.from_pretrained("{parent if parent == hub_base else "START_MODEL"}")',
                  f'pipe.load_lora_weights("{where}", subfolder="lora")' if args.push_to_hub else
                  f'pipe.load_lora_weights("{out / "lora"}")', "```", ""]
        lines += [] if parent == base else ["The start model is an earlier iteration of the run (`python -m tools.export --ckpt` "
                                            "it for its pipeline): the adapter alone on the base model is not this model.", ""]
    lines += ["## How it was trained", ""] + seed_lines(run) + [
        "Iteration 0 is DPO on the human seed; each later one generates N candidates per prompt, ranks them by the model's "
        "implicit reward over K noise draws, mixes the self-labelled pairs with human ones and trains with DPO.", "",
        "| iteration | prompts | N | K draws | pairing | human share | pairs: self + human | steps | batch | lr | beta | "
        "optimizer |", "|---" * 12 + "|"] + [iteration_row(c.parent, i) for c, i in chain]
    lines += ["", "## Evaluation", ""] + eval_lines(run, out)
    lines += ["", "Made with the SAIL kit's tools/export.py (SAIL: Self-Amplified Iterative Learning for diffusion model alignment)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the command
def write_pipeline(ckpt, out):
    """The pipeline folder at <out>'s top level (where the Hub looks); model_index.json, moved last, marks it finished."""
    if (out / "model_index.json").is_file():
        return log.info("%s holds the pipeline already; kept", out)
    staging = out.with_name(out.name + ".pipeline.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    models.export_pipeline(ckpt, staging)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == "model_index.json"):
        if (out / entry.name).is_dir():
            shutil.rmtree(out / entry.name)  # left by an export killed before model_index.json
        os.replace(entry, out / entry.name)
    staging.rmdir()
    log.info("wrote the diffusers pipeline %s", out)


def upload_list(out):
    """The files --push-to-hub uploads: the folder less the local bookkeeping (huggingface_hub's own filter)."""
    from huggingface_hub.utils import filter_repo_objects
    files = sorted(p.relative_to(out).as_posix() for p in Path(out).rglob("*") if p.is_file())
    return list(filter_repo_objects(files, ignore_patterns=NOT_UPLOADED))


def push(out, repo, private):
    from huggingface_hub import create_repo, upload_folder
    try:
        url = create_repo(repo, private=private, exist_ok=True, repo_type="model")
        upload_folder(repo_id=repo, folder_path=out, ignore_patterns=NOT_UPLOADED, commit_message="SAIL kit export")
    except Exception as err:  # network, login and HTTP failures come as many exception classes
        raise SailError(f"--push-to-hub {repo} failed: {type(err).__name__}: {(str(err).splitlines() or [''])[0]} | the export "
                        f"in {out} is complete; check the network and the login (`hf auth login` or HF_TOKEN), then rerun "
                        "the same command to push") from None
    log.info("pushed %d files to %s", len(upload_list(out)), url)


def write_card(out, card):
    """README.md, unless edited by hand since tools/export.py wrote it (README.md.sha256 records what it wrote)."""
    readme, stamp, digest = out / "README.md", out / "README.md.sha256", hashlib.sha256(card.encode()).hexdigest()
    old = hashlib.sha256(readme.read_bytes()).hexdigest() if readme.is_file() else None
    if old and old != digest and not (stamp.is_file() and stamp.read_text() == old):
        return log.info("%s was edited since it was written; kept (delete it to write the card anew)", readme)
    if old != digest:
        (out / "README.md.tmp").write_bytes(card.encode())
        os.replace(out / "README.md.tmp", readme)
        stamp.write_text(digest)


def main(args):
    ckpt, out = Path(args.ckpt), Path(args.out)
    info = models.read_checkpoint_info(ckpt)
    if args.push_to_hub and not is_hub_id(args.push_to_hub):
        raise SailError(f"--push-to-hub {args.push_to_hub}: expected a Hub repository id USER/REPO")
    with folder_lock(out, "export"):
        common.setup_logging(out, "export")
        check_settings(out / "export.settings.json", dict(ckpt=models.model_setting(str(ckpt), out)), "use another --out")
        save_args(out, "export", args, checkpoint=info)
        write_pipeline(ckpt, out)
        single_file = f"{out.name}{'-fp16' if args.half else ''}.safetensors" if args.single_file else None
        if single_file and not (out / single_file).is_file():
            write_single_file(out, out / single_file, args.half)
            log.info("wrote %s (%.1f MB)", out / single_file, (out / single_file).stat().st_size / 1e6)
        if (ckpt / "lora").is_dir() and not (out / "lora").is_dir():
            shutil.copytree(ckpt / "lora", out / "lora.tmp", dirs_exist_ok=True)
            os.replace(out / "lora.tmp", out / "lora")
        write_card(out, card_text(ckpt, out, args, single_file))
    log.info("export finished: %s (%d files to upload)", out, len(upload_list(out)))
    if args.push_to_hub:
        push(out, args.push_to_hub, args.private)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder (sail.json + unet/), e.g. runs/toy/iter_02/ckpt")
    p.add_argument("--out", required=True, help="export folder to write, e.g. exports/toy-sail")
    p.add_argument("--single-file", action="store_true", help="also one .safetensors in the original SD layout (ComfyUI, A1111)")
    p.add_argument("--half", action="store_true", help="the single file in float16 (half the size)")
    p.add_argument("--push-to-hub", metavar="USER/REPO", help="upload the export folder to this Hub model repository")
    p.add_argument("--private", action="store_true", help="create the Hub repository private")
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
