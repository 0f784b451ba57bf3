"""File formats: JSONL, pair files, prompt pools, overlap refusal, locks, seeds."""
import json
import os

import pytest
from helpers import make_pairs, make_pool

from sail import common, files, models, settings, tiny
from tools import check_pools


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": 2,\n')
    with pytest.raises(common.SailError, match=r"x.jsonl:2: malformed JSON"):
        files.read_jsonl(path)
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(common.SailError, match=r"x.jsonl:2: expected a JSON object"):
        files.read_jsonl(path)
    path.write_text('{"a": 1}\n{"b": 1}\n')
    with pytest.raises(common.SailError, match=r"x.jsonl:2: missing field\(s\) a"):
        files.read_jsonl(path, required=("a",))
    path.write_text('{"a": "1"}\n')
    with pytest.raises(common.SailError, match=r"x.jsonl:1: field 'a' has the wrong type"):
        files.read_jsonl(path, types={"a": int})
    with pytest.raises(common.SailError, match="file not found"):
        files.read_jsonl(tmp_path / "missing.jsonl")


def test_truncated_tail_is_dropped_only_when_allowed(tmp_path):
    path = tmp_path / "partial.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ')
    assert [r["a"] for r in files.read_jsonl(path, allow_truncated_tail=True)] == [1, 2]
    with pytest.raises(common.SailError):
        files.read_jsonl(path)


def test_atomic_write_round_trip(tmp_path):
    rows = [{"prompt": "ünïcode", "x": 1.5}, {"prompt": "b", "x": 2}]
    files.write_jsonl_atomic(tmp_path / "a.jsonl", rows)
    assert [files.strip_private(r) for r in files.read_jsonl(tmp_path / "a.jsonl")] == rows
    assert not list(tmp_path.glob("*.tmp"))


def test_pairs_resolve_relative_paths_and_survive_a_move(tmp_path):
    path = make_pairs(tmp_path / "run" / "seed", n=3)
    rows = files.read_pairs(path)
    assert rows[0]["_image_w"] == (tmp_path / "run" / "seed" / "images" / "human_0_w.png").resolve()
    os.rename(tmp_path / "run", tmp_path / "moved")
    assert len(files.read_pairs(tmp_path / "moved" / "seed" / "pairs.jsonl")) == 3


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(image_l=r["image_w"]), "same file"),
    (lambda r: r.update(image_w="images/nothing.png"), "image not found"),
    (lambda r: r.update(source="robot"), "source must be"),
    (lambda r: r.pop("prompt"), "missing field"),
    (lambda r: r.update(p="high"), "wrong type"),
])
def test_bad_pair_lines(tmp_path, edit, message):
    path = make_pairs(tmp_path, n=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    edit(rows[1])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(common.SailError, match=rf"pairs.jsonl:2: .*{message}"):
        files.read_pairs(path)


def test_empty_pair_file(tmp_path):
    (tmp_path / "pairs.jsonl").write_text("\n")
    with pytest.raises(common.SailError, match="no pairs"):
        files.read_pairs(tmp_path / "pairs.jsonl")


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(common.SailError, match="unreadable image .*bad.png"):
        files.load_image(tmp_path / "bad.png", where="pairs.jsonl:4")


def test_prompt_pools(tmp_path):
    path = make_pool(tmp_path / "p.jsonl", range(3))
    assert [r["prompt_id"] for r in files.read_prompts(path)] == ["prompt0", "prompt1", "prompt2"]
    path.write_text(path.read_text() + json.dumps({"prompt_id": "prompt0", "prompt": "other"}) + "\n")
    with pytest.raises(common.SailError, match="p.jsonl:4: duplicate prompt_id"):
        files.read_prompts(path)
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(common.SailError, match="empty prompt file"):
        files.read_prompts(tmp_path / "e.jsonl")


def test_overlapping_pools_are_refused(tmp_path):
    make_pool(tmp_path / "pools" / "iter_01.jsonl", range(0, 4))
    make_pool(tmp_path / "pools" / "iter_02.jsonl", range(4, 8))
    make_pairs(tmp_path / "seed", n=2)
    assert len(files.check_pools_disjoint(tmp_path)) == 3
    make_pool(tmp_path / "pools" / "iter_02.jsonl", range(3, 8), prefix="prompt")
    with pytest.raises(common.SailError, match="iter_01.jsonl and .*iter_02.jsonl share 1 prompt"):
        files.check_pools_disjoint(tmp_path)
    make_pool(tmp_path / "pools" / "iter_02.jsonl", range(4, 8))
    (tmp_path / "pools" / "iter_03.jsonl").write_text(json.dumps({"prompt_id": "s", "prompt": "A  0 square"}) + "\n")
    with pytest.raises(common.SailError, match="pairs.jsonl share 1 prompt"):
        files.check_pools_disjoint(tmp_path)


def test_check_pools_command_refuses_a_missing_run_folder(tmp_path, monkeypatch, capsys):
    """run_all.sh's pool check: a mistyped run folder is an error, not "disjoint"."""
    with pytest.raises(SystemExit) as stop:
        common.run_stage(check_pools.main, check_pools.build_parser().parse_args([str(tmp_path / "typo")]))
    assert stop.value.code == 2 and "typo: no such run folder" in capsys.readouterr().err
    make_pool(tmp_path / "pools" / "iter_01.jsonl", range(2))
    check_pools.main(check_pools.build_parser().parse_args([str(tmp_path)]))
    assert "prompt sets disjoint: iter_01.jsonl (2)" in capsys.readouterr().out


def test_folder_lock_refuses_a_second_writer_and_ignores_a_dead_one(tmp_path):
    with files.folder_lock(tmp_path, "one"):
        with pytest.raises(common.SailError, match=r"locked by another stage \(\S+ \d+ one\)"):
            with files.folder_lock(tmp_path, "two"):
                pass
    with files.folder_lock(tmp_path, "free again"):
        pass
    (tmp_path / ".lock").write_text("otherhost 999999999 killed")  # what a killed holder leaves behind
    with files.folder_lock(tmp_path, "three"):
        assert "three" in (tmp_path / ".lock").read_text()


RACER = """
import sys, time
sys.path.insert(0, {root!r})
from sail import common, files
folder, start, log = sys.argv[1], float(sys.argv[2]), sys.argv[3]
time.sleep(max(0.0, start - time.time()))
try:
    with files.folder_lock(folder, "racer"):
        with open(log, "a") as f:
            f.write("in\\n")
        deadline = time.time() + 60  # hold the lock until every other racer has been refused
        while open(log).read().count("refused") < {others} and time.time() < deadline:
            time.sleep(0.05)
except common.SailError as err:
    with open(log, "a") as f:
        f.write("refused\\n")
    print(err)
"""


def test_processes_racing_for_a_folder_with_a_dead_lock_let_exactly_one_in(tmp_path):
    """Six processes start at the same instant on a folder whose .lock a killed process of this host
    left: one holds the lock, every other one is refused."""
    import socket
    import subprocess
    import sys
    import time

    from conftest import ROOT
    folder, log, n = tmp_path / "run", tmp_path / "held.txt", 6
    folder.mkdir()
    (folder / ".lock").write_text(f"{socket.gethostname()} 999999999 killed")
    script = tmp_path / "racer.py"
    script.write_text(RACER.format(root=str(ROOT), others=n - 1))
    start = time.time() + 5.0
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), str(start), str(log)], stdout=subprocess.PIPE,
                              text=True) for _ in range(n)]
    outs = [p.communicate(timeout=180)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    events = log.read_text().split()
    assert events.count("in") == 1 and events.count("refused") == n - 1, events
    assert sum("locked by another stage" in out for out in outs) == n - 1, outs


def test_seeds_are_stable():
    assert common.derive_seed(0, "p1", 3) != common.derive_seed(0, "p1", 4)
    assert common.derive_seed(0, "abc", 0) == 463488955660601541  # fixed forever: changing it changes every image


def test_unknown_preset_and_bad_model_path(tmp_path):
    with pytest.raises(common.SailError, match="unknown preset 'nope'"):
        settings.get_preset("nope")
    with pytest.raises(common.SailError, match="neither a SAIL checkpoint"):
        models.describe_model(str(tmp_path))
    with pytest.raises(common.SailError, match="not a finished SAIL checkpoint"):
        (tmp_path / "ck").mkdir()
        (tmp_path / "ck" / "sail.json").write_text("{}")
        models.read_checkpoint_info(tmp_path / "ck")


def test_too_little_disk_space_is_refused_up_front(tmp_path, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage(10 * 2**30, 9 * 2**30, 2**30))
    files.check_free_space(tmp_path / "not" / "yet", 2**29, "images")
    with pytest.raises(common.SailError, match=r"not enough disk space .* for images: about 2.0 GiB needed, 1.0 GiB free"):
        files.check_free_space(tmp_path, 2 * 2**30, "images")


def test_tiny_model_built_twice_into_one_folder_keeps_the_first(tmp_path):
    """Two processes may build a kit model into the cache at once: the later one keeps the finished
    folder and leaves no temporary folder behind."""
    first = tiny.build_tiny_pipeline("sd15", tmp_path / "tiny")
    stamp = (first / "model_index.json").stat().st_mtime_ns
    assert tiny.build_tiny_pipeline("sd15", tmp_path / "tiny") == first
    assert (first / "model_index.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
