"""The judgements of a labelling run: replayed from their append-only file, each new one flushed
and fsynced before it is confirmed, and pairs handed out so that no two labellers judge one pair.
"""
import itertools
import json
import logging
import os
import random
import re
import statistics
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from sail import files
from sail.common import SailError

log = logging.getLogger("sail")


CHOICES = ("a", "b", "tie", "skip")


HOLD_SECONDS = 600  # a pair handed out stays its labeller's this long after their last request


NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


class Refused(Exception):
    """Refused(status, message): a request answered with this status and a JSON error, having recorded nothing."""


def order_pairs(generations, seed):
    """Every pair of each prompt's candidates, shuffled per prompt (sides too), interleaved across the prompts."""
    by_prompt = {}
    for row in generations:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    rounds = []
    for pid, rows in by_prompt.items():
        rng, pairs = random.Random(f"{seed}/{pid}"), []
        for x, y in itertools.combinations(sorted(rows, key=lambda r: r["index"]), 2):
            a, b = (x, y) if rng.random() < 0.5 else (y, x)
            pairs.append(dict(id=f"{pid}/{x['index']}-{y['index']}", prompt_id=pid, prompt=x["prompt"],
                              image_a=a["image"], image_b=b["image"]))
        rng.shuffle(pairs)
        rounds.append(pairs)
    return [p for turn in itertools.zip_longest(*rounds) for p in turn if p]


class Labelling:
    """The pairs, who holds which, and the judgements in force: the replay of judgements.jsonl, kept in step with it."""

    def __init__(self, folder, seed, target, repair=True, images=None):
        self.folder, self.target, self.lock = Path(folder), target, threading.Lock()
        self.image_dir = Path(images) if images else self.folder / "images"  # the page asks for images/<name>
        generations = files.read_jsonl(self.folder / "generations.jsonl", required=("prompt_id", "prompt", "index", "image"))
        self.pairs = order_pairs(generations, seed)
        self.by_id = {p["id"]: p for p in self.pairs}
        self.images = {Path(r["image"]).name for r in generations}
        self.path = self.folder / "judgements.jsonl"
        self.active, self.judged, self.stacks, self.times, self.holds, self.count = {}, {}, {}, {}, {}, 0
        self.size = 0  # bytes of complete lines in the file: where the next judgement goes
        if self.path.is_file():
            if repair:
                self.repair()
            for row in files.read_jsonl(self.path, allow_truncated_tail=True):
                self.apply(row, f"{self.path}:{row['_line']}")
            self.size = self.path.stat().st_size

    def repair(self):
        """Cut an unfinished last line (a write stopped by a kill, never confirmed), saying what is dropped."""
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            log.warning("%s: line %d is unfinished (a write cut short, never confirmed to anyone): dropping its %d "
                        "bytes %r", self.path, data.count(b"\n") + 1, len(data) - keep, data[keep:keep + 300])
            os.truncate(self.path, keep)

    def apply(self, row, where):
        missing = [k for k in (("undo", "labeller") if "undo" in row else ("id", "pair", "choice", "labeller", "time"))
                   if not isinstance(row.get(k), str)]
        if missing:
            raise SailError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
        if "undo" in row:
            if row["undo"] not in self.active:
                raise SailError(f"{where}: undo of {row['undo']!r}, which is no judgement in force")
            undone = self.active.pop(row["undo"])
            del self.judged[undone["pair"]]
            self.stacks[undone["labeller"]].remove(row["undo"])
            return
        if row.get("pair") not in self.by_id or row.get("choice") not in CHOICES:
            raise SailError(f"{where}: unknown pair {row.get('pair')!r} or choice {row.get('choice')!r} "
                            f"(were the candidates in generations.jsonl made anew?)")
        if row["pair"] in self.judged:
            raise SailError(f"{where}: pair {row['pair']} judged twice")
        self.active[row["id"]], self.judged[row["pair"]], self.count = row, row["id"], self.count + 1
        self.stacks.setdefault(row["labeller"], []).append(row["id"])
        try:
            self.times.setdefault(row["labeller"], []).append(datetime.fromisoformat(row["time"]).timestamp())
        except ValueError:
            raise SailError(f"{where}: time {row['time']!r} is not an ISO 8601 time") from None

    def append(self, row):
        """One complete line, fsynced before anyone is answered; then the state follows it. The line goes only
        after the complete lines this replay knows; a write that fails part-way is cut back to them before the
        error goes up, so a judgement is on disk whole or not at all."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            end = os.fstat(fd).st_size
            if end != self.size or (end and os.pread(fd, 1, end - 1) != b"\n"):
                raise OSError(f"{self.path} is {end} bytes, its complete lines {self.size}: not appending to it "
                              f"(a start of the server repairs it)")
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                os.ftruncate(fd, end)
                os.fsync(fd)
                raise
        finally:
            os.close(fd)
        self.size = end + len(data)
        self.apply(row, str(self.path))

    def holder(self, pair_id, now, other_than=None):
        """Who holds the pair now (a hold lapses HOLD_SECONDS after its labeller's last request), if not other_than."""
        return next((who for who, (pid, until) in self.holds.items()
                     if pid == pair_id and until > now and who != other_than), None)

    def next_pair(self, name):
        """The pair the labeller holds, else the first one nobody has judged or holds, held anew for HOLD_SECONDS.
        A labeller holds one pair at a time, so no one can take more than their share of the pairs."""
        with self.lock:
            now = time.time()
            mine = self.holds.pop(name, (None, 0))[0]
            if mine in self.judged or self.holder(mine, now):
                mine = None
            mine = mine or next((p["id"] for p in self.pairs
                                 if p["id"] not in self.judged and not self.holder(p["id"], now)), None)
            if mine:
                self.holds[name] = (mine, now + HOLD_SECONDS)
            return self.answer(mine, name)

    def judge(self, name, pair_id, choice):
        with self.lock:
            if pair_id not in self.by_id:
                raise Refused(404, "unknown pair")
            if pair_id in self.judged:
                raise Refused(409, "this pair is judged already")
            if self.holder(pair_id, time.time(), other_than=name):
                raise Refused(409, "another labeller holds this pair")
            pair = self.by_id[pair_id]
            self.append(dict(id=f"j{self.count + 1}", pair=pair_id, prompt_id=pair["prompt_id"], prompt=pair["prompt"],
                             image_a=pair["image_a"], image_b=pair["image_b"], choice=choice, labeller=name, time=stamp()))
            self.holds = {who: hold for who, hold in self.holds.items() if hold[0] != pair_id}
        return self.next_pair(name)

    def undo(self, name):
        """Take back the labeller's last judgement in force; its pair comes back to them."""
        with self.lock:
            if not self.stacks.get(name):
                raise Refused(409, "you have no judgement to undo")
            undone = self.active[self.stacks[name][-1]]
            self.append(dict(undo=undone["id"], labeller=name, time=stamp()))
            self.holds[name] = (undone["pair"], time.time() + HOLD_SECONDS)
            return self.answer(undone["pair"], name)

    def image_file(self, name):
        """The file of a listed image, only where it lies in the images folder once links are resolved; else None."""
        if name not in self.images:
            return None
        path = (self.image_dir / name).resolve()
        if path.parent != self.image_dir.resolve() or not path.is_file():
            log.warning("%s: not served: %s", self.image_dir / name, "outside the images folder once links are "
                        "resolved" if path.parent != self.image_dir.resolve() else "missing or not a file")
            return None
        return path

    def answer(self, pair_id, name):
        return dict(pair=self.by_id.get(pair_id), progress=self.progress(name))

    def progress(self, name):
        """Pairs done (a, b or tie) of the target, this labeller's seconds per pair, and the time to the target at the
        pace of everyone who judged in the last 5 minutes."""
        choices = [j["choice"] for j in self.active.values()]
        done, now = len(choices) - choices.count("skip"), time.time()
        paces = {who: pace(t) for who, t in self.times.items() if t and now - t[-1] < 300}
        rate = sum(1 / p for p in paces.values() if p)
        return dict(done=done, target=self.target, kept=choices.count("a") + choices.count("b"), ties=choices.count("tie"),
                    skips=choices.count("skip"), pairs=len(self.pairs), left=len(self.pairs) - len(self.judged),
                    yours=len(self.stacks.get(name, [])), seconds_per_pair=pace(self.times.get(name, [])),
                    eta_seconds=max(self.target - done, 0) / rate if rate else None, labellers=len(paces))


def pace(times):
    """Median seconds between the last 20 judgements, pauses over 2 minutes left out; None before the second."""
    recent = times[-21:]
    gaps = [b - a for a, b in zip(recent, recent[1:]) if b - a < 120]
    return round(statistics.median(gaps), 2) if gaps else None


def stamp():
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
