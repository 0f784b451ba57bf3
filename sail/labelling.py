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
    """Refused(status, message): a request answered with a 4xx status and a JSON error, having written nothing."""


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
        self.active, self.judged, self.stacks, self.times, self.held, self.count = {}, {}, {}, {}, {}, 0
        if self.path.is_file():
            data = self.path.read_bytes()
            if repair and data and not data.endswith(b"\n"):  # a write cut by a kill, never answered: drop it
                log.warning("%s: dropping an unfinished last line (%d bytes)", self.path, len(data) - data.rfind(b"\n") - 1)
                os.truncate(self.path, data.rfind(b"\n") + 1)
            for row in files.read_jsonl(self.path, allow_truncated_tail=True):
                self.apply(row, f"{self.path}:{row['_line']}")

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
        """One line, flushed and fsynced before anyone is answered; then the state follows it."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.apply(row, str(self.path))

    def holder(self, pair_id, now):
        name, until = self.held.get(pair_id, (None, 0))
        return name if until > now else None

    def next_pair(self, name):
        """The pair the labeller holds, else the first one nobody has judged or holds; held anew for HOLD_SECONDS."""
        with self.lock:
            now = time.time()
            mine = next((pid for pid, (who, _) in self.held.items() if who == name and pid not in self.judged), None)
            mine = mine or next((p["id"] for p in self.pairs if p["id"] not in self.judged
                                 and self.holder(p["id"], now) in (None, name)), None)
            if mine:
                self.held[mine] = (name, now + HOLD_SECONDS)
            return self.answer(mine, name)

    def judge(self, name, pair_id, choice):
        with self.lock:
            now = time.time()
            if pair_id not in self.by_id:
                raise Refused(404, f"unknown pair {pair_id!r}")
            if pair_id in self.judged:
                raise Refused(409, f"pair {pair_id} is judged already (by {self.active[self.judged[pair_id]]['labeller']})")
            if self.holder(pair_id, now) not in (None, name):
                raise Refused(409, f"pair {pair_id} is held by {self.holder(pair_id, now)}")
            pair = self.by_id[pair_id]
            self.append(dict(id=f"j{self.count + 1}", pair=pair_id, prompt_id=pair["prompt_id"], prompt=pair["prompt"],
                             image_a=pair["image_a"], image_b=pair["image_b"], choice=choice, labeller=name, time=stamp()))
            self.held.pop(pair_id, None)
        return self.next_pair(name)

    def undo(self, name):
        """Take back the labeller's last judgement in force; its pair comes back to them."""
        with self.lock:
            if not self.stacks.get(name):
                raise Refused(409, f"{name} has no judgement to undo")
            undone = self.active[self.stacks[name][-1]]
            self.append(dict(undo=undone["id"], labeller=name, time=stamp()))
            self.held = {pid: h for pid, h in self.held.items() if h[0] != name}
            self.held[undone["pair"]] = (name, time.time() + HOLD_SECONDS)
            return self.answer(undone["pair"], name)

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
