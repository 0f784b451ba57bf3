"""tools/import_pairs.py on small made-up sources: a CSV / JSONL pair file, a saved Hugging Face dataset with renamed
columns, rankings; winners, ties, bad rows named by file and line, undecodable images, seed fractions, disjoint
pools and validation prompts, reruns; and the seed DPO stage training on the result."""
import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from helpers import COLOURS, coloured_image
from PIL import Image

from sail.common import SailError
from sail.files import check_pools_disjoint, normalise_prompt, read_jsonl, read_pairs, read_prompts
from tools import import_pairs

EVAL_PROMPT, EVAL_PROMPT_2 = (r["prompt"] for r in read_jsonl(ROOT / "prompts" / "drawbench.jsonl")[:2])  # kit eval prompts


def make_images(folder, n):
    """n distinct small PNGs img_<i>.png in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        coloured_image(COLOURS[i % len(COLOURS)], size=16, seed=i).save(folder / f"img_{i}.png")


def write_csv(path, rows, header=("prompt", "image_a", "image_b", "choice")):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def pair_rows(n_prompts, per_prompt=2, tie_every=0):
    """CSV rows over n_prompts prompts, images img_0.. in pics/, choices alternating a / b (and tie)."""
    rows = []
    for k in range(n_prompts * per_prompt):
        choice = "tie" if tie_every and k % tie_every == tie_every - 1 else "ab"[k % 2]
        rows.append([f"prompt number {k // per_prompt}", f"pics/img_{2 * k}.png", f"pics/img_{2 * k + 1}.png", choice])
    return rows


def run(out, *argv):
    import_pairs.main(import_pairs.build_parser().parse_args(["--run", str(out), *map(str, argv)]))
    return out


def stats(out):
    return json.loads((out / "seed" / "stats.json").read_text())


def norms(path):
    return {normalise_prompt(r["prompt"]) for r in read_jsonl(path)}


def test_csv_end_to_end_winners_and_ties(tmp_path):
    make_images(tmp_path / "data" / "pics", 12)
    rows = pair_rows(3, tie_every=3) + [[EVAL_PROMPT, "pics/img_0.png", "pics/img_3.png", "B"]]
    src = write_csv(tmp_path / "data" / "my.csv", rows)
    out = run(tmp_path / "run", "--pairs-file", src, "--seed-size", "all", "--pool-sizes", 0)
    pairs = read_pairs(out / "seed" / "pairs.jsonl")
    kept = [r for r in rows if r[3].lower() != "tie"]
    assert len(pairs) == len(kept) == 5 and stats(out)["ties_dropped"] == 2 and stats(out)["pairs_read"] == 7
    folder = tmp_path / "data"
    by_prompt_and_loser = {}
    for prompt, a, b, choice in kept:
        win, lose = (b, a) if choice.lower() == "b" else (a, b)
        by_prompt_and_loser[(prompt, (folder / lose).read_bytes())] = (folder / win).read_bytes()
    for p in pairs:
        assert p["source"] == "human" and p["prompt_id"] == import_pairs.prompt_id(normalise_prompt(p["prompt"]))
        assert by_prompt_and_loser[(p["prompt"], p["_image_l"].read_bytes())] == p["_image_w"].read_bytes()
        assert p["_image_w"].parent == out / "seed" / "images"
    # img_0.png is in two pairs and stored once
    assert len(list((out / "seed" / "images").iterdir())) == 8
    assert (out / "import_pairs.args.json").is_file() and "import" in (out / "log.txt").read_text()


def test_jsonl_with_images_folder(tmp_path):
    make_images(tmp_path / "elsewhere" / "pics", 4)
    lines = [dict(prompt="a cat", image_a="pics/img_0.png", image_b="pics/img_1.png", choice="b"),
             dict(prompt="a dog", image_a="pics/img_2.png", image_b="pics/img_3.png", choice="a")]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = run(tmp_path / "run", "--pairs-file", src, "--images", tmp_path / "elsewhere", "--pool-sizes", 0)
    pairs = {p["prompt"]: p for p in read_pairs(out / "seed" / "pairs.jsonl")}
    pics = tmp_path / "elsewhere" / "pics"
    assert pairs["a cat"]["_image_w"].read_bytes() == (pics / "img_1.png").read_bytes()
    assert pairs["a dog"]["_image_w"].read_bytes() == (pics / "img_2.png").read_bytes()


@pytest.mark.parametrize("case, match", [
    ("header", r"my\.csv:1: missing column\(s\) choice"),
    ("short", r"my\.csv:3: missing column\(s\) choice"),
    ("choice", r"my\.csv:3: choice 'maybe' is not a, b or tie"),
    ("image", r"my\.csv:4: image not found: .*img_99\.png"),
    ("prompt", r"my\.csv:2: empty prompt"),
])
def test_bad_rows_stop_naming_file_and_line(tmp_path, case, match):
    make_images(tmp_path / "pics", 8)
    rows = pair_rows(2)
    header = ("prompt", "image_a", "image_b", "choice")
    if case == "header":
        header, rows = header[:3], [r[:3] for r in rows]
    elif case == "short":
        rows[1] = rows[1][:3]
    elif case == "choice":
        rows[1][3] = "maybe"
    elif case == "image":
        rows[2][2] = "pics/img_99.png"
    elif case == "prompt":
        rows[0][0] = " "
    src = write_csv(tmp_path / "my.csv", rows, header)
    with pytest.raises(SailError, match=match):
        run(tmp_path / "run", "--pairs-file", src, "--pool-sizes", 0)
    assert not (tmp_path / "run" / "seed" / "pairs.jsonl").exists()


def test_undecodable_image_stops_or_is_counted(tmp_path):
    make_images(tmp_path / "pics", 8)
    cut = tmp_path / "pics" / "img_5.png"
    cut.write_bytes(cut.read_bytes()[:200])  # a truncated PNG: it opens, but its pixels do not decode
    src = write_csv(tmp_path / "my.csv", pair_rows(2))
    with pytest.raises(SailError, match=r"my\.csv:4: .*img_5\.png does not decode.*--on-corrupt skip"):
        run(tmp_path / "run", "--pairs-file", src, "--pool-sizes", 0)
    out = run(tmp_path / "run", "--pairs-file", src, "--pool-sizes", 0, "--on-corrupt", "skip")
    assert len(read_pairs(out / "seed" / "pairs.jsonl")) == 3
    assert stats(out)["undecodable"] == 1 and "my.csv:4" in stats(out)["seed"]["undecodable"][0]


def test_rankings_all_pairs_or_best_worst(tmp_path):
    make_images(tmp_path / "pics", 10)
    lines = [dict(prompt="four images", images=[f"pics/img_{i}.png" for i in range(4)], ranks=[2, 1, 2, 3]),
             dict(prompt="three scored", images=[f"pics/img_{i}.png" for i in range(4, 7)], scores=[0.1, 0.9, 0.5]),
             dict(prompt="all tied", images=[f"pics/img_{i}.png" for i in range(7, 10)], ranks=[1, 1, 1])]
    src = tmp_path / "rank.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    every = run(tmp_path / "all", "--rankings", src, "--pool-sizes", 0)
    assert stats(every)["seed_pairs"] == (6 - 1) + 3 and stats(every)["ties_dropped"] == 1 + 3
    best = run(tmp_path / "bw", "--rankings", src, "--pool-sizes", 0, "--ranking-pairs", "best-worst")
    pairs = {p["prompt"]: p for p in read_pairs(best / "seed" / "pairs.jsonl")}
    assert len(pairs) == 2 and stats(best)["ties_dropped"] == 1
    pics = tmp_path / "pics"
    assert pairs["four images"]["_image_w"].read_bytes() == (pics / "img_1.png").read_bytes()  # rank 1
    assert pairs["four images"]["_image_l"].read_bytes() == (pics / "img_3.png").read_bytes()  # rank 3
    assert pairs["three scored"]["_image_w"].read_bytes() == (pics / "img_5.png").read_bytes()  # score 0.9
    assert pairs["three scored"]["_image_l"].read_bytes() == (pics / "img_4.png").read_bytes()
    src.write_text(json.dumps(dict(prompt="x", images=["pics/img_0.png", "pics/img_1.png"], ranks=[1])) + "\n")
    with pytest.raises(SailError, match=r"rank\.jsonl:1: expected 2 or more image paths and as many numbers in ranks"):
        run(tmp_path / "bad", "--rankings", src, "--pool-sizes", 0)


@pytest.mark.parametrize("spec, want", [("6", 6), ("0.5", 10), ("25%", 5), ("all", 20)])
def test_seed_size_forms(tmp_path, spec, want):
    make_images(tmp_path / "pics", 40)
    src = write_csv(tmp_path / "my.csv", pair_rows(10))
    out = run(tmp_path / "run", "--pairs-file", src, "--seed-size", spec, "--pool-sizes", 0, "--seed-sampling", "pair")
    assert len(read_pairs(out / "seed" / "pairs.jsonl")) == want == stats(out)["seed_pairs"]


def test_pools_and_validation_disjoint(tmp_path):
    make_images(tmp_path / "pics", 64)
    rows = pair_rows(16)
    rows[0][0] = rows[1][0] = EVAL_PROMPT  # never in a pool
    src = write_csv(tmp_path / "my.csv", rows)
    out = run(tmp_path / "run", "--pairs-file", src, "--seed-size", "6", "--val-pairs", 4, "--pool-sizes", "3,4")
    seed, val = norms(out / "seed" / "pairs.jsonl"), norms(out / "val" / "pairs.jsonl")
    assert len(read_pairs(out / "val" / "pairs.jsonl")) == 4 and len(val) == 2 and not seed & val
    assert len(read_pairs(out / "seed" / "pairs.jsonl")) == 6
    pools = [{normalise_prompt(r["prompt"]) for r in read_prompts(out / "pools" / f"iter_0{i}.jsonl")} for i in (1, 2)]
    assert [len(p) for p in pools] == [3, 4] and not pools[0] & pools[1]
    for pool in pools:
        assert not pool & (seed | val | {normalise_prompt(EVAL_PROMPT)})
        assert pool <= {normalise_prompt(r[0]) for r in rows}
    check_pools_disjoint(out)
    assert stats(out)["val_pairs"] == 4 and stats(out)["pool_sizes"] == [3, 4]
    # three validation pairs take two whole prompts: the other pair of the second is in neither set
    part = run(tmp_path / "part", "--pairs-file", src, "--seed-size", "all", "--val-pairs", 3, "--pool-sizes", 0)
    assert not norms(part / "seed" / "pairs.jsonl") & norms(part / "val" / "pairs.jsonl")
    assert stats(part)["seed_pairs"] == 32 - 4 and stats(part)["val_pairs"] == 3
    prompt_file = tmp_path / "mine.txt"
    prompt_file.write_text("\n".join([f"my prompt {i}" for i in range(5)] + [rows[2][0], EVAL_PROMPT_2]) + "\n")
    other = run(tmp_path / "other", "--pairs-file", src, "--seed-size", "all", "--pool-sizes", "2,3",
                "--prompt-file", prompt_file)
    assert set.union(*(norms(other / "pools" / f"iter_0{i}.jsonl") for i in (1, 2))) == {f"my prompt {i}" for i in range(5)}
    with pytest.raises(SailError, match="pools need 6 prompts.*only 5 remain"):  # not the seed's, not the eval prompt
        run(tmp_path / "short", "--pairs-file", src, "--pool-sizes", "3,3", "--prompt-file", prompt_file)


def test_rerun_skips_resumes_and_refuses_other_settings(tmp_path):
    make_images(tmp_path / "pics", 24)
    src = write_csv(tmp_path / "my.csv", pair_rows(6))
    out = run(tmp_path / "run", "--pairs-file", src, "--seed-size", "8", "--pool-sizes", "2")
    before = {f: f.read_bytes() for f in out.rglob("*.jsonl")}
    run(tmp_path / "run", "--pairs-file", src, "--seed-size", "8", "--pool-sizes", "2")
    assert "nothing to do" in (out / "log.txt").read_text().splitlines()[-1]
    gone = sorted((out / "seed" / "images").iterdir())[0]
    content = gone.read_bytes()
    gone.unlink()
    run(tmp_path / "run", "--pairs-file", src, "--seed-size", "8", "--pool-sizes", "2")
    assert gone.read_bytes() == content and {f: f.read_bytes() for f in out.rglob("*.jsonl")} == before
    assert stats(out)["seed"]["images_written"] == 1
    with pytest.raises(SailError, match="seed_size = '8', and this run has seed_size = '5'"):
        run(tmp_path / "run", "--pairs-file", src, "--seed-size", "5", "--pool-sizes", "2")
    assert {f: f.read_bytes() for f in out.rglob("*.jsonl")} == before


def png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_dataset_with_renamed_columns(tmp_path):
    datasets = pytest.importorskip("datasets")
    n = 8
    left = [coloured_image(COLOURS[i % 6], 16, seed=i) for i in range(n)]  # an Image feature
    right = [png_bytes(coloured_image(COLOURS[(i + 3) % 6], 16, seed=50 + i)) for i in range(n)]  # plain bytes
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (None, None)] * 2
    right[4] = b"not an image"  # row 4: left wins, its right image does not decode
    table = dict(text=[f"caption {i}" for i in range(n)], left=left, right=right,
                 l_pref=[a for a, _ in labels], r_pref=[b for _, b in labels])
    datasets.DatasetDict(train=datasets.Dataset.from_dict(table)).save_to_disk(str(tmp_path / "ds"))
    flags = ["--dataset", tmp_path / "ds", "--caption-column", "text", "--image-a-column", "left", "--image-b-column",
             "right", "--label-a-column", "l_pref", "--label-b-column", "r_pref", "--pool-sizes", 0]
    with pytest.raises(SailError, match=r"row 4: right does not decode"):
        run(tmp_path / "run", *flags)
    out = run(tmp_path / "run", *flags, "--on-corrupt", "skip")
    pairs = {p["prompt"]: p for p in read_pairs(out / "seed" / "pairs.jsonl")}
    assert sorted(pairs) == ["caption 0", "caption 1", "caption 5"]
    st = stats(out)["source"]
    assert st["ties"] == 2 and st["unlabelled"] == 2 and stats(out)["undecodable"] == 1
    pixels = lambda path: np.asarray(Image.open(path).convert("RGB"))  # noqa: E731
    assert np.array_equal(pixels(pairs["caption 0"]["_image_w"]), np.asarray(left[0]))
    assert pairs["caption 1"]["_image_w"].read_bytes() == right[1]  # label 0/1: image b wins, bytes as they were
    assert np.array_equal(pixels(pairs["caption 1"]["_image_l"]), np.asarray(left[1]))
    with pytest.raises(SailError, match="no column.*caption, jpg_0.*--caption-column"):
        run(tmp_path / "defaults", "--dataset", tmp_path / "ds", "--pool-sizes", 0)
    with pytest.raises(SailError, match="no split 'test'"):
        run(tmp_path / "split", *flags, "--split", "test")


def test_datasets_missing_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SailError, match="pip install datasets"):
        run(tmp_path / "run", "--dataset", tmp_path / "nowhere", "--pool-sizes", 0)


def test_imported_pairs_train_one_step(tmp_path):
    make_images(tmp_path / "pics", 16)
    out = run(tmp_path / "run", "--pairs-file", write_csv(tmp_path / "my.csv", pair_rows(4)), "--pool-sizes", 0)
    done = subprocess.run([sys.executable, str(ROOT / "00_seed_dpo.py"), "--run", str(out), "--preset", "tiny-sd15",
                           "--max-steps", "1", "--batch-size", "2", "--save-every", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "iter_00" / "ckpt" / "sail.json").read_text())
    assert info["pair_counts"] == {"human": 8, "self": 0} and info["steps"] == 1
