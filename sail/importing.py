"""How an importer turns labelled pairs into a run's data (tools/prepare_pickapic.py, tools/import_pairs.py,
tools/label.py): the seed's size and its seeded choice, prompt pools chosen by a seeded hash and kept
disjoint from every other prompt set, and the check that a run folder holds this very import.
"""
import hashlib
import heapq
import logging
from pathlib import Path

import numpy as np

from sail.common import SailError
from sail.files import (
    check_pools_disjoint,
    check_settings,
    normalise_prompt,
    pool_paths,
    read_jsonl,
    seed_pairs_path,
    val_pairs_path,
)

log = logging.getLogger("sail")


KIT_PROMPTS = Path(__file__).resolve().parents[1] / "prompts"  # the evaluation prompts, kept out of every pool


def prompt_id(norm):
    return hashlib.sha1(norm.encode()).hexdigest()[:12]


def seed_count(spec, available):
    """--seed-size: a count ("50000"), a fraction ("0.06", "6%") or "all" -> a number of pairs."""
    text = str(spec).strip().lower()
    if text.isdigit():
        n = int(text)
    else:
        try:
            frac = 1.0 if text == "all" else float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
        except ValueError:
            raise SailError(f"--seed-size {spec}: expected a count, a fraction, a percentage or 'all'") from None
        if not 0 < frac <= 1:
            raise SailError(f"--seed-size {spec}: a fraction must be in (0, 1]")
        n = max(1, round(frac * available))
    if not 1 <= n <= available:
        raise SailError(f"--seed-size {spec}: asks {n} pairs but the split has {available} non-tie pairs")
    return n


def select_rows(scan, n, seed, by_prompt):
    """Sorted positions of n pairs drawn with `seed`: whole prompts in random order (the last one maybe in
    part), or single pairs."""
    rng = np.random.default_rng(seed)
    if n == len(scan.row):
        return np.arange(n)
    if not by_prompt:
        return np.sort(rng.choice(len(scan.row), n, replace=False))
    prompt_rank = rng.permutation(len(scan.prompts))
    return np.sort(np.lexsort((rng.random(len(scan.row)), prompt_rank[scan.pidx]))[:n])


def prompt_lines(path):
    """Prompts of a .jsonl ("prompt" field) or .txt (one per line) file; errors name file and line."""
    path = Path(path)
    if path.suffix == ".jsonl":
        yield from (row["prompt"] for row in read_jsonl(path, required=("prompt",), types={"prompt": str}))
    else:
        with open(path, encoding="utf-8") as f:
            yield from (line.rstrip("\r\n") for line in f)


def choose_pool_prompts(candidates, excluded, total, seed):
    """The `total` eligible unique prompts of smallest seeded hash, in that order, as (prompt_id, text). Streams:
    memory holds `total` prompts however long the candidate list; the first spelling of a prompt is kept."""
    heap, chosen = [], {}
    for text in candidates:
        norm = normalise_prompt(text)
        if not norm or norm in excluded or norm in chosen:
            continue
        key = int.from_bytes(hashlib.sha256(f"{seed}/pool/{norm}".encode()).digest()[:8], "big")
        if len(heap) < total:
            heapq.heappush(heap, (-key, norm))
        elif key < -heap[0][0]:
            del chosen[heapq.heapreplace(heap, (-key, norm))[1]]
        else:
            continue
        chosen[norm] = text
    return [(prompt_id(norm), chosen[norm]) for _, norm in sorted(heap, reverse=True)]


def check_run_folder(run, settings, outputs):
    """True when this very import is complete; refuses a folder holding another import or foreign files."""
    plan = run / "seed" / "plan.json"
    if not plan.is_file():
        found = [str(p) for p in (seed_pairs_path(run), val_pairs_path(run), *pool_paths(run))
                 if p.exists()]
        if found:
            raise SailError(f"{', '.join(found)} exist(s) but were not written by this importer (no {plan}); not overwriting")
        return False
    check_settings(plan, settings, f"use another --run, or delete {run}/seed, {run}/pools and {run}/val")
    return (run / "seed" / "stats.json").is_file() and all(p.is_file() for p in outputs) and all(
        (p.parent / row[side]).is_file() for p in outputs if p.parent.name != "pools"
        for row in read_jsonl(p) for side in ("image_w", "image_l"))


def finished_import(run, settings, pools, with_val):
    """True, and says so, when the run folder holds this very import complete (seed, pools, validation
    pairs and their images); False when it holds none; refuses another import's folder."""
    outputs = [seed_pairs_path(run)] + list(pools) + ([val_pairs_path(run)] if with_val else [])
    if not check_run_folder(run, settings, outputs):
        return False
    check_pools_disjoint(run)  # also against an eval/prompts.jsonl written since
    log.info("%s is complete (seed/stats.json, %d output files, all images present); nothing to do", run, len(outputs))
    return True


def pool_and_exclusion_files(args):
    """--pool-sizes as counts ([] for none), and the prompt files kept out of the pools (default: the
    kit's evaluation prompts), each checked to exist, as both importers take them."""
    text = args.pool_sizes.strip()
    pool_sizes = [] if text in ("", "0", "none") else [int(x) if x.strip().isdigit() else 0 for x in text.split(",")]
    if any(n < 1 for n in pool_sizes):
        raise SailError(f"--pool-sizes {args.pool_sizes}: expected positive counts separated by commas, or 0 for none")
    excludes = list(args.exclude_prompts if args.exclude_prompts is not None else sorted(KIT_PROMPTS.glob("*.jsonl")))
    for f in [args.prompt_file] * bool(args.prompt_file) + excludes:
        if not Path(f).is_file():
            raise SailError(f"{f}: prompt file not found")
    return pool_sizes, excludes
