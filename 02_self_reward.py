"""Self-rewarding ranking: the model's implicit reward (Eq. 8) for every candidate image, and one
self-labelled preference pair per prompt.

    r(x) = -beta/2 * mean over K draws of ( ||eps - eps_theta(x_t, y, t)||^2 - ||eps - eps_ref(x_t, y, t)||^2 )

eps_theta is the current model, eps_ref the base model (--ref chooses another), errors are means
over the latent's elements (the convention the DPO loss and its beta = 5000 use). K = 10 draws
of (t, noise) by default (the paper's SR1; 20 and 30 are SR2/SR3). By default all N candidates
of a prompt share the same K draws (common random numbers): the comparison between images is
what matters, and shared draws remove most of its noise; --no-common-draws draws per image.
--draw-scheme stratified (one t per stratum of [0, 1000)), antithetic (half the draws use minus
the noise of the other half) or stratified-antithetic make the K draws less variable; iid, the
paper's, is the default.
Pairs: best vs worst of the N (the paper), or --pairing random (Table 5 ablation); a prompt
whose chosen images tie gives no pair: rewards equal within float32 round-off (|r_w - r_l| <=
beta x 1e-6, e.g. a model equal to its reference, where every reward is 0), or two byte-identical
image files (which independent draws would otherwise rank by noise alone). The rule is one
function, sail/pairing.py: self_pair.

Command (iteration i of a run):
    python 02_self_reward.py --run runs/toy --iter 1
is short for
    python 02_self_reward.py --ckpt runs/toy/iter_00/ckpt --dir runs/toy/iter_01
Several GPUs: `accelerate launch 02_self_reward.py ...` shards the prompts.

Reads:  <dir>/generations.jsonl and its images; the checkpoint; the reference (default: the
        checkpoint's base model).
Writes: <dir>/rewards.jsonl (one line per image: prompt_id, index, image, reward, reward_se),
        <dir>/pairs.jsonl (prompt, prompt_id, image_w, image_l, source "self", p = sigmoid(r_w - r_l),
        reward_w, reward_l), self_reward.args.json, log.txt, self_reward.settings.json (what decides
        a reward: a rerun with other --draws, --beta, --ref, draws or seed stops rather than mix),
        self_reward.<rank>.timing.json. While running, finished prompts go to
        rewards.partial.*.jsonl; a killed run continues from there.
"""
import argparse
import collections
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from sail import batches, common, files, models, pairing, self_reward, settings

log = logging.getLogger("sail")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run folder; with --iter, sets --ckpt/--dir")
    p.add_argument("--iter", type=int, help="iteration number (1, 2, ...)")
    p.add_argument("--ckpt", help="the current model: checkpoint folder")
    p.add_argument("--ref", default="base", help="reference model: 'base' (the checkpoint's base model) or a model")
    p.add_argument("--dir", type=Path, help="iteration folder holding generations.jsonl")
    return settings.add_arguments(p, "self_reward")


def resolve_paths(args):
    if args.run is not None and args.iter is not None:
        args.ckpt = args.ckpt or str(files.checkpoint_dir(args.run, args.iter - 1))
        args.dir = args.dir or files.iteration_dir(args.run, args.iter)
    if not (args.ckpt and args.dir):
        raise common.SailError("give --run and --iter, or both --ckpt and --dir")
    return args


def read_candidates(gen_file):
    """generations.jsonl -> its rows and {prompt_id: the prompt's rows}; every prompt needs two images."""
    gens = files.read_jsonl(gen_file, required=("prompt_id", "prompt", "index", "image"),
                            types={"prompt_id": str, "prompt": str, "index": int, "image": str})
    groups = {}
    for row in gens:
        groups.setdefault(row["prompt_id"], []).append(row)
    small = [pid for pid, g in groups.items() if len(g) < 2]
    if small:
        raise common.SailError(f"{gen_file}: prompt '{small[0]}' has fewer than 2 images; nothing to compare")
    return gens, groups


def read_finished(folder, per_prompt):
    """Rows of prompts whose every candidate was scored by a killed run: {prompt_id: {index: row}}."""
    rows = []
    for part in sorted(folder.glob("rewards.partial.*.jsonl")):
        rows += files.read_jsonl(part, allow_truncated_tail=True)
    by_prompt = {}
    for row in rows:
        by_prompt.setdefault(row["prompt_id"], {})[row["index"]] = files.strip_private(row)
    return {pid: r for pid, r in by_prompt.items() if len(r) == per_prompt.get(pid, -1)}


def keep_whole_prompts(folder, per_prompt):
    """A killed run's partial files -> one file with only its whole prompts (main process)."""
    finished = read_finished(folder, per_prompt)
    for part in folder.glob("rewards.partial.*.jsonl"):
        part.unlink()
    if finished:
        kept = [row for rows in finished.values() for row in rows.values()]
        files.write_jsonl_atomic(folder / "rewards.partial.0.jsonl", kept)


def score_prompts(args, state, desc, ref_desc, resolution, folder, groups, todo):
    """Self-reward every candidate of the prompts `todo`, one prompt at a time, appending each finished
    prompt to this process's rewards.partial.<rank>.jsonl."""
    device, gen_file = state.device, folder / "generations.jsonl"
    dtype = models.inference_dtype(device, args.mixed_precision)
    pipe = models.load_pipeline(desc, device, dtype, encoding=True)
    speed = dict(compile=args.compile, fuse_qkv=args.fuse_qkv, channels_last=args.channels_last)
    unet = models.speed_up(pipe.unet.eval(), **speed)
    ref_unet = models.speed_up(models.load_unet(ref_desc, dtype).to(device).eval(), **speed)
    start = time.time()
    with open(folder / f"rewards.partial.{state.process_index}.jsonl", "a") as partial:
        for pid in common.progress(todo, desc="self-reward"):
            group = groups[pid]
            images = [files.load_image(folder / r["image"], where=f"{gen_file}:{r['_line']}") for r in group]
            latents = batches.encode_images(pipe.vae, images, device).to(dtype)
            cond = batches.encode_prompts(pipe, [group[0]["prompt"]], device)
            reward, se = self_reward.self_rewards(unet, ref_unet, pipe.scheduler, latents, cond, resolution, args.draws,
                                                  args.beta, seed=common.derive_seed(args.seed, "draws", pid),
                                                  common_draws=not args.no_common_draws, batch_size=args.reward_batch,
                                                  scheme=args.draw_scheme)
            if not torch.isfinite(reward).all():
                raise common.SailError(f"non-finite self-reward for prompt '{pid}' ({gen_file}:{group[0]['_line']}); "
                                       f"check the checkpoint {args.ckpt} (NaN weights?) or use --mixed-precision no")
            lines = [dict(prompt_id=pid, prompt=r["prompt"], index=r["index"], image=r["image"],
                          reward=reward[i].item(), reward_se=se[i].item(), draws=args.draws)
                     for i, r in enumerate(group)]
            partial.write("".join(json.dumps(x) + "\n" for x in lines))
            partial.flush()
    n_images = sum(len(groups[p]) for p in todo)
    timing = files.save_timing(folder, f"self_reward.{state.process_index}", n_images, "images", time.time() - start)
    log.info("scored %d images in %.1f s (%.2f rewards/s, %d UNet passes each)", n_images, timing["seconds"],
             timing["rate"], 2 * args.draws)


def write_pairs(args, folder, gens, groups):
    """Every prompt scored: rewards.jsonl, and pairs.jsonl from the pairing rule (sail/pairing.py)."""
    scored = read_finished(folder, {pid: len(g) for pid, g in groups.items()})
    missing = [pid for pid in groups if pid not in scored]
    if missing:
        raise common.SailError(f"{len(missing)} prompts were not scored, e.g. '{missing[0]}'")
    rewards = [scored[r["prompt_id"]][r["index"]] for r in gens]
    pairs, skipped = [], collections.Counter()
    for pid, group in groups.items():
        pair, why = pairing.self_pair(pid, [scored[pid][r["index"]] for r in group], args.pairing, args.seed, args.beta,
                                      args.min_p, pairing.same_file_bytes(folder))
        if pair is None:
            skipped[why] += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise common.SailError(f"no pair could be formed from {folder / 'generations.jsonl'}: all "
                               f"{skipped[pairing.TIE]} prompts tie (a model equal to its reference gives reward 0 "
                               f"to every image; train iteration 0 first) or fail --min-p")
    files.write_jsonl_atomic(folder / "rewards.jsonl", rewards)
    files.write_jsonl_atomic(folder / "pairs.jsonl", pairs)
    for part in folder.glob("rewards.partial.*.jsonl"):
        part.unlink()
    mean_se = sum(r["reward_se"] for r in rewards) / len(rewards)
    mean_p = sum(p["p"] for p in pairs) / len(pairs)
    log.info("wrote %d pairs (%s; %d ties, %d below --min-p) | mean reward s.e. %.3f | mean p(w > l) %.3f",
             len(pairs), args.pairing, skipped[pairing.TIE], skipped[pairing.BELOW_MIN_P], mean_se, mean_p)


def main(args):
    state = models.process_state()
    args = resolve_paths(args)
    folder = Path(args.dir)
    if state.is_main_process:
        common.setup_logging(folder, "self_reward")
    if (folder / "pairs.jsonl").exists():
        log.info("%s exists; skipping (delete it and rewards.jsonl to score again)", folder / "pairs.jsonl")
        return
    desc = models.describe_model(args.ckpt)
    preset = settings.get_preset(desc.preset or "sd15")
    settings.settle(args, preset, "self_reward")
    ref_desc = dataclasses.replace(desc, unet=None, ckpt=None) if args.ref == "base" else models.describe_model(args.ref)
    gens, groups = read_candidates(folder / "generations.jsonl")
    per_prompt = {pid: len(g) for pid, g in groups.items()}
    if state.is_main_process:  # what decides a reward; a rerun with other settings stops rather than mix rewards
        files.check_settings(folder / "self_reward.settings.json", dict(
            model=models.model_setting(args.ckpt, folder), reference=models.model_setting(args.ref, folder),
            **settings.record(args, "self_reward")),
            f"delete {folder}/rewards.partial.*.jsonl and {folder / 'self_reward.settings.json'} to score anew")
        keep_whole_prompts(folder, per_prompt)
    state.wait_for_everyone()
    finished = read_finished(folder, per_prompt)
    todo = [pid for pid in groups if pid not in finished][state.process_index::state.num_processes]
    if state.is_main_process:
        files.save_args(folder, "self_reward", args, model=desc, reference=ref_desc, num_processes=state.num_processes)
    log.info("self-reward of %d images (%d prompts, %d scored already) | model %s vs reference %s | K=%d %s %s draws, beta %g",
             len(gens), len(groups), len(finished), args.ckpt, ref_desc.unet or ref_desc.base_model, args.draws,
             "independent" if args.no_common_draws else "common", args.draw_scheme, args.beta)
    if todo:
        score_prompts(args, state, desc, ref_desc, preset["resolution"], folder, groups, todo)
    state.wait_for_everyone()
    if state.is_main_process:
        write_pairs(args, folder, gens, groups)


def locked_main(args):
    args = resolve_paths(args)
    with files.folder_lock(args.dir, "self_reward"):
        main(args)


if __name__ == "__main__":
    common.run_stage(locked_main, build_parser().parse_args())
