"""Import your own human preference pairs into a SAIL run: a pair file, a Hugging Face dataset or rankings.

Commands (one source each; docs/own_pairs.md shows the formats and every flag):
    python -m tools.import_pairs --run runs/mine --pairs-file my.csv [--images DIR] --seed-size all --pool-sizes 64,64
    python -m tools.import_pairs --run runs/mine --dataset NAME_OR_FOLDER [--split train] [--caption-column caption ...]
    python -m tools.import_pairs --run runs/mine --rankings rankings.jsonl [--ranking-pairs all|best-worst]

Pair files (.csv or .jsonl: prompt, image_a, image_b, choice a / b / tie), datasets (two images, two labels, a
caption) and rankings (prompt, images, ranks with 1 = best, or scores) become pairs; ties are dropped as in the
paper, and a bad row stops naming file and line. --val-pairs N holds out the pairs of whole prompts; the seed is
--seed-size of the pairs on the other prompts, drawn as tools/prepare_pickapic.py draws. Every imported image is decoded
and copied with its bytes unchanged (the pixels the person judged), named by their hash, so that an image in many
pairs is stored once. Pools come from --prompt-file or the unused prompts, minus the evaluation prompts.

Reads:  the source and its images, --prompt-file, --exclude-prompts (default: the kit's prompts/*.jsonl) and
        <run>/eval/prompts.jsonl if there is one.
Writes: <run>/seed/pairs.jsonl, seed/images/<sha1>.<ext>, val/pairs.jsonl and val/images/ (with --val-pairs),
        pools/iter_XX.jsonl, seed/plan.json (the settings: a rerun with other ones stops), seed/stats.json
        (counts), import_pairs.args.json, log.txt. A finished import is skipped; nothing is overwritten.
"""
import argparse
import csv
import hashlib
import io
import itertools
import logging
import os
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from sail.common import SailError, progress, run_stage, setup_logging
from sail.files import (
    check_pools_disjoint,
    folder_lock,
    normalise_prompt,
    pool_path,
    read_jsonl,
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


PAIR_COLUMNS = ("prompt", "image_a", "image_b", "choice")
CHOICES = {"a": [1, 0], "b": [0, 1], "tie": [0, 0]}  # as merits of (image_a, image_b): higher is better
EXTENSIONS = {"JPEG": "jpg", "TIFF": "tif"}  # other formats: their PIL name in lower case (png, webp, gif, bmp)


def csv_rows(path):
    """(line, row) of a CSV file with a header; a row short of a column stops naming its line."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader, rows = csv.DictReader(f), []
        if missing := [c for c in PAIR_COLUMNS if c not in (reader.fieldnames or [])]:
            raise SailError(f"{path}:1: missing column(s) {', '.join(missing)} (the header needs {', '.join(PAIR_COLUMNS)})")
        for row in reader:
            if short := [c for c in PAIR_COLUMNS if row[c] is None]:
                raise SailError(f"{path}:{reader.line_num}: missing column(s) {', '.join(short)}")
            rows.append((reader.line_num, row))
    return rows


def pair_file_rows(path):
    """(where, prompt, image names, merits) of each line of a .csv or .jsonl of prompt, image_a, image_b, choice."""
    if path.suffix.lower() == ".csv":
        rows = csv_rows(path)
    elif path.suffix.lower() == ".jsonl":
        rows = [(r["_line"], r) for r in read_jsonl(path, PAIR_COLUMNS, {c: str for c in PAIR_COLUMNS})]
    else:
        raise SailError(f"{path}: expected a .csv or .jsonl pair file")
    for line, row in rows:
        if row["choice"].strip().lower() not in CHOICES:
            raise SailError(f"{path}:{line}: choice {row['choice']!r} is not a, b or tie")
    return [(f"{path}:{line}", row["prompt"], [row["image_a"].strip(), row["image_b"].strip()],
             CHOICES[row["choice"].strip().lower()]) for line, row in rows]


def ranking_rows(path):
    """(where, prompt, image names, merits) of each line of a JSONL of prompt, images and ranks or scores."""
    out = []
    for row in read_jsonl(path, ("prompt", "images"), {"prompt": str, "images": list, "ranks": list, "scores": list}):
        where, keys = f"{path}:{row['_line']}", [k for k in ("ranks", "scores") if k in row]
        if len(keys) != 1:
            raise SailError(f"{where}: give either ranks (1 = best) or scores (higher = better)")
        values, names = row[keys[0]], row["images"]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(names) < 2 or len(values) != len(names) or not numbers or not all(isinstance(n, str) for n in names):
            raise SailError(f"{where}: expected 2 or more image paths and as many numbers in {keys[0]}")
        out.append((where, row["prompt"], names, [-v for v in values] if keys[0] == "ranks" else values))
    return out


def ranked_pairs(rows, images, mode):
    """Pairs (prompt, w and l as (label, path), where) of (where, prompt, image names, merits) rows: every pair of
    images with a strict preference (mode all), or the best image against the worst; ties counted and dropped."""
    pairs, counts = [], dict(rows=len(rows), pairs_read=0, ties=0)
    for where, prompt, names, merit in rows:
        if not prompt.strip():
            raise SailError(f"{where}: empty prompt")
        if len(set(names)) < len(names):
            raise SailError(f"{where}: an image is listed twice")
        files = [(str(Path(images) / n), Path(images) / n) for n in names]  # (name in messages, what fetch reads)
        if missing := [label for (label, path), name in zip(files, names) if not name.strip() or not path.is_file()]:
            raise SailError(f"{where}: image not found: {missing[0]}")
        if mode == "best-worst":
            candidates = [(merit.index(max(merit)), merit.index(min(merit)))]
        else:
            candidates = [(i, j) if merit[i] > merit[j] else (j, i) for i, j in itertools.combinations(range(len(names)), 2)]
        counts["pairs_read"] += len(candidates)
        counts["ties"] += sum(merit[w] == merit[l] for w, l in candidates)
        pairs += [dict(prompt=prompt, w=files[w], l=files[l], where=where) for w, l in candidates if merit[w] != merit[l]]
    return pairs, counts


def open_dataset(name, split):
    try:
        import datasets
    except ImportError:
        raise SailError("--dataset needs the Hugging Face datasets package: pip install datasets") from None
    folder = Path(name).expanduser()
    try:
        if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():  # a save_to_disk folder
            ds = datasets.load_from_disk(str(folder))
        else:
            ds = datasets.load_dataset(str(folder) if folder.exists() else name, split=split)
    except Exception as err:  # the hub, the cache and the file formats raise many kinds
        raise SailError(f"--dataset {name}: cannot be loaded ({type(err).__name__}: {err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SailError(f"--dataset {name}: no split {split!r} (it has {', '.join(ds)})")
        ds = ds[split]
    return ds, datasets


def read_dataset(args):
    """Rows with two images, two labels and a caption -> the non-tie pairs, counts and a reader of image bytes."""
    ds, datasets = open_dataset(args.dataset, args.split)
    image_cols, label_cols = (args.image_a_column, args.image_b_column), (args.label_a_column, args.label_b_column)
    if missing := [c for c in (args.caption_column, *image_cols, *label_cols) if c not in ds.column_names]:
        raise SailError(f"--dataset {args.dataset}: no column(s) {', '.join(missing)} (it has {', '.join(ds.column_names)}); "
                        "name them with --caption-column, --image-a-column, ...")
    for col in image_cols:
        if isinstance(ds.features[col], datasets.Image):  # the stored bytes, not decoded and re-encoded images
            ds = ds.cast_column(col, datasets.Image(decode=False))
    small = ds.select_columns([args.caption_column, *label_cols]).with_format("arrow")[:]
    la, lb = (np.asarray(small.column(c).to_numpy(zero_copy_only=False), float) for c in label_cols)
    captions = small.column(args.caption_column).to_pylist()
    counts = dict(rows=len(la), pairs_read=len(la), ties=0, unlabelled=0, empty_caption=0)
    pairs = []
    for i in range(len(la)):
        where = f"{args.dataset} ({args.split}) row {i}"
        if np.isnan(la[i]) or np.isnan(lb[i]):
            counts["unlabelled"] += 1
        elif la[i] == lb[i] == 0.5:
            counts["ties"] += 1
        elif {la[i], lb[i]} != {0.0, 1.0}:
            raise SailError(f"{where}: labels ({la[i]}, {lb[i]}) are not 1/0, 0/1 or 0.5/0.5")
        elif not (captions[i] or "").strip():
            counts["empty_caption"] += 1
        else:
            win = int(lb[i] == 1)
            pairs.append(dict(prompt=captions[i], w=(image_cols[win], (i, win)), l=(image_cols[1 - win], (i, 1 - win)),
                              where=where))
    images = ds.select_columns(list(image_cols))

    def fetch(key):
        value = images[key[0]][image_cols[key[1]]]
        if isinstance(value, dict):  # an Image feature: bytes, or a path to a file
            value = value.get("bytes") or (value.get("path") and Path(value["path"]).read_bytes())
        return value
    return pairs, counts, fetch


def pair_images(pair, fetch):
    """The bytes of a pair's two images and their file names (a hash of the bytes, the format's extension);
    ValueError naming an image that does not decode."""
    blobs, names = [], []
    for label, key in (pair["w"], pair["l"]):
        try:
            blobs.append(fetch(key))
            with Image.open(io.BytesIO(blobs[-1])) as img:
                img.load()
                ext = EXTENSIONS.get(img.format, str(img.format).lower())
        except Exception as err:  # PIL raises many kinds for a corrupt file, TypeError for an empty cell
            raise ValueError(f"{label} does not decode ({type(err).__name__}: {err})") from None
        names.append(f"{hashlib.sha1(blobs[-1]).hexdigest()[:20]}.{ext}")
    return names, blobs


def write_pairs(chosen, fetch, out_dir, on_corrupt):
    """Copy the images of the chosen pairs into out_dir/images/, write out_dir/pairs.jsonl, return counts."""
    folder = Path(out_dir) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows, counts = [], dict(pairs_selected=len(chosen), undecodable=[], same_image=0, images_written=0, images_present=0)
    for pair in progress(chosen, desc=Path(out_dir).name, unit="pair"):
        try:
            names, blobs = pair_images(pair, fetch)
        except ValueError as err:
            message = f"{pair['where']}: {err}"
            if on_corrupt == "fail":
                raise SailError(message + "; rerun with --on-corrupt skip to drop such pairs") from None
            log.warning("%s; pair skipped", message)
            counts["undecodable"].append(message)
            continue
        if names[0] == names[1]:  # the same picture twice teaches nothing
            counts["same_image"] += 1
            continue
        for name, data in zip(names, blobs):
            if (folder / name).exists():
                counts["images_present"] += 1
                continue
            (folder / (name + ".tmp")).write_bytes(data)
            os.replace(folder / (name + ".tmp"), folder / name)
            counts["images_written"] += 1
        rows.append(dict(prompt=pair["prompt"], image_w=f"images/{names[0]}", image_l=f"images/{names[1]}",
                         source="human", prompt_id=prompt_id(normalise_prompt(pair["prompt"]))))
    if not rows:
        raise SailError(f"none of the {len(chosen)} pairs for {out_dir} has two images that decode and differ")
    write_jsonl_atomic(Path(out_dir) / "pairs.jsonl", rows)
    counts.update(pairs_written=len(rows), prompts=len({normalise_prompt(r["prompt"]) for r in rows}))
    log.info("%s: %d pairs written (%d undecodable, %d of one image twice skipped), %d images written, %d present", out_dir,
             len(rows), len(counts["undecodable"]), counts["same_image"], counts["images_written"], counts["images_present"])
    return counts


def split_pairs(pairs, args):
    """Positions of the validation pairs (whole prompts) and of the seed pairs (from the other prompts)."""
    index = {}
    pidx = np.array([index.setdefault(normalise_prompt(p["prompt"]), len(index)) for p in pairs], np.int64)
    everything = SimpleNamespace(row=np.arange(len(pairs)), prompts=list(index), pidx=pidx)
    val = np.zeros(0, np.int64)
    if args.val_pairs:
        if not 0 < args.val_pairs < len(pairs):
            raise SailError(f"--val-pairs {args.val_pairs}: the source has {len(pairs)} non-tie pairs, and the seed needs some")
        val = select_rows(everything, args.val_pairs, [args.seed, 1], True)
    rest = np.flatnonzero(~np.isin(pidx, pidx[val]))
    if not len(rest):
        raise SailError("no pairs left for the seed: the validation prompts take them all; lower --val-pairs")
    n_seed = seed_count(args.seed_size, len(rest))
    seed = rest[select_rows(SimpleNamespace(row=rest, prompts=everything.prompts, pidx=pidx[rest]), n_seed,
                            [args.seed, 0], args.seed_sampling == "prompt")]
    return seed, val


def read_source(args):
    """The source's non-tie pairs (prompt, w and l as (label, key), where), counts, and fetch(key) -> bytes."""
    if args.dataset:
        return read_dataset(args)
    path = Path(args.pairs_file or args.rankings)
    if not path.is_file():
        raise SailError(f"{path}: file not found")
    rows = pair_file_rows(path) if args.pairs_file else ranking_rows(path)
    return (*ranked_pairs(rows, args.images or path.parent, args.ranking_pairs if args.rankings else "all"), Path.read_bytes)


def import_settings(args):
    """The pool sizes, the exclusion files and the settings that decide this import's outputs."""
    pool_sizes, excludes = pool_and_exclusion_files(args)
    file_id = lambda p: [Path(p).name, Path(p).stat().st_size] if p and Path(p).is_file() else p  # noqa: E731
    settings = dict(importer="import_pairs", pairs_file=file_id(args.pairs_file), rankings=file_id(args.rankings),
                    dataset=args.dataset, seed=args.seed, seed_size=str(args.seed_size), seed_sampling=args.seed_sampling,
                    pool_sizes=pool_sizes, prompt_file=file_id(args.prompt_file), val_pairs=args.val_pairs,
                    exclude_prompts=[file_id(f) for f in excludes], ranking_pairs=args.rankings and args.ranking_pairs)
    if not args.dataset:
        settings["images"] = str(Path(args.images or Path(args.pairs_file or args.rankings).parent).resolve())
    else:
        settings.update(split=args.split, columns=[args.caption_column, args.image_a_column, args.image_b_column,
                                                   args.label_a_column, args.label_b_column])
    return settings, pool_sizes, excludes


def choose_pools(args, pairs, used, excludes, pool_sizes):
    """Pool prompts from --prompt-file or the source, none of them used by the seed, validation or evaluation."""
    excluded = {normalise_prompt(p) for f in excludes for p in prompt_lines(f)} - {""}
    source = prompt_lines(args.prompt_file) if args.prompt_file else (p["prompt"] for p in pairs)
    chosen = choose_pool_prompts(source, excluded | used, sum(pool_sizes), args.seed) if pool_sizes else []
    if len(chosen) < sum(pool_sizes):
        raise SailError(f"pools need {sum(pool_sizes)} prompts ({args.pool_sizes}) but only {len(chosen)} remain in "
                        f"{args.prompt_file or 'the source'} after the seed, validation and evaluation prompts; "
                        f"give --prompt-file{' with more prompts' if args.prompt_file else ''} or smaller --pool-sizes")
    return chosen, excluded


def main(args):
    run, started = Path(args.run), time.time()
    settings, pool_sizes, excludes = import_settings(args)
    pools = [pool_path(run, i) for i in range(1, len(pool_sizes) + 1)]
    setup_logging(run, "import")
    if finished_import(run, settings, pools, args.val_pairs):
        return
    excludes += [run / "eval" / "prompts.jsonl"] if (run / "eval" / "prompts.jsonl").is_file() else []
    save_args(run, "import_pairs", args)
    with folder_lock(run, "import"):
        pairs, counts, fetch = read_source(args)
        counts.update(pairs_kept=len(pairs), unique_prompts=len({normalise_prompt(p["prompt"]) for p in pairs}))
        log.info("read: %s", counts)
        if not pairs:
            raise SailError("the source holds no pair with a preference (all ties or unlabelled)")
        seed_rows, val_rows = split_pairs(pairs, args)
        used = {normalise_prompt(pairs[i]["prompt"]) for i in np.concatenate([seed_rows, val_rows])}
        chosen, excluded = choose_pools(args, pairs, used, excludes, pool_sizes)
        write_json_atomic(run / "seed" / "plan.json", settings)  # from here on the folder holds this import
        for path, size, start in zip(pools, pool_sizes, np.cumsum([0] + pool_sizes).tolist()):
            write_jsonl_atomic(path, [dict(prompt_id=pid, prompt=p) for pid, p in chosen[start:start + size]])
        stats = dict(source=counts, excluded_prompts=len(excluded), seed_prompts_in_eval_sets=len(used & excluded))
        if args.val_pairs:
            stats["val"] = write_pairs([pairs[i] for i in val_rows], fetch, val_pairs_path(run).parent, args.on_corrupt)
        stats["seed"] = write_pairs([pairs[i] for i in seed_rows], fetch, run / "seed", args.on_corrupt)
        check_pools_disjoint(run)
        val = stats.get("val", dict(pairs_written=0, undecodable=[]))
        stats.update(pairs_read=counts["pairs_read"], ties_dropped=counts["ties"], seed_pairs=stats["seed"]["pairs_written"],
                     val_pairs=val["pairs_written"], undecodable=len(stats["seed"]["undecodable"]) + len(val["undecodable"]),
                     pool_sizes=pool_sizes, seconds=round(time.time() - started, 1))
        write_json_atomic(run / "seed" / "stats.json", stats)
        log.info("%d seed pairs, %d validation pairs, pools of %s prompts; %.1f s", stats["seed_pairs"], stats["val_pairs"],
                 pool_sizes, stats["seconds"])


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run folder, e.g. runs/mine")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs-file", help=".csv or .jsonl of prompt, image_a, image_b, choice (a, b or tie)")
    src.add_argument("--dataset", help="Hugging Face dataset: hub id, save_to_disk folder or data folder")
    src.add_argument("--rankings", help=".jsonl of prompt, images and ranks (1 = best) or scores (higher = better)")
    p.add_argument("--images", help="folder the image paths of --pairs-file / --rankings are relative to (default: its folder)")
    p.add_argument("--split", default="train", help="dataset split")
    for flag, pickapic_name in (("caption", "caption"), ("image-a", "jpg_0"), ("image-b", "jpg_1"), ("label-a", "label_0"),
                                ("label-b", "label_1")):
        p.add_argument(f"--{flag}-column", default=pickapic_name, help="dataset column (default: Pick-a-Pic v2's)")
    p.add_argument("--ranking-pairs", choices=("all", "best-worst"), default="all", help="every strict pair, or best vs worst")
    p.add_argument("--seed-size", default="all", help="seed pairs: a count, a fraction (0.06), a percentage or 'all'")
    p.add_argument("--seed-sampling", choices=("prompt", "pair"), default="prompt", help="draw whole prompts, or pairs")
    p.add_argument("--val-pairs", type=int, default=0, help="held-out pairs on prompts the seed does not use; 0: none")
    p.add_argument("--pool-sizes", default="10000,20000,20000", help="prompts per iteration, comma-separated; 0: none")
    p.add_argument("--prompt-file", help="draw the pools from this .jsonl ('prompt' field) or .txt file")
    p.add_argument("--exclude-prompts", nargs="*", default=None,
                   help="evaluation prompt files kept out of the pools (default: every *.jsonl in the kit's prompts/)")
    p.add_argument("--on-corrupt", choices=("fail", "skip"), default="fail", help="a pair with an undecodable image")
    p.add_argument("--seed", type=int, default=0)
    return p


if __name__ == "__main__":
    run_stage(main, build_parser().parse_args())
