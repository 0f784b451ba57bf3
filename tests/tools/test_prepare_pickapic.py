"""tools/prepare_pickapic.py on small generated shards with the Pick-a-Pic v2 schema: ties, duplicate prompts
(differing in case and spaces), a corrupt JPEG, a shard missing a column, several row groups."""
import collections
import io
import json
import shutil
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from sail import importing
from sail.common import SailError
from sail.files import check_pools_disjoint, normalise_prompt, read_jsonl, read_pairs, read_prompts
from tools import prepare_pickapic

CORRUPT = ("train-00001-of-00002.parquet", 5)  # shard and row of the one bad jpg_1


def jpeg(seed):
    arr = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, split, shard, captions, labels, corrupt_row=None, drop=None, index_column=False, group=7):
    n = len(captions)
    uid = [[f"{split}{shard}-r{r}-{s}" for r in range(n)] for s in (0, 1)]
    jpgs = [[jpeg(zlib.crc32(f"{split}{shard}-{r}-{s}".encode())) for r in range(n)] for s in (0, 1)]
    if corrupt_row is not None:
        jpgs[1][corrupt_row] = b"\xff\xd8 not a jpeg"
    cols = dict(are_different=[True] * n, best_image_uid=[uid[0][r] if labels[r][0] >= 0.5 else uid[1][r] for r in range(n)],
                caption=captions, created_at=[f"2023-05-{1 + r % 28:02d}" for r in range(n)], has_label=[True] * n,
                image_0_uid=uid[0], image_0_url=[f"http://x/{u}" for u in uid[0]], image_1_uid=uid[1],
                image_1_url=[f"http://x/{u}" for u in uid[1]], jpg_0=jpgs[0], jpg_1=jpgs[1],
                label_0=[float(a) for a, _ in labels], label_1=[float(b) for _, b in labels],
                model_0=["sdxl"] * n, model_1=["sd21"] * n, ranking_id=[shard * 1000 + r for r in range(n)],
                user_id=[r % 5 for r in range(n)], num_example_per_prompt=[1] * n)
    if index_column:
        cols["__index_level_0__"] = list(range(n))
    cols.pop(drop, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path, row_group_size=group)
    return uid


def labels_for(n, offset):
    out = []
    for r in range(n):
        k = (r + offset) % 9
        out.append((0.5, 0.5) if k == 0 else (1, 0) if k % 2 else (0, 1))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickapic")
    prompts = [f"a photo of thing number {i}" for i in range(60)]
    truth = dict(rows=0, ties=0, prompts=set(), win={}, per_prompt=collections.Counter())
    for shard in range(2):
        n = 45
        caps = [prompts[(7 * r + 13 * shard) % 60 if r < 30 else r % 10] for r in range(n)]
        caps = [c.upper() if r % 4 == 0 else c.replace(" ", "  ") if r % 4 == 1 else c for r, c in enumerate(caps)]
        labs = labels_for(n, shard)
        uid = write_shard(root / "pap" / f"train-{shard:05d}-of-00002.parquet", "train", shard, caps, labs,
                          corrupt_row=CORRUPT[1] if shard == 1 else None, index_column=shard == 0)
        for r in range(n):
            truth["rows"] += 1
            if labs[r][0] == 0.5:
                truth["ties"] += 1
                continue
            truth["prompts"].add(normalise_prompt(caps[r]))
            truth["per_prompt"][normalise_prompt(caps[r])] += 1
            truth["win"][uid[0][r]], truth["win"][uid[1][r]] = labs[r][0] == 1, labs[r][1] == 1
    val_caps = [f"a validation prompt {r % 6}" for r in range(30)]
    write_shard(root / "pap" / "validation-00000-of-00001.parquet", "val", 0, val_caps, labels_for(30, 2))
    write_shard(root / "pap" / "test_unique" / "part-0.parquet", "test", 0, prompts[50:55], labels_for(5, 1))
    (root / "eval.jsonl").write_text("".join(json.dumps({"prompt": p, "category": "x"}) + "\n" for p in prompts[40:45]))
    truth["kept"] = truth["rows"] - truth["ties"]
    truth["test_prompts"] = {normalise_prompt(p) for p in prompts[50:55]}
    truth["eval_prompts"] = {normalise_prompt(p) for p in prompts[40:45]}
    truth["val_prompts"] = {normalise_prompt(p) for p in val_caps}
    return root, truth


def run(data, tmp_path, *extra, name="run"):
    root, _ = data
    argv = ["--parquet-dir", str(root / "pap"), "--run", str(tmp_path / name), "--seed-size", "20",
            "--pool-sizes", "5,8,8", "--val-pairs", "10", "--exclude-prompts", str(root / "eval.jsonl")]
    args = prepare_pickapic.parse_args(argv + list(extra))
    prepare_pickapic.main(args)
    return tmp_path / name


def stats(run_dir):
    return json.loads((run_dir / "seed" / "stats.json").read_text())


def norms(path):
    return {normalise_prompt(r["prompt"]) for r in read_jsonl(path)}


def test_counts_ties_winners_and_corrupt_skip(data, tmp_path):
    _, truth = data
    out = run(data, tmp_path, "--seed-size", "all", "--pool-sizes", "0")
    st = stats(out)
    assert st["train"]["rows"] == truth["rows"] == 90
    assert st["train"]["ties"] == truth["ties"] > 0
    assert st["train"]["pairs_kept"] == truth["kept"]
    assert st["train"]["unique_prompts"] == len(truth["prompts"])
    corrupt = st["seed"]["corrupt"]
    assert [(c["shard"], c["row"]) for c in corrupt] == [CORRUPT]
    assert "row 5" in corrupt[0]["message"] and CORRUPT[0] in corrupt[0]["message"]
    pairs = read_pairs(out / "seed" / "pairs.jsonl")
    assert len(pairs) == truth["kept"] - 1 == st["seed"]["pairs_written"]
    for p in pairs:
        assert p["source"] == "human" and p["prompt_id"] == importing.prompt_id(normalise_prompt(p["prompt"]))
        assert truth["win"][p["_image_w"].stem] and not truth["win"][p["_image_l"].stem]
        Image.open(p["_image_w"]).load()
    uids = {p["_image_w"].stem for p in pairs} | {p["_image_l"].stem for p in pairs}
    assert len(list((out / "seed" / "images").iterdir())) == len(uids) == 2 * len(pairs)
    assert not list(out.glob("pools/*"))
    assert (out / "pickapic.args.json").is_file() and "pickapic" in (out / "log.txt").read_text()


def test_jpeg_bytes_kept_as_they_are(data, tmp_path):
    root, _ = data
    out = run(data, tmp_path, "--seed-size", "5", "--pool-sizes", "0", "--val-pairs", "0")
    table = pq.read_table(root / "pap" / "train-00000-of-00002.parquet", columns=["image_0_uid", "jpg_0"]).to_pylist()
    table += pq.read_table(root / "pap" / "train-00001-of-00002.parquet", columns=["image_0_uid", "jpg_0"]).to_pylist()
    by_uid = {r["image_0_uid"]: r["jpg_0"] for r in table}
    checked = 0
    for f in (out / "seed" / "images").iterdir():
        if f.stem in by_uid:
            assert f.read_bytes() == by_uid[f.stem]
            checked += 1
    assert checked > 0


def test_seed_size_forms(data, tmp_path):
    _, truth = data
    assert importing.seed_count("all", 100) == 100 and importing.seed_count("0.06", 1000) == 60
    assert importing.seed_count("6%", 1000) == 60 and importing.seed_count("50000", 851293) == 50000
    for bad in ("0", "1.5", "lots", "101"):
        with pytest.raises(SailError, match="--seed-size"):
            importing.seed_count(bad, 100)
    for spec, want in (("12", 12), ("0.25", round(0.25 * truth["kept"]))):
        out = run(data, tmp_path, "--seed-size", spec, "--pool-sizes", "0", "--val-pairs", "0", name=f"s{spec}")
        st = stats(out)
        assert st["seed"]["pairs_selected"] == want
        assert st["seed"]["pairs_written"] + len(st["seed"]["corrupt"]) == want


def test_pool_prompts_unique_and_disjoint(data, tmp_path):
    _, truth = data
    run_eval = {f"a photo of thing number {i}" for i in range(10)}
    (tmp_path / "run" / "eval").mkdir(parents=True)
    (tmp_path / "run" / "eval" / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt_id": f"e{i}", "prompt": p}) + "\n" for i, p in enumerate(sorted(run_eval))))
    out = run(data, tmp_path)
    pools = [read_prompts(out / "pools" / f"iter_{i:02d}.jsonl") for i in (1, 2, 3)]
    assert [len(p) for p in pools] == [5, 8, 8]
    sets = [{normalise_prompt(r["prompt"]) for r in p} for p in pools]
    assert len(set.union(*sets)) == 21
    seed = norms(out / "seed" / "pairs.jsonl")
    for s in sets:
        assert s <= truth["prompts"]
        assert not s & (seed | truth["eval_prompts"] | truth["test_prompts"] | truth["val_prompts"] | run_eval)
    for p in pools:
        for r in p:
            assert r["prompt_id"] == importing.prompt_id(normalise_prompt(r["prompt"]))
    check_pools_disjoint(out)
    # whole prompts are drawn for the seed: each seed prompt brings all its pairs (but the last one's)
    counts = collections.Counter(normalise_prompt(r["prompt"]) for r in read_jsonl(out / "seed" / "pairs.jsonl"))
    partial = [p for p, n in counts.items() if n < truth["per_prompt"][p]]
    assert len(partial) <= 1 + len(stats(out)["seed"]["corrupt"])
    # an evaluation file written later that overlaps a pool is caught when the import is rerun
    pool_prompt = pools[0][0]["prompt"]
    (out / "eval" / "prompts.jsonl").write_text(json.dumps({"prompt_id": "x", "prompt": pool_prompt}) + "\n")
    with pytest.raises(SailError, match="overlap"):
        run(data, tmp_path)


def test_deterministic_and_seed_dependent(data, tmp_path):
    a, b = run(data, tmp_path, name="a"), run(data, tmp_path, name="b")
    c = run(data, tmp_path, "--seed", "1", name="c")
    files = ["seed/pairs.jsonl", "val/pairs.jsonl"] + [f"pools/iter_{i:02d}.jsonl" for i in (1, 2, 3)]
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    assert (a / "seed/pairs.jsonl").read_bytes() != (c / "seed/pairs.jsonl").read_bytes()
    assert (a / "pools/iter_01.jsonl").read_bytes() != (c / "pools/iter_01.jsonl").read_bytes()
    p = run(data, tmp_path, "--seed-sampling", "pair", name="p")
    assert len(norms(p / "seed/pairs.jsonl")) > len(norms(a / "seed/pairs.jsonl"))


def test_resume_and_refusals(data, tmp_path):
    out = run(data, tmp_path)
    before = {f: f.read_bytes() for f in out.rglob("*.jsonl")}
    images = sorted((out / "seed" / "images").iterdir())
    gone = {f: f.read_bytes() for f in images[:3] + sorted((out / "val" / "images").iterdir())[:1]}
    for f in gone:
        f.unlink()
    (out / "seed" / "pairs.jsonl").unlink()
    run(data, tmp_path)
    assert {f: f.read_bytes() for f in out.rglob("*.jsonl")} == before
    assert all(f.read_bytes() == content for f, content in gone.items())
    st = stats(out)
    assert st["seed"]["images_written"] == 3 and st["seed"]["images_present"] == len(images) - 3
    assert stats(out)["validation"]["images_written"] == 1
    run(data, tmp_path)
    assert "nothing to do" in (out / "log.txt").read_text().splitlines()[-1]
    with pytest.raises(SailError, match="seed_size = '20', and this run has seed_size = '30'"):
        run(data, tmp_path, "--seed-size", "30")
    other = tmp_path / "foreign"
    (other / "pools").mkdir(parents=True)
    (other / "pools" / "iter_01.jsonl").write_text('{"prompt_id": "a", "prompt": "b"}\n')
    with pytest.raises(SailError, match="not written by this importer"):
        run(data, tmp_path, name="foreign")


def test_corrupt_fails_on_request(data, tmp_path):
    with pytest.raises(SailError, match=r"train-00001-of-00002\.parquet: row 5: jpg_1 does not decode"):
        run(data, tmp_path, "--seed-size", "all", "--pool-sizes", "0", "--val-pairs", "0", "--on-corrupt", "fail")


def test_missing_column_and_bad_labels(data, tmp_path):
    root, _ = data
    bad = tmp_path / "bad"
    shutil.copytree(root / "pap", bad)
    write_shard(bad / "train-00002-of-00002.parquet", "train", 2, ["x"] * 3, labels_for(3, 1), drop="label_1")
    with pytest.raises(SailError, match=r"train-00002-of-00002\.parquet: missing column\(s\) label_1"):
        run(data, tmp_path, "--train-files", str(bad / "train-*.parquet"))
    write_shard(bad / "train-00002-of-00002.parquet", "train", 2, ["x"] * 3, [(1, 0), (1, 0), (0.7, 0.3)])
    with pytest.raises(SailError, match=r"train-00002-of-00002\.parquet: row 2: labels \(0.7, 0.3\)"):
        run(data, tmp_path, "--train-files", str(bad / "train-*.parquet"))


def test_user_prompt_file(data, tmp_path):
    _, truth = data
    lines = [f"my prompt {i % 30}" for i in range(60)] + ["A photo of thing  number 41", "", "a validation prompt 1"]
    txt = tmp_path / "mine.txt"
    txt.write_text("\n".join(lines) + "\n")
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    outs = [run(data, tmp_path, "--prompt-file", str(f), "--seed-size", "all", name=f.suffix[1:]) for f in (txt, jsonl)]
    for out in outs:
        got = set.union(*(norms(out / "pools" / f"iter_{i:02d}.jsonl") for i in (1, 2, 3)))
        assert len(got) == 21 and got <= {f"my prompt {i}" for i in range(30)}
        check_pools_disjoint(out)
    assert (outs[0] / "pools/iter_02.jsonl").read_bytes() == (outs[1] / "pools/iter_02.jsonl").read_bytes()
    with pytest.raises(SailError, match="pools need 100 prompts.*only 30"):
        run(data, tmp_path, "--prompt-file", str(txt), "--pool-sizes", "50,50", name="short")
    with pytest.raises(SailError, match="--prompt-file"):
        run(data, tmp_path, "--seed-size", "all", name="nopool")


def test_validation_pairs(data, tmp_path):
    _, truth = data
    out = run(data, tmp_path)
    pairs = read_pairs(out / "val" / "pairs.jsonl")
    assert len(pairs) == 10 and {normalise_prompt(p["prompt"]) for p in pairs} <= truth["val_prompts"]
    assert all(p["_image_w"].parent == out / "val" / "images" for p in pairs)
    assert stats(out)["validation"]["pairs_written"] == 10
    with pytest.raises(SailError, match="--val-pairs 500"):
        run(data, tmp_path, "--val-pairs", "500", name="v500")


def test_pyarrow_missing_message(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(SailError, match="pip install pyarrow"):
        run(data, tmp_path)
