"""What the toy studies write: numbers, tables and a plot, with the record of how they were made.

Every study ends in write_results: <stem>.json (the numbers), <stem>.md (the tables, also printed)
and <stem>.png. The markdown says under its title when it was made, at which commit of the kit,
under which torch, and by which command, so that a table pasted into toy/RESULTS.md keeps that record.
"""
import datetime
import logging
import shlex
import subprocess
import sys
from pathlib import Path

from sail import files

log = logging.getLogger("sail")


def git(*args):
    """The output of a git command in the kit's folder, or None (no git, or not a clone)."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def commit():
    """The kit's commit, short, with a note when tracked files differ from it; None outside a clone."""
    head = git("rev-parse", "--short", "HEAD")
    if head and git("status", "--porcelain", "--untracked-files=no"):
        head += " with uncommitted changes"
    return head


def command_line():
    """The command this process runs, as a user would type it: python -m toy.study_long --out ..."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    head = ["python", "-m", spec.name] if spec and spec.name != "__main__" else ["python", sys.argv[0]]
    return shlex.join(head + sys.argv[1:])


def provenance():
    """{date, commit, torch, command} of this run."""
    import torch

    return dict(date=datetime.date.today().isoformat(), commit=commit(), torch=torch.__version__,
                command=command_line())


def stamped(text, made):
    """text with one line under its first heading: Made <date>, commit <c>, torch <v>: `<command>`."""
    line = (f"Made {made['date']}, commit {made['commit'] or 'unknown (not a git clone)'}, torch {made['torch']}: "
            f"`{made['command']}`")
    head, _, rest = text.partition("\n")
    if head.startswith("#"):
        return f"{head}\n\n{line}\n\n" + rest.lstrip("\n")
    return f"{line}\n\n{text}"


def write_results(out, stem, numbers, text, draw):
    """A study's outputs: <stem>.json (numbers and how they were made), <stem>.md (text with that
    record, also printed), <stem>.png (draw(path))."""
    made = provenance()
    text = stamped(text, made)
    files.write_json_atomic(out / f"{stem}.json", dict(numbers, made=made))
    (out / f"{stem}.md").write_text(text)
    draw(out / f"{stem}.png")
    print(text)
    log.info("written: %s, %s, %s", out / f"{stem}.md", out / f"{stem}.png", out / f"{stem}.json")
