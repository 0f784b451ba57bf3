"""Benchmark of tools/prepare_pickapic.py on a generated Pick-a-Pic-shaped parquet set of about --gb GB.

    python -m bench.pickapic [--gb 1] [--rows-per-group 100] [--seed-size all] [--workdir DIR]

Writes train and validation shards with the Pick-a-Pic v2 columns (512x512 JPEGs of blurred noise, ~175 KB
each; 12% ties; --rows-per-group 0 puts a whole shard in one row group) into a temporary
folder, runs the importer on them in a child process, then deletes 10% of the seed images and runs it again
(resume). Prints rows/s, MB/s and the importer's peak RSS (VmHWM, so Linux only), beside that of a process
that only imports the same modules. Reads and writes only the temporary folder (or --workdir, kept).
"""
import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_jpegs(n, size=512, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        # blurred noise compresses like a detailed picture: ~175 KB at 512x512 and quality 95
        small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def write_set(folder, gb, rows_per_group, rows_per_shard=500, val_rows=200, seed=0):
    import pyarrow as pa
    import pyarrow.parquet as pq
    base = make_jpegs(32, seed=seed)
    avg = np.mean([len(b) for b in base])
    n_rows = int(gb * 1e9 / (2 * avg))
    rng = np.random.default_rng(seed)
    prompts = [f"synthetic prompt {i} " + "word " * (i % 20) for i in range(max(50, n_rows // 15))]

    def shard(path, start, n, tag):
        uid = [[f"{tag}-{start + r:08d}-{s}" for r in range(n)] for s in (0, 1)]
        # bytes after the JPEG end marker make every image unique and still decodable
        jpg = [[base[rng.integers(32)] + rng.bytes(8) for _ in range(n)] for _ in (0, 1)]
        tie = rng.random(n) < 0.12
        win0 = rng.random(n) < 0.5
        l0 = np.where(tie, 0.5, win0.astype(float))
        cols = dict(are_different=[True] * n, best_image_uid=[uid[0][r] if win0[r] else uid[1][r] for r in range(n)],
                    caption=[prompts[int(rng.integers(len(prompts)))] for _ in range(n)],
                    created_at=["2023-05-01"] * n, has_label=[True] * n, image_0_uid=uid[0],
                    image_0_url=[f"https://example.org/{u}.png" for u in uid[0]], image_1_uid=uid[1],
                    image_1_url=[f"https://example.org/{u}.png" for u in uid[1]], jpg_0=jpg[0], jpg_1=jpg[1],
                    label_0=l0, label_1=1 - l0, model_0=["sdxl"] * n, model_1=["sd2.1"] * n,
                    ranking_id=list(range(start, start + n)), user_id=[int(u) for u in rng.integers(0, 1000, n)],
                    num_example_per_prompt=[1] * n)
        pq.write_table(pa.table(cols), path, row_group_size=rows_per_group or n,
                       use_dictionary=["caption", "model_0", "model_1", "created_at"])

    n_shards = max(1, -(-n_rows // rows_per_shard))
    for i in range(n_shards):
        start = i * rows_per_shard
        shard(folder / f"train-{i:05d}-of-{n_shards:05d}.parquet", start, min(rows_per_shard, n_rows - start), "t")
    shard(folder / "validation-00000-of-00001.parquet", 0, val_rows, "v")
    return n_rows


# The child reports its own peak RSS: VmHWM belongs to the process image after exec, whereas ru_maxrss of a
# child also counts the parent's memory it was forked from.
PEAK = """import runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    status = open("/proc/self/status").read()
    print("peak_kb", status.split("VmHWM:")[1].split()[0], file=sys.stderr)
"""


def peak_mb(module, *argv, path=()):
    """Run a module of the kit in a child process; return (seconds, its peak RSS in MB)."""
    start = time.time()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *map(str, path)] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    done = subprocess.run([sys.executable, "-c", PEAK, module, *map(str, argv)], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        sys.exit(f"{module} failed:\n{done.stdout}\n{done.stderr}")
    return time.time() - start, int(done.stderr.split("peak_kb")[-1].split()[0]) / 1024


def run_importer(data, run, seed_size, val_pairs):
    return peak_mb("tools.prepare_pickapic", "--parquet-dir", data, "--run", run, "--seed-size", seed_size,
                   "--pool-sizes", "0", "--val-pairs", val_pairs, "--exclude-prompts")


def main(args):
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-pickapic-"))
    data, run = work / "pap", work / "run"
    data.mkdir(parents=True, exist_ok=True)
    try:
        start = time.time()
        n_rows = write_set(data, args.gb, args.rows_per_group)
        size = sum(p.stat().st_size for p in data.glob("*.parquet"))
        layout = f"row groups of {args.rows_per_group} rows" if args.rows_per_group else "one row group per shard"
        print(f"generated {n_rows} train rows, {size / 1e9:.2f} GB in {len(list(data.glob('*.parquet')))} shards "
              f"({layout}) in {time.time() - start:.0f} s")
        (work / "imports_only.py").write_text("import sail.files, numpy, PIL.Image, pyarrow.parquet\n")
        _, base = peak_mb("imports_only", path=[work])
        print(f"peak RSS of a process that only imports sail.files, numpy, PIL and pyarrow: {base:.0f} MB")
        first, peak = run_importer(data, run, args.seed_size, args.val_pairs)
        stats = json.loads((run / "seed" / "stats.json").read_text())
        written = sum(p.stat().st_size for p in (run / "seed" / "images").iterdir())
        print(f"import: {first:.1f} s, {n_rows / first:.0f} train rows/s, {stats['seed']['pairs_written']} seed pairs, "
              f"{written / 1e6 / first:.0f} MB/s of images written, peak RSS {peak:.0f} MB")
        images = sorted((run / "seed" / "images").iterdir())
        for f in images[::10]:
            f.unlink()
        again, peak = run_importer(data, run, args.seed_size, args.val_pairs)
        stats = json.loads((run / "seed" / "stats.json").read_text())
        print(f"resume after deleting {len(images[::10])} images: {again:.1f} s, {stats['seed']['images_written']} "
              f"written, {stats['seed']['images_present']} present, peak RSS {peak:.0f} MB")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="size of the generated train split")
    p.add_argument("--rows-per-group", type=int, default=100, help="parquet row group size; 0: one per shard")
    p.add_argument("--seed-size", default="all", help="passed to the importer ('all' extracts every image)")
    p.add_argument("--val-pairs", type=int, default=100)
    p.add_argument("--workdir", help="keep the generated data and run here instead of a temporary folder")
    main(p.parse_args())
