"""The labelling page's server (tools/label.py and tools/spot_check.py start it): who may label (a link with a
token per labeller), the Host and Origin checks, security headers on every answer, and the routes of the page
(tools/label_page.html) over the judgement store of sail/labelling.py.

HTTP itself is waitress's, a production WSGI server in pure Python: it parses requests, closes connections that
stay silent, caps the connections and the size of headers and bodies. The routes are a handful, written out here
rather than through a web framework.
"""
import base64
import hashlib
import ipaddress
import json
import logging
import os
import resource
import secrets
import socket
import threading
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import waitress
from waitress import wasyncore

from sail.common import SailError
from sail.labelling import CHOICES, NAME, Refused

log = logging.getLogger("sail")


PAGE = (Path(__file__).resolve().parent / "label_page.html").read_text(encoding="utf-8")


MAX_BODY = 65536  # bytes of a request body; the page's are under 200


TOKENS_FILE = "tokens.json"


SECURITY_HEADERS = [("X-Content-Type-Options", "nosniff"), ("X-Frame-Options", "DENY"),
                    ("Referrer-Policy", "no-referrer"), ("Cross-Origin-Opener-Policy", "same-origin"),
                    ("Cross-Origin-Resource-Policy", "same-origin")]


NO_FRAMES = "default-src 'none'; frame-ancestors 'none'"  # the Content-Security-Policy of all but the page


LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}


NO_TOKEN = "this page needs your own labelling link (it ends in ?token=...); ask whoever started the labelling"


# ---------------------------------------------------------------- who may label
def labeller_names(text):
    """--labellers alice,bob -> ["alice", "bob"]; a bad or repeated name stops."""
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if not NAME.fullmatch(n)]
    if bad or len(set(names)) != len(names):
        raise SailError(f"--labellers {text!r}: give distinct names of 1 to 40 letters, digits, '.', '_' or '-', "
                        f"separated by commas")
    return names


def labeller_tokens(folder, names):
    """name -> random token for each labeller, kept in <folder>/tokens.json (readable by its owner only) so that a
    restart keeps everyone's link; a name no longer listed loses its token. Delete the file for new links."""
    path = Path(folder) / TOKENS_FILE
    try:
        old = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, OSError) as err:
        raise SailError(f"{path}: unreadable ({err}); delete it to make new links for everyone") from None
    if not isinstance(old, dict) or not all(isinstance(t, str) for t in old.values()):
        raise SailError(f"{path}: expected an object of labeller names and tokens; delete it to make new links")
    tokens = {name: old.get(name) or secrets.token_urlsafe(24) for name in names}
    if tokens != old:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also where a leftover temporary file had other permissions
        with open(fd, "w") as f:
            json.dump(tokens, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return tokens


def is_loopback(host):
    try:
        return host in LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host):
    """The warning printed when the page listens beyond this machine; None on a loopback address."""
    if is_loopback(host):
        return None
    return (f"warning: listening on {host}: anyone who can reach this port can try it. Only the links below open "
            f"the page, and they travel unencrypted (plain HTTP): send each labeller their own link privately, and "
            f"prefer an SSH tunnel to a loopback address (docs/labelling.md, 'Opening the page to others')")


def allowed_hosts(host):
    """The Host names the server answers to: localhost and the bound address; listening on every interface, also
    this machine's names and any IP address (a web page can rebind a name it owns, never an IP address)."""
    names = LOOPBACK_NAMES | {host.lower().strip("[]")}
    wildcard = host in ("", "0.0.0.0", "::")
    if wildcard:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return names, wildcard


def host_name(value):
    """The name in a Host header without its port ('[::1]:8765' -> '::1'); '' when it cannot be read."""
    try:
        return urlsplit("//" + value).hostname or ""
    except ValueError:
        return ""


# ---------------------------------------------------------------- the routes
class App:
    """The WSGI application: every request passes the Host and Origin checks and names its labeller by a token (the
    page's cookie, set by its link, or an `Authorization: Bearer` header); refusals are 4xx JSON answers that wrote
    nothing, details of a server-side failure go to the log only."""

    def __init__(self, labelling, tokens, host):
        self.labelling, self.cookie = labelling, None  # the cookie's name holds the port, known once listening
        self.by_digest = {digest(token): name for name, token in tokens.items()}
        self.hosts, self.any_ip = allowed_hosts(host)

    def __call__(self, environ, start_response):
        try:
            status, kind, body, extra = self.route(environ)
        except Refused as err:
            status, kind, body, extra = as_json(err.args[0], dict(error=err.args[1]))
        except Exception:  # a fault of the server's own: logged in full, answered in general
            log.exception("%s %s failed", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            status, kind, body, extra = as_json(500, dict(error="the server failed on this request; nothing recorded"))
        headers = [("Content-Type", kind), ("Content-Length", str(len(body))),
                   ("Cache-Control", "private, max-age=3600" if kind == "image/png" else "no-store"),
                   ("Content-Security-Policy", page_policy(body) if kind.startswith("text/html") else NO_FRAMES),
                   *SECURITY_HEADERS, *extra]
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    def route(self, environ):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        self.check_host(environ)
        if method == "GET" and path == "/":
            return self.page(environ)
        name = self.labeller(environ)
        if method == "GET" and path.startswith("/images/"):
            return self.image(path[len("/images/"):])
        if method == "GET" and path == "/api/status":
            with self.labelling.lock:
                return as_json(200, self.labelling.progress(name))
        if path in ("/api/next", "/api/judge", "/api/undo"):
            if method != "POST":
                raise Refused(405, "use POST")
            return as_json(200, self.post(environ, path, name))
        raise Refused(404, "not found")

    def check_host(self, environ):
        """Only requests for this server's own names (no DNS rebinding) and, where a browser says which page sent
        them, from this server's own page; a link followed from elsewhere (a top-level GET) opens the page."""
        host = environ.get("HTTP_HOST", "")
        name = host_name(host)
        if not (name in self.hosts or self.any_ip and is_ip(name)):
            log.warning("refused a request for Host %r", host[:100])
            raise Refused(403, "this server answers only to its own address")
        origin, site = environ.get("HTTP_ORIGIN"), environ.get("HTTP_SEC_FETCH_SITE", "same-origin")
        followed = environ["REQUEST_METHOD"] == "GET" and environ.get("HTTP_SEC_FETCH_MODE") == "navigate"
        if origin is not None and origin != f"http://{host}" or site not in ("same-origin", "none") and not followed:
            log.warning("refused a request from the page of %r (%s)", (origin or "another site")[:100], site[:20])
            raise Refused(403, "requests from other sites' pages are refused")

    def labeller(self, environ):
        """The labeller whose token the request carries (cookie or Bearer header); 401 without a valid one."""
        given = environ.get("HTTP_AUTHORIZATION", "").removeprefix("Bearer ").strip()
        for part in environ.get("HTTP_COOKIE", "").split(";"):
            key, _, value = part.strip().partition("=")
            if key == self.cookie and not given:
                given = value
        name = self.by_digest.get(digest(given)) if given else None
        if name is None:
            raise Refused(401, NO_TOKEN)
        return name

    def page(self, environ):
        """The page; its link (/?token=...) stores the token in a cookie and sends the browser on to / (so the token
        leaves the address bar and the history)."""
        token = parse_qs(environ.get("QUERY_STRING", "")).get("token", [""])[0]
        if token:
            if digest(token) not in self.by_digest:
                raise Refused(401, "this link's token is not one of this server's (ask for a new link)")
            return 303, "text/plain", b"", [("Location", "/"),
                                            ("Set-Cookie", f"{self.cookie}={token}; Path=/; HttpOnly; SameSite=Lax")]
        name = self.labeller(environ)
        return 200, "text/html; charset=utf-8", PAGE.replace("__NAME__", json.dumps(name)).encode(), []

    def image(self, name):
        path = self.labelling.image_file(name)  # None: not a listed image inside the images folder
        try:
            if path is not None:
                return 200, "image/png", path.read_bytes(), []
        except OSError as err:
            log.warning("%s: not served: %s", path, err)
        raise Refused(404, "no such image")

    def post(self, environ, route, name):
        if environ.get("CONTENT_TYPE", "").split(";")[0].strip().lower() != "application/json":
            raise Refused(415, "expected Content-Type: application/json")  # so other sites' pages need a preflight
        size = int(environ.get("CONTENT_LENGTH") or 0)  # digits only: waitress refuses any other value
        if not 0 < size <= MAX_BODY:
            raise Refused(400, f"expected a JSON body of at most {MAX_BODY} bytes")
        try:
            body = json.loads(environ["wsgi.input"].read(size))
        except (ValueError, RecursionError):  # bad JSON, UTF-8 or an integer too long; nesting too deep
            raise Refused(400, "malformed JSON") from None
        need = ("pair", "choice") if route == "/api/judge" else ()
        if not isinstance(body, dict) or any(not isinstance(body.get(k), str) for k in need):
            raise Refused(400, "expected a JSON object" + (" with the string fields pair, choice" if need else ""))
        if body.get("name", name) != name:
            raise Refused(403, "a judgement is recorded under the labeller of your link; leave out 'name'")
        if route == "/api/judge" and body["choice"] not in CHOICES:
            raise Refused(400, f"expected a choice of {', '.join(CHOICES)}")
        try:
            if route == "/api/judge":
                return self.labelling.judge(name, body["pair"], body["choice"])
            return self.labelling.next_pair(name) if route == "/api/next" else self.labelling.undo(name)
        except OSError:  # the disk refused the line: it was cut back, nothing is recorded
            log.exception("%s by %s: the judgement file refused the write", route, name)
            raise Refused(500, "the judgement could not be saved and is not recorded; try again, or tell whoever "
                               "runs the server (its log says why)") from None


def as_json(status, obj):
    return status, "application/json", json.dumps(obj).encode(), []


def digest(token):
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


def is_ip(name):
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def page_policy(html):
    """The page's Content-Security-Policy: its own inline script and style (by hash), images and requests from this
    server, no framing, no plugins, no forms elsewhere."""
    def inline(tag):
        text = html.split(f"<{tag}>".encode())[1].split(f"</{tag}>".encode())[0]
        return "'sha256-%s'" % base64.b64encode(hashlib.sha256(text).digest()).decode()
    return (f"default-src 'none'; script-src {inline('script')}; style-src {inline('style')}; img-src 'self'; "
            f"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# ---------------------------------------------------------------- the server
class PageServer:
    """waitress on host:port serving App until stop(): silent connections closed after idle_timeout seconds, at most
    max_connections at once (and half the process's file descriptors), bodies of MAX_BODY bytes."""

    def __init__(self, labelling, tokens, host, port, idle_timeout=30, max_connections=64):
        self.map, self.stopping = {}, threading.Event()
        soft_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        cap = max(4, min(max_connections, soft_files // 2 if soft_files > 0 else max_connections))
        app = App(labelling, tokens, host)
        try:
            self.server = waitress.create_server(
                app, map=self.map, host=host, port=port, ident="", threads=8, channel_timeout=idle_timeout,
                cleanup_interval=max(1, idle_timeout // 2), connection_limit=cap, max_request_body_size=MAX_BODY,
                max_request_header_size=16384, asyncore_use_poll=True, expose_tracebacks=False)
        except OSError as err:
            raise SailError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from None
        listening = getattr(self.server, "effective_listen", None)  # a name with several addresses: several sockets
        host, port = listening[0] if listening else (self.server.effective_host, self.server.effective_port)
        app.cookie = f"sail-label-{port}"
        self.host, self.port = host, port

    def serve(self):
        """Answer requests until stop() (or Ctrl-C); then close every connection."""
        try:
            while not self.stopping.is_set():
                wasyncore.loop(timeout=0.5, map=self.map, use_poll=True, count=1)
            deadline = time.monotonic() + 10  # the answers under way (e.g. to the last judgement) still go out
            while time.monotonic() < deadline and any(getattr(channel, "requests", None) or getattr(
                    channel, "total_outbufs_len", 0) for channel in list(self.map.values())):
                wasyncore.loop(timeout=0.1, map=self.map, use_poll=True, count=1)
        finally:
            wasyncore.close_all(self.map)
            self.server.task_dispatcher.shutdown()

    def stop(self):
        self.stopping.set()

    def link(self, token):
        """The labeller's link: this address (this machine's name where it listens on every interface)."""
        shown = socket.getfqdn() if self.host in ("0.0.0.0", "::") else self.host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.port}/?token={token}"


def add_flags(parser):
    """The serving flags that tools/label.py and tools/spot_check.py share."""
    parser.add_argument("--labellers", default="labeller",
                        help="comma-separated names; each gets a link of their own, printed at the start")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: every network interface; see docs/labelling.md first)")
    parser.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    parser.add_argument("--idle-timeout", type=int, default=30, help="seconds a silent connection stays open")
    parser.add_argument("--max-connections", type=int, default=64, help="connections served at once")


def start(labelling, folder, args, what):
    """The server for args (the flags of add_flags), its links printed (never logged: the log may be shared) with the
    warning where it listens beyond this machine; tokens kept in <folder>/tokens.json."""
    if args.idle_timeout < 1 or args.max_connections < 1:
        raise SailError(f"need --idle-timeout and --max-connections of 1 or more (got {args.idle_timeout}, "
                        f"{args.max_connections})")
    tokens = labeller_tokens(folder, labeller_names(args.labellers))
    server = PageServer(labelling, tokens, args.host, args.port, args.idle_timeout, args.max_connections)
    warning = exposure_warning(args.host)
    if warning:
        log.warning("%s", warning)
    print(f"{what} links (each opens the page as its labeller: keep it private; {Path(folder) / TOKENS_FILE} "
          f"holds them):", flush=True)
    for name, token in tokens.items():
        print(f"  {name}: {server.link(token)}", flush=True)
    return server
