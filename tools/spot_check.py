"""The spot check: before an iteration trains, does a human still prefer the self-reward's winners?

Later SAIL iterations train on pairs their own model labelled. When that self-reward drifts from
human taste the loop trains on wrong pairs and the model gets worse (the toy's runs show it:
toy/RESULTS.md, section 6). Held-out seed pairs (tools/drift_guard.py) were drawn by the base model and do not see
this; a spot check asks about the pairs the loop is about to train on. Before iteration ITER trains,
a human labels M of iter_XX/pairs.jsonl (one per prompt, chosen by a seeded hash; sides shuffled, the
self-reward's choice not shown) on the labelling page. The agreement is the share of a/b judgements that prefer
the self-reward's winner (ties and skips dropped). The first iteration checked is the reference: an
agreement more than --drop below it (or below --below) ends the loop before ITER trains, and model
ITER-1 is the one to keep (toy/study_guard.py replays the rule on finished toy runs; its results are in
toy/RESULTS.md, section 8). A drop rather than a fixed threshold: a noisy human agrees less with every pair.

Commands (run_all.sh runs it between 02 and 03 with GUARD=spot, with --labeller toy in a run that
toy.data made):
    python -m tools.spot_check --run runs/mine --iter 2 [--pairs 32] [--drop 0.15] [--below 0] [--seed 0]
        [--labellers alice,bob] [--host 127.0.0.1] [--port 8765] [--idle-timeout 30] [--max-connections 64]
    python -m tools.spot_check --run runs/toy --iter 2 --labeller toy
The first serves the pairs on the labelling page (tools/label_server.py: the same tokens, limits and
headers as tools/label.py's), prints one link per labeller (http://HOST:PORT/?token=...; the links stay
the same for every iteration of the run) and waits until each pair has a judgement; Ctrl-C stops it and
the same command continues from the judgements so far. With --labeller toy the toy world's human
answers, without HTTP: the oracle, or the noisy Bradley-Terry rater of toy.data --rater-noise
(recorded in toy_world.data.json).
Exit status 3: the loop should stop before ITER trains.

Reads:  <run>/iter_XX/pairs.jsonl and its images; <run>/eval/spot/iter_YY/agreement.json of earlier
        iterations; with --labeller toy <run>/toy_world.data.json.
Writes: <run>/eval/spot/tokens.json (the labellers' tokens, readable by the owner only);
        <run>/eval/spot/iter_XX/: plan.json (pairs, seed, labeller: a rerun with others stops),
        generations.jsonl (each chosen pair as two candidates, image paths relative to iter_XX),
        judgements.jsonl (appended, as tools/label.py's), agreement.json, spot.args.json, log.txt; then
        <run>/eval/spot/spot.json (agreement per iteration, the rule, where it stopped).
"""
import argparse
import hashlib
import json
import logging
import sys
import threading
import time
from pathlib import Path

import numpy as np

from sail import common, files
from sail.common import SailError
from sail.guards import STOP, stops
from sail.labelling import Labelling
from tools import label_server
from toy import world

log = logging.getLogger("sail")


TOY_LABELLER = "toy-rater"


def choose_pairs(pairs, count, seed, iteration):
    """count self pairs, one per prompt, in a seeded order that does not depend on the file's order (0: all)."""
    rows = list({p["prompt"]: p for p in reversed(pairs) if p["source"] == "self"}.values())
    rows.sort(key=lambda r: hashlib.sha256(f"{seed}/spot/{iteration}/{r['prompt']}".encode()).digest())
    return rows[:count] if count > 0 else rows


def prepare(args, folder, iter_dir):
    """generations.jsonl, written once: each chosen pair as a prompt's two candidates, the self-reward's winner
    index 0 and its loser index 1 (the page shuffles the sides and never shows either)."""
    pairs_file = iter_dir / "pairs.jsonl"
    if (folder / "generations.jsonl").is_file():
        return
    chosen = choose_pairs(files.read_pairs(pairs_file), args.pairs, args.seed, args.iter)
    if not chosen:
        raise SailError(f"{pairs_file}: no self-labelled pair to check")
    rows = []
    for k, pair in enumerate(chosen):
        for index, side in enumerate(("w", "l")):
            image = pair["_image_" + side]
            if image.parent != (iter_dir / "images").resolve():
                raise SailError(f"{pairs_file}:{pair['_line']}: image_{side} {pair['image_' + side]} is not in "
                                f"{iter_dir / 'images'} (02_self_reward.py's pairs point there)")
            rows.append(dict(prompt_id=pair.get("prompt_id", f"pair{pair['_line']}"), prompt=pair["prompt"], index=index,
                             image=f"images/{image.name}", self_reward=("winner", "loser")[index]))
    files.write_jsonl_atomic(folder / "generations.jsonl", rows)
    log.info("%d of %s's self pairs to label", len(chosen), pairs_file)


def toy_answers(labelling, run, seed, iteration):
    """The toy world's human judges every pair not yet judged, through the page's own Labelling."""
    data = Path(run) / "toy_world.data.json"
    if not data.is_file():
        raise SailError(f"{data}: not found; --labeller toy needs a run made by toy.data")
    settings = json.loads(data.read_text())
    noise, tie_margin = settings.get("rater_noise", 0.0), settings.get("tie_margin", 0.02)
    for k, pair in enumerate(labelling.pairs):
        if pair["id"] in labelling.judged:
            continue
        a, b = (world.oracle_score(pair["prompt"], files.load_image(labelling.image_dir / Path(pair[side]).name))
                for side in ("image_a", "image_b"))
        choice = world.rater_choice(a, b, tie_margin, noise, np.random.default_rng([seed, iteration, k]).random)
        labelling.judge(TOY_LABELLER, pair["id"], "tie" if choice is None else "ab"[choice])
    log.info("the toy's %s answered (rater noise %g)", "oracle" if noise <= 0 else "noisy rater", noise)


def serve(labelling, spot_dir, args):
    """The labelling page until every pair has a judgement in force; Ctrl-C stops it (the judgements are kept)."""
    server = label_server.start(labelling, spot_dir, args, "spot check page")
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    print(f"spot check page: serving on {server.host}:{server.port} ({len(labelling.pairs)} pairs; the loop waits "
          f"until each is judged; Ctrl-C stops, the same command continues)", flush=True)
    left = len(labelling.pairs)
    try:
        while True:
            with labelling.lock:
                left = len(labelling.pairs) - len(labelling.judged)
            if not left:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        raise SailError(f"stopped with {left} pair(s) to judge; the judgements so far are in {labelling.path}") from None
    finally:
        server.stop()
        thread.join()


def agreement(labelling):
    """Of the a/b judgements in force, how many prefer the self-reward's winner (generations' index 0)."""
    winners = {r["image"] for r in files.read_jsonl(labelling.folder / "generations.jsonl") if r["index"] == 0}
    choices = list(labelling.active.values())
    kept = [j for j in choices if j["choice"] in ("a", "b")]
    agree = sum(j["image_" + j["choice"]] in winners for j in kept)
    return dict(agreement=agree / len(kept) if kept else None, agree=agree, judged=len(kept), pairs=len(labelling.pairs),
                ties=sum(j["choice"] == "tie" for j in choices), skips=sum(j["choice"] == "skip" for j in choices),
                labellers=sorted({j["labeller"] for j in choices}))


def label(args, folder, iter_dir):
    """agreement.json for this iteration: found, or labelled now (the page, or the toy's human)."""
    done, pairs_file = folder / "agreement.json", iter_dir / "pairs.jsonl"
    if not pairs_file.is_file():
        raise SailError(f"{pairs_file}: not found (02_self_reward.py --iter {args.iter} writes it)")
    with files.folder_lock(folder, "spot check"):
        files.check_settings(folder / "plan.json", dict(pairs=args.pairs, seed=args.seed, labeller=args.labeller,
                                 pairs_sha256=hashlib.sha256(pairs_file.read_bytes()).hexdigest()),
                                 f"delete {folder} to label anew")
        if done.is_file():
            return json.loads(done.read_text())
        files.save_args(folder, "spot", args)
        prepare(args, folder, iter_dir)
        labelling = Labelling(folder, args.seed, len(files.read_jsonl(folder / "generations.jsonl")) // 2,
                              images=iter_dir / "images")
        if args.labeller == "toy":
            toy_answers(labelling, args.run, args.seed, args.iter)
        else:
            serve(labelling, folder.parent, args)
        result = agreement(labelling)
        files.write_json_atomic(done, result)
    return result


def main(args):
    spot_dir, iter_dir = Path(args.run) / "eval" / "spot", files.iteration_dir(args.run, args.iter)
    folder = spot_dir / files.iteration_name(args.iter)
    common.setup_logging(folder, "spot_check")
    if args.iter < 1:
        raise SailError(f"need --iter >= 1 (got {args.iter})")
    label_server.labeller_names(args.labellers)
    if not (folder / "agreement.json").is_file() and (files.checkpoint_dir(args.run, args.iter) / "sail.json").is_file():
        log.info("%s trained already without a spot check: nothing to check", iter_dir)
        return 0
    label(args, folder, iter_dir)
    return apply_rule(spot_dir, args)


def apply_rule(spot_dir, args):
    """spot.json from the agreements of the iterations checked so far; STOP when the rule says so."""
    found = {files.iteration_number(p.parent.name): json.loads(p.read_text())["agreement"]
             for p in sorted(spot_dir.glob("iter_*/agreement.json"))}
    measured = {it: a for it, a in found.items() if it is not None and it <= args.iter and a is not None}
    log.info("spot check: the human prefers the self-reward's winner in %s",
             ", ".join(f"{files.iteration_name(it)} {a:.2f}" for it, a in measured.items()) or "no pair yet")
    first, stop = min(measured, default=None), False
    if args.iter not in measured:  # only ties and skips: no signal, no stop
        log.warning("spot check: no pair of %s was judged a or b; going on", files.iteration_name(args.iter))
    else:
        stop = stops(measured[first], measured[args.iter], args.drop if args.iter > first else None,
                     args.below if args.below > 0 else None)
    if stop:
        log.info("spot check: %s's agreement %.2f is more than %g below %s's %.2f%s: stop before it trains; keep %s",
                 files.iteration_name(args.iter), measured[args.iter], args.drop, files.iteration_name(first),
                 measured[first], f" or below {args.below:g}" if args.below > 0 else "",
                 files.checkpoint_dir(args.run, args.iter - 1))
    files.write_json_atomic(spot_dir / "spot.json", dict(
        agreement={files.iteration_name(it): a for it, a in measured.items()},
        reference=first and files.iteration_name(first), drop=args.drop, below=args.below,
        stopped_before=files.iteration_name(args.iter) if stop else None,
        keep=str(files.checkpoint_dir(args.run, args.iter - 1)) if stop else None))
    return STOP if stop else 0


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder")
    p.add_argument("--iter", type=int, required=True, help="the iteration about to train (its pairs.jsonl exists)")
    p.add_argument("--pairs", type=int, default=32, help="self pairs to label (0: all of them)")
    p.add_argument("--drop", type=float, default=0.15, help="fall of the agreement from the first iteration's that stops")
    p.add_argument("--below", type=float, default=0.0, help="agreement below which the loop stops (0: no such rule)")
    p.add_argument("--labeller", choices=["page", "toy"], default="page", help="who answers: you on the page, or the toy's human")
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of pairs, the sides and the toy rater")
    label_server.add_flags(p)
    return p


if __name__ == "__main__":
    common.run_stage(lambda args: sys.exit(main(args)), build_parser().parse_args())
