"""toy/results.py: every study's markdown and numbers say when, at which commit, under which torch
and by which command they were made."""
import datetime
import json
import subprocess
import sys
from types import SimpleNamespace

import torch

from toy import results


def as_if_run(monkeypatch, module, *argv):
    """This process as `python -m module argv...` would see itself."""
    monkeypatch.setattr(sys, "argv", [f"/kit/{module.replace('.', '/')}.py", *argv])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", SimpleNamespace(name=module), raising=False)


def test_results_record_date_commit_torch_and_command(tmp_path, root, monkeypatch):
    as_if_run(monkeypatch, "toy.study_long", "--out", "runs/my long", "--seeds", "2", "3")
    drawn = []
    results.write_results(tmp_path, "long", dict(summary={"x": 1}), "## Long runs\n\n| a | b |\n", drawn.append)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    head = head.stdout.strip()
    lines = (tmp_path / "long.md").read_text().splitlines()
    assert lines[0] == "## Long runs" and lines[1] == "" and lines[3] == "" and lines[4] == "| a | b |"
    assert lines[2].startswith(f"Made {datetime.date.today().isoformat()}, commit {head or 'unknown'}")
    command = "python -m toy.study_long --out 'runs/my long' --seeds 2 3"
    assert lines[2].endswith(f", torch {torch.__version__}: `{command}`")
    made = json.loads((tmp_path / "long.json").read_text())
    assert made["summary"] == {"x": 1} and made["made"]["command"] == command
    assert drawn == [tmp_path / "long.png"]


def test_outside_a_clone_the_commit_is_unknown(monkeypatch):
    monkeypatch.setattr(results, "git", lambda *args: None)
    assert results.commit() is None
    made = dict(date="2026-01-02", commit=None, torch="2.0", command="python -m toy.study")
    line = "Made 2026-01-02, commit unknown (not a git clone), torch 2.0: `python -m toy.study`"
    assert results.stamped("| a |\n", made) == f"{line}\n\n| a |\n"


def test_uncommitted_changes_are_said(monkeypatch):
    answers = {"rev-parse": "abc1234", "status": " M toy/study.py"}
    monkeypatch.setattr(results, "git", lambda *args: answers[args[0]])
    assert results.commit() == "abc1234 with uncommitted changes"
    answers["status"] = ""
    assert results.commit() == "abc1234"
