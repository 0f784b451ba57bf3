"""Import the paper's data from Pick-a-Pic v2 parquet shards already on disk (nothing is downloaded).

    python -m tools.prepare_pickapic --parquet-dir /data/pickapic_v2 --run runs/sd15 [--seed-size 50000|0.06|6%|all]
        [--pool-sizes 10000,20000,20000] [--prompt-file FILE.jsonl|.txt] [--val-pairs 1000] [--seed 0]

Reads the shards of each split (`<split>-*.parquet` or `<split>/*.parquet` in --parquet-dir or its data/, or
--train-files / --val-files globs); columns caption, jpg_0, jpg_1, label_0, label_1 and, if present, image_0_uid,
image_1_uid, ranking_id. Ties (0.5/0.5) are dropped as in the paper (851,293 pairs, 58,960 prompts remain).
Pass 1 reads the small columns only and draws with --seed: the seed pairs (50K, ~6%; --seed-sampling prompt
takes whole prompts in random order, so that enough unused prompts remain for 50K pool prompts, while pair
draws single pairs), 1000 validation pairs (for the self-reward accuracy study) and the prompt pools (10K, 20K,
20K) from the train prompts the seed does not use, or from --prompt-file (e.g. JourneyDB captions for SAIL*).
Pools are unique and disjoint from each other, the seed, every prompt of the other splits present, the files of
--exclude-prompts (default: every *.jsonl in the kit's prompts/) and <run>/eval/prompts.jsonl (normalised text).
Pass 2 streams row groups, reads the jpg columns only up to the chosen rows, checks that each image decodes and
writes its JPEG bytes unchanged. A corrupt image is reported with shard and row (counted from 0 in each shard);
by default its pair is skipped and counted, since one bad file in 300+ GB should not stop hours of import
(--on-corrupt fail stops). Memory is bounded by --batch-rows rows and the shards' parquet page size. A rerun
resumes: images on disk are kept, the missing ones written; another import into the same run is refused.

Writes under <run>/: seed/pairs.jsonl, seed/images/<image_uid>.jpg, pools/iter_XX.jsonl, val/pairs.jsonl,
val/images/, seed/plan.json (the settings), seed/stats.json (counts), pickapic.args.json and log.txt.
"""
import argparse
import glob
import hashlib
import io
import itertools
import logging
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from sail.common import SailError, progress, run_stage, setup_logging
from sail.files import (
    check_pools_disjoint,
    folder_lock,
    normalise_prompt,
    pool_path,
    save_args,
    val_pairs_path,
    write_json_atomic,
    write_jsonl_atomic,
)
from sail.importing import (
    choose_pool_prompts,
    finished_import,
    pool_and_exclusion_files,
    prompt_id,
    prompt_lines,
    seed_count,
    select_rows,
)

log = logging.getLogger("sail")


NEEDED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
OTHER_SPLITS = ("validation", "validation_unique", "test", "test_unique")


def open_shard(path, needed=NEEDED):
    """A ParquetFile that reads in 1 MB pieces: no pre-buffering of whole row groups."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SailError("reading Pick-a-Pic parquet shards needs pyarrow: pip install pyarrow") from None
    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
    except Exception as err:
        raise SailError(f"{path}: not a readable parquet file ({type(err).__name__}: {err})") from None
    missing = [c for c in needed if c not in pf.schema_arrow.names]
    if missing:
        raise SailError(f"{path}: missing column(s) {', '.join(missing)} (a Pick-a-Pic v2 shard has {', '.join(NEEDED)})")
    return pf


def find_shards(parquet_dir, split, pattern=None):
    """Sorted shard paths of one split, from a glob or from the usual layouts under parquet_dir."""
    if pattern:
        found = glob.glob(os.path.expanduser(pattern))
    else:
        found = [p for base in ([Path(parquet_dir), Path(parquet_dir) / "data"] if parquet_dir else [])
                 for g in (f"{split}-*.parquet", f"{split}.parquet", f"{split}/*.parquet") for p in glob.glob(str(base / g))]
    return sorted({Path(p) for p in found}, key=lambda p: (p.name, str(p)))


class Scan:
    """Pass 1 over a split's small columns: arrays shard, row, pidx (into .prompts) and win (1: image 1 won),
    one entry per kept pair in shard and row order, and .counts."""

    def __init__(self, shards):
        self.shards, self.prompts, self.index, by_text = shards, [], {}, {}
        self.counts = dict(rows=0, ties=0, unlabelled=0, empty_caption=0, same_image=0)
        parts = []
        total = sum(open_shard(p).metadata.num_rows for p in shards)  # checks every schema before the long pass
        bar = progress(total=total, desc=f"scan {len(shards)} shards", unit="row")
        for sid, path in enumerate(shards):
            pf, row0 = open_shard(path), 0
            uids = [c for c in ("image_0_uid", "image_1_uid") if c in pf.schema_arrow.names]
            for batch in pf.iter_batches(batch_size=65536, columns=["caption", "label_0", "label_1"] + uids):
                l0, l1 = (np.asarray(batch.column(c).to_numpy(zero_copy_only=False), float) for c in ("label_0", "label_1"))
                unl = np.isnan(l0) | np.isnan(l1)
                valid = ((l0 == 1) & (l1 == 0)) | ((l0 == 0) & (l1 == 1)) | ((l0 == 0.5) & (l1 == 0.5))
                if (bad := np.flatnonzero(~unl & ~valid)).size:
                    r = bad[0]
                    raise SailError(f"{path}: row {row0 + r}: labels ({l0[r]}, {l1[r]}) are not 1/0, 0/1 or 0.5/0.5")
                tie, same = ~unl & (l0 == 0.5), np.zeros(len(l0), bool)
                if len(uids) == 2:  # a "pair" of one image twice teaches nothing
                    pairs = zip(batch.column(uids[0]).to_pylist(), batch.column(uids[1]).to_pylist())
                    same = np.array([a is not None and a == b for a, b in pairs], bool) & ~unl & ~tie
                rows = np.flatnonzero(~unl & ~tie & ~same)
                pidx = np.empty(len(rows), np.int64)
                for k, text in enumerate(batch.column("caption").take(rows).to_pylist()):
                    if text not in by_text:  # captions repeat: normalise each spelling once
                        norm = normalise_prompt(text or "")
                        if norm and norm not in self.index:
                            self.index[norm] = len(self.prompts)
                            self.prompts.append(text)
                        by_text[text] = self.index.get(norm, -1)
                    pidx[k] = by_text[text]
                ok, rows = pidx >= 0, rows[pidx >= 0]
                parts.append((np.full(len(rows), sid), row0 + rows, pidx[ok], l1[rows] > l0[rows]))
                for key, n in (("rows", len(l0)), ("ties", tie.sum()), ("unlabelled", unl.sum()),
                               ("same_image", same.sum()), ("empty_caption", (~ok).sum())):
                    self.counts[key] += int(n)
                row0 += len(l0)
                bar.update(len(l0))
        bar.close()
        for j, (key, dtype) in enumerate((("shard", np.int32), ("row", np.int64), ("pidx", np.int32), ("win", np.int8))):
            setattr(self, key, np.concatenate([p[j] for p in parts]).astype(dtype) if parts else np.zeros(0, dtype))
        self.counts.update(pairs_kept=len(self.row), unique_prompts=len(self.prompts))


def image_name(uid, shard, row, side):
    if isinstance(uid, str) and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", uid):
        return f"{uid}.jpg"
    return f"{shard.stem}-{row}-{side}.jpg" if uid is None else f"{hashlib.sha1(str(uid).encode()).hexdigest()[:20]}.jpg"


def blob_batches(pf, group, wanted, batch_rows):
    """Yield lists of (wanted[row], (jpg_0, jpg_1)) for the wanted rows of a row group, batch_rows rows read at
    a time, so that memory holds one batch; stop after the last wanted row."""
    offset, last = 0, max(wanted)
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=["jpg_0", "jpg_1"], use_threads=False):
        hit = [r - offset for r in wanted if offset <= r < offset + batch.num_rows]
        if hit:
            sub = batch.take(hit)
            yield [(wanted[r + offset], blobs) for r, blobs in
                   zip(hit, zip(sub.column("jpg_0").to_pylist(), sub.column("jpg_1").to_pylist()))]
        offset += batch.num_rows
        if offset > last:
            return


def decode_error(blobs, names, images):
    """What is wrong with the images of a pair that are not on disk yet, or None."""
    for side in (0, 1):
        if blobs is not None and not (images / names[side]).exists():
            try:
                with Image.open(io.BytesIO(blobs[side])) as img:
                    img.load()
            except Exception as err:  # PIL raises many kinds for a corrupt file, TypeError for a null cell
                return f"jpg_{side} does not decode ({type(err).__name__}: {err})"
    return None


def extract_pairs(scan, picked, out_dir, on_corrupt, batch_rows=16, desc="images"):
    """Pass 2: write the images of the picked rows to out_dir/images/ (JPEG bytes as they are); return
    (pair rows, corrupt reports, counts). Row groups whose images are all on disk are not read."""
    images = Path(out_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    pairs, corrupt, counts = [], [], dict(images_written=0, images_present=0)
    bar = progress(total=len(picked), desc=desc, unit="pair")
    pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # decoding releases the GIL: check images in parallel
    for sid in np.unique(scan.shard[picked]):
        path, mine, pf = scan.shards[sid], picked[scan.shard[picked] == sid], open_shard(scan.shards[sid])
        meta_cols = [c for c in ("caption", "image_0_uid", "image_1_uid", "ranking_id") if c in pf.schema_arrow.names]
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        for group in range(pf.num_row_groups):
            rows = mine[(scan.row[mine] >= starts[group]) & (scan.row[mine] < starts[group + 1])]
            if not len(rows):
                continue
            local = (scan.row[rows] - starts[group]).tolist()
            meta = pf.read_row_group(group, columns=meta_cols).take(local).to_pylist()
            names = [[image_name(m.get(f"image_{s}_uid"), path, scan.row[i], s) for s in (0, 1)] for i, m in zip(rows, meta)]
            todo = {r: k for k, r in enumerate(local) if not all((images / n).exists() for n in names[k])}
            done = [(k, None) for k in range(len(rows)) if local[k] not in todo]
            slots = [None] * len(rows)  # pairs keep row order whichever images were on disk already
            for batch in itertools.chain([done], blob_batches(pf, group, todo, batch_rows) if todo else []):
                errors = pool.map(lambda item: decode_error(item[1], names[item[0]], images), batch)
                for (k, blobs), bad in zip(batch, errors):
                    bar.update(1)
                    if bad:
                        bad = f"{path}: row {scan.row[rows[k]]}: {bad}"
                        if on_corrupt == "fail":
                            raise SailError(bad + "; rerun with --on-corrupt skip to drop such pairs")
                        log.warning("%s; pair skipped", bad)
                        corrupt.append(dict(shard=path.name, row=int(scan.row[rows[k]]), message=bad))
                        continue
                    for name, data in zip(names[k], blobs or (None, None)):
                        if data is None or (images / name).exists():
                            counts["images_present"] += 1
                            continue
                        (images / (name + ".tmp")).write_bytes(data)
                        os.replace(images / (name + ".tmp"), images / name)
                        counts["images_written"] += 1
                    m, w = meta[k], int(scan.win[rows[k]])
                    slots[k] = dict(prompt=m["caption"], image_w=f"images/{names[k][w]}",
                                    image_l=f"images/{names[k][1 - w]}", source="human",
                                    prompt_id=prompt_id(normalise_prompt(m["caption"])))
                    if m.get("ranking_id") is not None:
                        slots[k]["ranking_id"] = m["ranking_id"]
            pairs += [p for p in slots if p]
    pool.shutdown()
    bar.close()
    return pairs, corrupt, counts


def main(args):
    run, started = Path(args.run), time.time()
    setup_logging(run, "pickapic")
    train = find_shards(args.parquet_dir, "train", args.train_files)
    if not train:
        raise SailError(f"no train shards found: give --parquet-dir (a folder with train-*.parquet or train/*.parquet, "
                        f"now {args.parquet_dir}) or --train-files GLOB (now {args.train_files})")
    splits = {s: find_shards(args.parquet_dir, s, args.val_files if s == "validation" else None) for s in OTHER_SPLITS}
    if args.val_pairs and not splits["validation"]:
        raise SailError("no validation shards found for --val-pairs (give --val-files GLOB, or --val-pairs 0)")
    pool_sizes, excludes = pool_and_exclusion_files(args)
    file_ids = lambda paths: [[Path(p).name, Path(p).stat().st_size] for p in paths]  # noqa: E731
    settings = dict(train=file_ids(train), **{s: file_ids(v) for s, v in splits.items()}, seed=args.seed,
                    seed_size=str(args.seed_size), seed_sampling=args.seed_sampling, pool_sizes=pool_sizes,
                    prompt_file=file_ids([args.prompt_file] if args.prompt_file else []), val_pairs=args.val_pairs,
                    exclude_prompts=file_ids(excludes))
    pools = [pool_path(run, i) for i in range(1, len(pool_sizes) + 1)]
    if finished_import(run, settings, pools, args.val_pairs):
        return
    # the run's own evaluation prompts count too, but only the files the user names make the settings
    excludes += [run / "eval" / "prompts.jsonl"] if (run / "eval" / "prompts.jsonl").is_file() else []
    save_args(run, "pickapic", args)
    with folder_lock(run, "pickapic"):
        log.info("pass 1: %d train shards", len(train))
        scan = Scan(train)
        log.info("train: %s", scan.counts)
        n_seed = seed_count(args.seed_size, len(scan.row))
        seed_rows = select_rows(scan, n_seed, [args.seed, 0], args.seed_sampling == "prompt")
        seed_norms = {normalise_prompt(scan.prompts[i]) for i in np.unique(scan.pidx[seed_rows])}
        log.info("seed: %d pairs over %d prompts (drawn by %s)", n_seed, len(seed_norms), args.seed_sampling)
        if args.val_pairs:
            vscan = Scan(splits["validation"])
            if not 0 < args.val_pairs <= len(vscan.row):
                raise SailError(f"--val-pairs {args.val_pairs}: the validation split has {len(vscan.row)} non-tie pairs")
            vrows = select_rows(vscan, args.val_pairs, [args.seed, 1], False)

        excluded = {normalise_prompt(p) for f in excludes for p in prompt_lines(f)}
        log.info("%d evaluation prompts kept out of the pools (%d files)", len(excluded), len(excludes))
        for split, shards in splits.items():
            for path in shards:
                for batch in open_shard(path, ("caption",)).iter_batches(columns=["caption"]):
                    excluded |= {normalise_prompt(c or "") for c in batch.column("caption").to_pylist()}
            if shards:
                log.info("prompts of %s (%d shards) kept out of the pools: %d in all", split, len(shards), len(excluded))
        excluded.discard("")
        stats = dict(train=scan.counts, excluded_prompts=len(excluded), seed_prompts_in_eval_sets=len(seed_norms & excluded))
        source = prompt_lines(args.prompt_file) if args.prompt_file else scan.prompts
        chosen = choose_pool_prompts(source, excluded | seed_norms, sum(pool_sizes), args.seed) if pool_sizes else []
        if len(chosen) < sum(pool_sizes):
            hint = "" if args.prompt_file else ", or give --prompt-file (e.g. JourneyDB captions)"
            raise SailError(f"pools need {sum(pool_sizes)} prompts ({args.pool_sizes}) but only {len(chosen)} remain in "
                            f"{args.prompt_file or 'the train split'} after the seed and the excluded prompts; "
                            f"use smaller --pool-sizes or --seed-size{hint}")

        write_json_atomic(run / "seed" / "plan.json", settings)  # from here on the folder holds this import
        for path, size, start in zip(pools, pool_sizes, np.cumsum([0] + pool_sizes).tolist()):
            write_jsonl_atomic(path, [dict(prompt_id=pid, prompt=p) for pid, p in chosen[start:start + size]])
        log.info("pools written: %s prompts", pool_sizes)
        if args.val_pairs:
            pairs, corrupt, counts = extract_pairs(vscan, vrows, val_pairs_path(run).parent, args.on_corrupt, args.batch_rows,
                                                   "val")
            write_jsonl_atomic(val_pairs_path(run), pairs)
            stats["validation"] = dict(vscan.counts, pairs_written=len(pairs), corrupt=corrupt, **counts)
            log.info("val: %d pairs written (%d corrupt skipped)", len(pairs), len(corrupt))
        log.info("pass 2: images of %d seed pairs", n_seed)
        pairs, corrupt, counts = extract_pairs(scan, seed_rows, run / "seed", args.on_corrupt, args.batch_rows, "seed")
        write_jsonl_atomic(run / "seed" / "pairs.jsonl", pairs)
        check_pools_disjoint(run)
        stats.update(seed=dict(pairs_selected=n_seed, pairs_written=len(pairs), prompts=len(seed_norms),
                               corrupt=corrupt, **counts), pools=pool_sizes, seconds=round(time.time() - started, 1))
        write_json_atomic(run / "seed" / "stats.json", stats)
        log.info("seed: %d pairs written (%d corrupt skipped), %d images written, %d already present; %.1f s",
                 len(pairs), len(corrupt), counts["images_written"], counts["images_present"], stats["seconds"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parquet-dir", help="folder of Pick-a-Pic v2 shards (train-*.parquet, validation-*.parquet, ...)")
    p.add_argument("--train-files", help="glob of the train shards, instead of looking in --parquet-dir")
    p.add_argument("--val-files", help="glob of the validation shards")
    p.add_argument("--run", required=True, help="run folder, e.g. runs/sd15")
    p.add_argument("--seed-size", default="50000", help="seed pairs: a count, a fraction (0.06), a percentage or 'all'")
    p.add_argument("--seed-sampling", choices=("prompt", "pair"), default="prompt", help="draw whole prompts, or pairs")
    p.add_argument("--pool-sizes", default="10000,20000,20000", help="prompts per iteration, comma-separated; 0: none")
    p.add_argument("--prompt-file", help="draw the pools from this .jsonl ('prompt' field) or .txt file, not from train")
    p.add_argument("--val-pairs", type=int, default=1000, help="validation pairs for the reward accuracy study; 0: none")
    p.add_argument("--exclude-prompts", nargs="*", default=None,
                   help="evaluation prompt files kept out of the pools (default: every *.jsonl in the kit's prompts/)")
    p.add_argument("--on-corrupt", choices=("skip", "fail"), default="skip", help="a pair with an undecodable image")
    p.add_argument("--batch-rows", type=int, default=16, help="rows per read of the image columns (bounds memory)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_stage(main, parse_args())
