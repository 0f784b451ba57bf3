"""Human labelling in the browser: a SAIL seed set of pairs from your own prompts and your own taste.

The server (tools/label_server.py, the page in tools/label_page.html) listens on 127.0.0.1 unless --host says
otherwise, and opens the page only to the links it prints, one per labeller (docs/labelling.md, "Opening the page
to others").

Commands:
    python -m tools.label --run runs/mine --prompts my_prompts.txt --preset toy [--label-prompts 40] [--candidates 4]
        [--pool-sizes 64,64] [--target 200] [--labellers alice,bob] [--host 127.0.0.1] [--port 8765]
        [--idle-timeout 30] [--max-connections 64] [--seed 0]
    python -m tools.label --run runs/mine --finish
    RUN=runs/mine EVAL=0 bash run_all.sh toy 2

The first splits the prompt file (seeded, text normalised) into --label-prompts prompts to label and the prompt
pools of the SAIL iterations (the kit's evaluation prompts kept out of the pools), draws --candidates images per
label prompt with the preset's base model (sail.generation, 01_generate.py's seeds, files and settings record) in a
child process, so that the serving process never loads torch, then serves the page: two candidates of one prompt,
every pair of a prompt's candidates, pairs interleaved across prompts in a seeded order; each labeller (their own
link, http://HOST:PORT/?token=...) is handed a pair nobody has judged or holds. The same command again replays the
judgements and continues, with the same links. --finish writes the seed pairs (a/b judgements in force; ties, skips
and undone judgements dropped, as the paper drops ties) and the pools. Keys on the page: left arrow or 1, right arrow
or 2, down or t (tie), s (skip), u or Backspace (undo), z or a click on an image (full size). docs/labelling.md has
more.

Reads:  the prompt file (.txt: one prompt a line, blank lines skipped, ids p0001, p0002, ...; .jsonl: prompt_id and
        prompt per line), the preset's base model; on a restart label/judgements.jsonl and label/tokens.json.
Writes: <run>/label/: plan.json (the split's settings: a rerun with others stops), prompts.jsonl (to label),
        pool_prompts.jsonl (the pools' prompts in order), images/, generations.jsonl and generate.settings.json (as
        01_generate.py's), tokens.json (a token per labeller, readable by the owner only), judgements.jsonl (one line
        per judgement or undo, appended and fsynced before the answer; a failed write cut back to the last complete
        line), label.args.json, log.txt. With --finish: seed/pairs.jsonl (image paths ../label/images/...),
        seed/stats.json, seed/label.finish.args.json, pools/iter_01.jsonl ...
"""
import argparse
import hashlib
import json
import logging
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from sail import common, files
from sail.common import SailError
from sail.files import normalise_prompt
from sail.importing import KIT_PROMPTS, prompt_lines
from sail.labelling import CHOICES, Labelling
from tools import label_server

log = logging.getLogger("sail")


# ---------------------------------------------------------------- prompts and candidates
def read_prompt_file(path):
    """{prompt_id, prompt} rows of a .jsonl or .txt file; prompts equal up to case and spacing stop, naming the line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        rows = files.read_prompts(path)
    else:
        if not path.is_file():
            raise SailError(f"{path}: file not found")
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                rows.append(dict(prompt_id=f"p{len(rows) + 1:04d}", prompt=line.strip(), _line=lineno))
        if not rows:
            raise SailError(f"{path}: no prompts in file")
    first = {}
    for row in rows:
        norm = normalise_prompt(row["prompt"])
        if norm in first:
            raise SailError(f"{path}:{row['_line']}: duplicate prompt (first on line {first[norm]}): {row['prompt'][:80]!r}")
        first[norm] = row["_line"]
    return [files.strip_private(row) for row in rows]


def split_prompts(rows, n_label, pool_sizes, seed, excluded):
    """A seeded order of the prompts: the first n_label to label, then the pools' prompts (none of `excluded`)."""
    order = sorted(rows, key=lambda r: hashlib.sha256(f"{seed}/label/{normalise_prompt(r['prompt'])}".encode()).digest())
    label, rest = order[:n_label], [r for r in order[n_label:] if normalise_prompt(r["prompt"]) not in excluded]
    if len(label) < n_label or len(rest) < sum(pool_sizes):
        raise SailError(f"{n_label} prompts to label and pools of {pool_sizes} need {n_label + sum(pool_sizes)} prompts; "
                        f"the file has {len(rows)} ({len(order[n_label:]) - len(rest)} of the rest are evaluation "
                        f"prompts, kept out of the pools): lower --label-prompts or --pool-sizes")
    return label, rest[:sum(pool_sizes)]


def prepare(args):
    """The split, written under <run>/label/ once; returns that folder."""
    folder = Path(args.run) / "label"
    try:
        pool_sizes = [int(n) for n in args.pool_sizes.split(",")]
    except ValueError:
        pool_sizes = [0]
    if min(pool_sizes) < 1 or args.label_prompts < 1 or args.candidates < 2:
        raise SailError(f"need --label-prompts >= 1, --candidates >= 2 and --pool-sizes of positive counts "
                        f"(got {args.label_prompts}, {args.candidates}, {args.pool_sizes})")
    rows = read_prompt_file(args.prompts)
    evals = sorted(KIT_PROMPTS.glob("*.jsonl")) + [p for p in [Path(args.run) / "eval" / "prompts.jsonl"] if p.is_file()]
    excluded = {normalise_prompt(p) for f in evals for p in prompt_lines(f)}
    label, pools = split_prompts(rows, args.label_prompts, pool_sizes, args.seed, excluded)
    settings = dict(prompts=Path(args.prompts).name, prompts_sha256=hashlib.sha256(Path(args.prompts).read_bytes()).hexdigest(),
                    preset=args.preset, seed=args.seed, label_prompts=args.label_prompts, candidates=args.candidates,
                    pool_sizes=pool_sizes)
    files.check_settings(folder / "plan.json", settings, f"use another --run, or delete {folder} (and its judgements)")
    for name, chosen in (("prompts.jsonl", label), ("pool_prompts.jsonl", pools)):
        if not (folder / name).is_file():
            files.write_jsonl_atomic(folder / name, chosen)
    log.info("%d prompts: %d to label, %d for the pools %s (%d evaluation prompts kept out)", len(rows), len(label),
             len(pools), pool_sizes, sum(normalise_prompt(r["prompt"]) in excluded for r in rows))
    return folder


def generate(args, folder):
    """--candidates images per label prompt with the preset's base model, drawn by the library in a child process,
    so that the server's process never loads torch and the model's memory is freed before the page opens."""
    if (folder / "generations.jsonl").is_file():
        return
    with files.folder_lock(folder, "generate"):
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
            try:
                child.submit(draw_candidates, args.preset, folder, args.candidates, args.seed).result()
            except (BrokenProcessPool, KeyboardInterrupt):
                raise SailError(f"drawing the candidates into {folder} stopped; the same command continues with the "
                                f"images there") from None


def draw_candidates(preset, folder, candidates, seed):
    """The child's work: sail.generation (and so torch) is imported here only."""
    from sail.generation import draw_candidates as draw
    common.setup_logging(folder, "label")
    draw(preset, folder / "prompts.jsonl", folder, candidates, seed)


# ---------------------------------------------------------------- the seed set
def finish(args):
    """seed/pairs.jsonl from the a/b judgements in force, the pools from the leftover prompts; nothing overwritten."""
    run, folder = Path(args.run), Path(args.run) / "label"
    if not (folder / "plan.json").is_file():
        raise SailError(f"{folder / 'plan.json'}: file not found (label first: python -m tools.label --run {run} --prompts ...)")
    plan, seed_file = json.loads((folder / "plan.json").read_text()), files.seed_pairs_path(run)
    state = Labelling(folder, plan["seed"], 0, repair=False)  # a server may be appending: read, never cut
    pairs = [dict(prompt=j["prompt"], image_w=files.relative_to(folder / j["image_" + j["choice"]], seed_file.parent),
                  image_l=files.relative_to(folder / j["image_" + "ab"[j["choice"] == "a"]], seed_file.parent),
                  source="human", prompt_id=j["prompt_id"], labeller=j["labeller"])
             for j in state.active.values() if j["choice"] in ("a", "b")]
    if not pairs:
        raise SailError(f"{state.path}: no judgement with a winner yet; label some pairs first")
    leftover, start, outputs = files.read_prompts(folder / "pool_prompts.jsonl"), 0, {seed_file: pairs}
    for i, size in enumerate(plan["pool_sizes"], 1):
        outputs[files.pool_path(run, i)] = [files.strip_private(r) for r in leftover[start:start + size]]
        start += size
    for path, rows in outputs.items():
        if path.is_file() and [files.strip_private(r) for r in files.read_jsonl(path)] != rows:
            raise SailError(f"{path} exists and differs from what {state.path} gives now ({len(rows)} rows); not "
                            f"overwriting it: delete {seed_file.parent} and {run / 'pools'} to write them anew")
    with files.folder_lock(seed_file.parent, "label finish"):
        for path, rows in outputs.items():
            files.write_jsonl_atomic(path, rows)
        choices = [j["choice"] for j in state.active.values()]
        stats = dict(pairs=len(pairs), judgements=state.count, undone=state.count - len(choices),
                     **{c: choices.count(c) for c in CHOICES}, pairs_offered=len(state.pairs),
                     prompts_with_pairs=len({p["prompt_id"] for p in pairs}), label_prompts=plan["label_prompts"],
                     labellers={who: len(ids) for who, ids in state.stacks.items()}, pools=plan["pool_sizes"])
        files.write_json_atomic(seed_file.parent / "stats.json", stats)
        files.save_args(seed_file.parent, "label.finish", args)
    files.read_pairs(seed_file)
    files.check_pools_disjoint(run)
    no_oracle = plan["preset"] in ("toy", "tiny-sd15", "tiny-sdxl") and not (run / "eval" / "prompts.jsonl").is_file()
    log.info("wrote %s: %d pairs from %d judgements (%d ties, %d skips, %d undone) and %d pools; next: RUN=%s %sbash "
             "run_all.sh %s %d", seed_file, len(pairs), state.count, stats["tie"], stats["skip"], stats["undone"],
             len(plan["pool_sizes"]), run, "EVAL=0 " * no_oracle, plan["preset"], len(plan["pool_sizes"]))


def main(args):
    common.setup_logging(Path(args.run) / "label", "label")
    if args.finish:
        return finish(args)
    if not (args.prompts and args.preset):
        raise SailError("give --prompts and --preset to label (or --finish to write the seed set)")
    label_server.labeller_names(args.labellers)
    folder = prepare(args)
    files.save_args(folder, "label", args)
    generate(args, folder)
    common.setup_logging(folder, "label")
    with files.folder_lock(folder, "label server"):
        labelling = Labelling(folder, args.seed, args.target)
        server = label_server.start(labelling, folder, args, "labelling page")
        log.info("%d pairs of %d prompts, %d judged so far", len(labelling.pairs), args.label_prompts, len(labelling.judged))
        print(f"labelling page: serving on {server.host}:{server.port} (Ctrl-C stops; then --finish)", flush=True)
        try:
            server.serve()
        except KeyboardInterrupt:
            pass


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="run folder, e.g. runs/mine")
    p.add_argument("--prompts", type=Path, help="prompt file: .txt (one a line) or .jsonl (prompt_id, prompt)")
    p.add_argument("--preset", help="base model that draws the candidates (toy, sd15, sdxl, tiny-sd15, ...)")
    p.add_argument("--label-prompts", type=int, default=40, help="prompts to label; the rest go to the pools")
    p.add_argument("--candidates", type=int, default=4, help="images per label prompt (4 give 6 pairs a prompt)")
    p.add_argument("--pool-sizes", default="64,64", help="prompts per SAIL iteration's pool, comma-separated")
    p.add_argument("--target", type=int, default=200, help="pairs to judge (a, b or tie), shown as progress")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, the candidates and the pair order")
    p.add_argument("--finish", action="store_true", help="write seed/pairs.jsonl, seed/stats.json and pools/ and stop")
    label_server.add_flags(p)
    return p


if __name__ == "__main__":
    common.run_stage(main, build_parser().parse_args())
