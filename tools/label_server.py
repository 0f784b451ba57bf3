"""The labelling page's server: the judgements of a labelling run (replayed from its append-only file,
each new one flushed and fsynced before the answer), pairs handed out so that no two labellers judge
one pair, and the HTTP routes of the page (tools/label_page.html). tools/label.py prepares the run and starts it.

The server is the standard library's ThreadingHTTPServer: no extra dependency for a handful of routes, one thread
per request so that several people label at once.
"""
import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from sail.common import SailError
from sail.labelling import CHOICES, NAME, Refused

log = logging.getLogger("sail")


PAGE = (Path(__file__).resolve().parent / "label_page.html").read_text(encoding="utf-8")


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
