"""The labelling page's server: the judgements of a labelling run (replayed from its append-only file,
each new one flushed and fsynced before the answer), pairs handed out so that no two labellers judge
one pair, and the HTTP routes of the page (label_page.html). label.py prepares the run and starts it.

The server is the standard library's ThreadingHTTPServer: no extra dependency for a handful of routes, one thread
per request so that several people label at once.
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import run_files
from run_files import SailError

log = logging.getLogger("sail")
PAGE = (Path(__file__).resolve().parent / "label_page.html").read_text(encoding="utf-8")
CHOICES = ("a", "b", "tie", "skip")
HOLD_SECONDS = 600  # a pair handed out stays its labeller's this long after their last request
NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")


# ---------------------------------------------------------------- the judgements
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
        generations = run_files.read_jsonl(self.folder / "generations.jsonl", required=("prompt_id", "prompt", "index", "image"))
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
            for row in run_files.read_jsonl(self.path, allow_truncated_tail=True):
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


# ---------------------------------------------------------------- the server
class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    def send(self, status, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "max-age=3600" if kind == "image/png" else "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url, state = urlparse(self.path), self.server.labelling
        if url.path == "/":
            self.send(200, PAGE.replace("__NAME__", json.dumps(self.server.default_name)).encode(), "text/html; charset=utf-8")
        elif url.path.startswith("/images/") and url.path[8:] in state.images:
            self.send(200, (state.image_dir / url.path[8:]).read_bytes(), "image/png")
        elif url.path == "/api/status":
            with state.lock:
                self.send(200, state.progress(parse_qs(url.query).get("name", [""])[0]))
        else:
            self.send(404, dict(error=f"not found: {url.path}"))

    def do_POST(self):
        state, route = self.server.labelling, urlparse(self.path).path
        try:
            length = self.headers.get("Content-Length", "")
            size = int(length) if length.isdigit() else 0
            if route not in ("/api/next", "/api/judge", "/api/undo"):
                raise Refused(404, f"not found: {route}")
            if self.headers.get_content_type() != "application/json":  # so that other sites' pages need a CORS preflight
                raise Refused(415, "expected Content-Type: application/json")
            if not 0 < size <= 65536:
                raise Refused(400, "expected a JSON body of at most 64 KiB")
            try:
                body = json.loads(self.rfile.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise Refused(400, f"malformed JSON: {err}") from None
            need = ("name", "pair", "choice") if route == "/api/judge" else ("name",)
            if not isinstance(body, dict) or any(not isinstance(body.get(k), str) for k in need):
                raise Refused(400, f"expected a JSON object with the string field(s) {', '.join(need)}")
            if not NAME.fullmatch(body["name"]):
                raise Refused(400, f"name {body['name'][:50]!r}: use 1 to 40 letters, digits, '.', '_' or '-'")
            if route == "/api/judge" and body["choice"] not in CHOICES:
                raise Refused(400, f"choice {body['choice'][:20]!r}: expected one of {', '.join(CHOICES)}")
            answer = (state.next_pair(body["name"]) if route == "/api/next" else state.undo(body["name"])
                      if route == "/api/undo" else state.judge(body["name"], body["pair"], body["choice"]))
            self.send(200, answer)
        except Refused as err:
            self.send(err.args[0], dict(error=err.args[1]))
        except OSError as err:  # e.g. a full disk: nothing was answered as written
            log.error("%s: %s", route, err)
            self.send(500, dict(error=f"{type(err).__name__}: {err}"))


def make_server(labelling, host, port, default_name="labeller"):
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as err:
        raise SailError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
    server.labelling, server.default_name = labelling, default_name
    return server
