"""tools/label_server.py and sail/labelling.py against an attacker and a careless user: a test per way the page
could be misused (a torn judgement file, no login, DNS rebinding, pairs hoarded, silent connections, malformed
requests, talkative errors, linked images, missing headers), and a bounded load test of several labellers with a
SIGKILL mid-burst, all on 127.0.0.1."""
import http.client
import json
import os
import resource
import signal
import socket
import stat
import struct
import threading
import time

import pytest
from label_client import Client, fake_candidates, judgement_lines, label_args, label_command, start_page, write_prompts

from sail import labelling
from sail.common import SailError
from tools import label, label_server

HEADERS = {"X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@pytest.fixture
def run(tmp_path):
    args = label_args(tmp_path / "run", write_prompts(tmp_path / "prompts.txt"))
    fake_candidates(label.prepare(args))
    return args


@pytest.fixture
def client(run):
    client = Client.serve(run.run / "label", labellers=("alice", "bob"))
    yield client
    client.close()


def raw(port, data, timeout=30):
    """The status line's code of the answer to bytes sent as they are, or None when the server sent none."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = sock.recv(200)
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else None


def image_of(folder):
    return sorted((folder / "images").iterdir())[0].name


def test_a_failed_write_is_cut_back(run):
    """A judgement whose write stops part-way (the file-size limit) answers 500 and leaves the file as it was, also
    on a retry; once the disk takes it again a 200 means the line is there, whole, and a restart and --finish read
    every line."""
    folder = run.run / "label"
    path = folder / "judgements.jsonl"
    proc, client = start_page(label_command(run), "labelling page: ")
    try:
        pair = client.post("/api/next", {}, who="labeller")[1]["pair"]
        second = client.post("/api/judge", {"pair": pair["id"], "choice": "a"}, who="labeller")[1]["pair"]
        before = path.read_bytes()
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (len(before) + 40, resource.RLIM_INFINITY))
        for _ in range(2):
            status, answer = client.post("/api/judge", {"pair": second["id"], "choice": "b"}, who="labeller")
            assert path.read_bytes() == before
            assert status == 500 and "not recorded" in answer["error"] and str(folder) not in answer["error"]
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        assert client.post("/api/judge", {"pair": second["id"], "choice": "b"}, who="labeller")[0] == 200
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [r["choice"] for r in judgement_lines(folder)] == ["a", "b"]
    assert len(labelling.Labelling(folder, 0, 6).active) == 2
    label.main(label.build_parser().parse_args(["--run", str(run.run), "--finish"]))


def test_a_torn_file_is_never_appended_to(run, caplog):
    """A file that does not end in a newline (a line cut short behind the server's back) takes no judgement; a start
    cuts the unfinished line and says what it dropped."""
    folder = run.run / "label"
    state = labelling.Labelling(folder, 0, 6)
    first = state.next_pair("alice")["pair"]["id"]
    state.judge("alice", first, "a")
    with open(folder / "judgements.jsonl", "a") as f:
        f.write('{"id": "j2", "pair": "cut sh')
    torn = (folder / "judgements.jsonl").read_bytes()
    with pytest.raises(OSError, match="not appending"):
        state.judge("alice", state.next_pair("alice")["pair"]["id"], "b")
    assert (folder / "judgements.jsonl").read_bytes() == torn and len(state.active) == 1
    state = labelling.Labelling(folder, 0, 6)
    assert "line 2 is unfinished" in caplog.text and "cut sh" in caplog.text
    state.judge("alice", state.next_pair("alice")["pair"]["id"], "b")
    assert [r["choice"] for r in judgement_lines(folder)] == ["a", "b"]


def test_every_route_needs_the_labellers_token(client, run):
    """No token, no page, images, progress or judgements; a judgement is its token's labeller's whatever the request
    says, and undo takes back only one's own."""
    folder = run.run / "label"
    pid = client.post("/api/next", {})[1]["pair"]["id"]
    routes = [("GET", "/", None), ("GET", "/api/status", None), ("GET", "/images/" + image_of(folder), None),
              ("POST", "/api/next", {}), ("POST", "/api/judge", {"pair": pid, "choice": "a"}), ("POST", "/api/undo", {})]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer not-a-token"}, {"Cookie": f"sail-label-{client.port}=nope"}):
            status, _, data = client.request(method, path, body, who=None, headers=headers)
            assert status == 401 and b"?token=" in data, (method, path, headers)
    assert client.get("/?token=not-a-token", who=None)[0] == 401
    status, headers, _ = client.get("/?token=" + client.tokens["alice"], who=None)  # alice's link
    cookie = headers["Set-Cookie"]
    assert status == 303 and headers["Location"] == "/" and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    session = {"Cookie": cookie.split(";")[0]}
    status, _, page = client.get("/", who=None, headers=session)
    assert status == 200 and b'const NAME="alice"' in page
    assert client.post("/api/judge", {"name": "bob", "pair": pid, "choice": "a"})[0] == 403  # not bob's token
    assert client.post("/api/judge", {"pair": pid, "choice": "a"}, who=None, headers=session)[0] == 200
    assert client.post("/api/undo", {}, who="bob")[0] == 409  # bob has nothing of his own to undo
    assert [(r["labeller"], r["choice"]) for r in judgement_lines(folder)] == [("alice", "a")]
    assert stat.S_IMODE((folder / "tokens.json").stat().st_mode) == 0o600
    assert label_server.labeller_tokens(folder, ["alice", "bob"]) == client.tokens  # the links survive a restart
    assert label_server.labeller_tokens(folder, ["alice"]) == {"alice": client.tokens["alice"]}  # bob's is revoked
    (folder / "tokens.json").write_text('{"alice": "abc"')
    with pytest.raises(SailError, match=r"tokens.json: unreadable .*delete it"):
        label_server.labeller_tokens(folder, ["alice"])
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert label_server.exposure_warning(host) is None
    for host in ("0.0.0.0", "::", "192.168.1.20", "lab-machine.example"):
        assert "warning" in label_server.exposure_warning(host) and "SSH tunnel" in label_server.exposure_warning(host)


def test_host_and_origin_are_checked(client, run):
    """A request for another name (DNS rebinding) or from another site's page is refused and writes nothing."""
    pid = client.post("/api/next", {})[1]["pair"]["id"]
    for headers in ({"Host": "rebind.evil.example"}, {"Host": f"rebind.evil.example:{client.port}"},
                    {"Host": f"192.168.1.20:{client.port}"}, {"Origin": "http://evil.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{client.port}"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"}):  # same-site: a page of this machine on another port
        for method, path, body in (("POST", "/api/judge", {"pair": pid, "choice": "a"}), ("GET", "/api/status", None),
                                   ("GET", "/", None), ("POST", "/api/undo", {})):
            assert client.request(method, path, body, headers=headers)[0] == 403, (headers, path)
    assert judgement_lines(run.run / "label") == []
    for host in (f"127.0.0.1:{client.port}", f"localhost:{client.port}", "localhost:9999"):  # 9999: an SSH tunnel's
        assert client.get("/api/status", headers={"Host": host})[0] == 200
    same = {"Origin": f"http://127.0.0.1:{client.port}", "Sec-Fetch-Site": "same-origin"}
    assert client.post("/api/judge", {"pair": pid, "choice": "a"}, headers=same)[0] == 200
    followed = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}  # a link clicked in a web mail
    assert client.get("/?token=" + client.tokens["bob"], who=None, headers=followed)[0] == 303
    assert client.request("POST", "/api/next", {}, who="bob", headers=followed)[0] == 403
    names, any_ip = label_server.allowed_hosts("0.0.0.0")
    assert any_ip and socket.gethostname().lower() in names and not label_server.allowed_hosts("127.0.0.1")[1]


def test_a_labeller_holds_one_pair(client, run):
    """Made-up names hold nothing (no token), and a labeller asking again and again holds one pair: every other
    pair stays free for the others."""
    for i in range(230):
        assert client.post("/api/next", {"name": f"made-up-{i}"}, who=None)[0] == 401
    held = {client.post("/api/next", {})[1]["pair"]["id"] for _ in range(30)}
    assert len(held) == 1
    answer, judged = client.post("/api/next", {}, who="bob")[1], []
    while answer["pair"]:
        judged.append(answer["pair"]["id"])
        answer = client.post("/api/judge", {"pair": judged[-1], "choice": "tie"}, who="bob")[1]
    assert len(judged) == 8 and held.isdisjoint(judged) and answer["progress"]["left"] == 1


def test_silent_connections_are_closed_and_capped(run):
    """125 connections that never send a byte, against a limit of 128 file descriptors: the server keeps to its
    connection cap, closes each after --idle-timeout, and answers a labeller."""
    proc, client = start_page(label_command(run, "--idle-timeout", "1", "--max-connections", "48"), "labelling page: ")
    silent, files_open, watching = [], [], threading.Event()

    def watch():  # the server's open file descriptors, counted while the connections come and go
        while not watching.is_set():
            files_open.append(len(os.listdir(f"/proc/{proc.pid}/fd")))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        watcher.start()
        silent = [socket.create_connection(("127.0.0.1", client.port), timeout=60) for _ in range(125)]
        assert client.get("/api/status", who="labeller")[0] == 200
        assert all(sock.recv(1) == b"" for sock in silent)  # closed by the server, not left open
        assert client.get("/api/status", who="labeller")[0] == 200
    finally:
        watching.set()
        for sock in silent:
            sock.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 48 <= max(files_open) < 48 + 20  # the cap reached, and kept to


def test_malformed_requests_get_a_4xx(client, run):
    """Deep nesting, huge integers, a non-ASCII Content-Length, an oversized body, a listed image that is missing or
    a folder: each answered 4xx, nothing written, the server serving on."""
    folder, auth = run.run / "label", f"Authorization: Bearer {client.tokens['alice']}\r\n".encode()
    pid = client.post("/api/next", {})[1]["pair"]["id"]
    for body in (b"[" * 30000 + b"]" * 30000, b'{"pair": ' + b"1" * 5000 + b', "choice": "a"}', b'{"pair": "\xff"}',
                 json.dumps({"pair": pid, "choice": "a", "x": [[[[]]]] * 10}).encode()[:-1]):
        assert client.post("/api/judge", body)[0] == 400
    assert client.request("POST", "/api/judge", b'{"pair": "' + b"x" * 70000 + b'"}')[0] in (400, 413)
    for length in ("\u0661\u0662".encode(), b"-5", b"1e3", b"12, 12"):
        request = b"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" + auth
        assert raw(client.port, request + b"Content-Length: " + length + b"\r\n\r\n{}") == 400
    images = sorted((folder / "images").iterdir())
    images[0].unlink()
    images[1].unlink()
    images[1].mkdir()
    for image in images[:2]:
        assert client.get("/images/" + image.name)[0] == 404
    assert client.get("/images/" + images[2].name)[0] == 200
    assert judgement_lines(folder) == [] and client.get("/api/status")[0] == 200


def test_answers_name_no_one_and_no_path(client, run, caplog):
    """Refusals say what is wrong, not who else labels nor where the files are; a client that drops its connection
    is no error of the server's."""
    folder, answers = run.run / "label", []
    pid = client.post("/api/next", {})[1]["pair"]["id"]
    answers.append(client.post("/api/judge", {"pair": pid, "choice": "a"}, who="bob"))  # held by alice
    client.post("/api/judge", {"pair": pid, "choice": "a"})
    answers.append(client.post("/api/judge", {"pair": pid, "choice": "b"}, who="bob"))  # judged by alice
    answers += [client.post("/api/undo", {}, who="bob"), client.post(f"/api/{folder}", {})]
    assert [status for status, _ in answers] == [409, 409, 409, 404]
    for _, answer in answers:
        assert "alice" not in answer["error"] and str(folder) not in answer["error"] and "/" not in answer["error"]
    request = (f"POST /api/next HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {client.tokens['bob']}\r\n"
               f"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}").encode()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", client.port)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close at once, with a reset
            sock.sendall(request)
    assert client.get("/api/status", who="bob")[0] == 200
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def test_images_only_from_the_images_folder(client, run, tmp_path):
    """A listed image that is a link to a file elsewhere is not served; the others are, byte for byte."""
    folder = run.run / "label"
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG not for the page")
    linked, kept = sorted((folder / "images").iterdir())[:2]
    linked.unlink()
    linked.symlink_to(secret)
    status, _, data = client.get("/images/" + linked.name)
    assert status == 404 and b"not for the page" not in data
    status, headers, data = client.get("/images/" + kept.name)
    assert status == 200 and data == kept.read_bytes() and headers["Content-Type"] == "image/png"
    for path in ("/images/../tokens.json", "/images/%2e%2e/tokens.json", "/images/" + str(secret), "/tokens.json"):
        assert client.get(path)[0] == 404


def test_security_headers_on_every_answer(client, run):
    """Every answer forbids framing and sniffing and names no server software; the page runs only its own script."""
    pid = client.post("/api/next", {})[1]["pair"]["id"]
    answers = [client.get("/"), client.get("/?token=" + client.tokens["alice"], who=None), client.get("/", who=None),
               client.get("/images/" + image_of(run.run / "label")), client.get("/api/status"), client.get("/nope"),
               client.get("/api/next"), client.request("POST", "/api/next", b"{}", kind="text/plain"),
               client.request("POST", "/api/judge", {"pair": pid}),
               client.request("POST", "/api/judge", {"pair": pid, "choice": "a"}, who="bob"),
               client.request("GET", "/api/status", headers={"Host": "evil.example"})]
    for status, headers, _ in answers:
        assert {k: headers.get(k) for k in HEADERS} == HEADERS, status
        assert "frame-ancestors 'none'" in headers["Content-Security-Policy"] and "Server" not in headers, status
    assert sorted({status for status, _, _ in answers}) == [200, 303, 400, 401, 403, 404, 405, 409, 415]
    policy = answers[0][1]["Content-Security-Policy"]
    assert "script-src 'sha256-" in policy and "unsafe" not in policy


def test_labellers_in_a_burst_with_a_kill(tmp_path):
    """A bounded load test: 5 labellers, each with their own token, 8 judgements each, the server SIGKILLed after 15
    accepted ones and started again. Every accepted judgement is on disk once, under its labeller, with its choice;
    nothing else is but what was sent when the server died."""
    args = label_args(tmp_path / "run", write_prompts(tmp_path / "prompts.txt", 30), "--label-prompts", "10",
                      "--candidates", "4")
    folder = label.prepare(args)
    fake_candidates(folder, candidates=4)
    names, per, kill_after = [f"l{i}" for i in range(5)], 8, 15
    command = label_command(args, "--labellers", ",".join(names))
    proc, current = start_page(command, "labelling page: ")
    accepted, sent, lock, restarted = [], [], threading.Lock(), threading.Event()

    def labeller(name):
        deadline, k = time.monotonic() + 120, 0
        while len([a for a in accepted if a[0] == name]) < per and time.monotonic() < deadline:
            client = current
            try:
                pair = client.post("/api/next", {}, who=name)[1]["pair"]
                if pair is None:
                    return
                choice, k = ("a", "b", "tie", "skip")[k % 4], k + 1
                with lock:
                    sent.append((name, pair["id"], choice))
                if client.post("/api/judge", {"pair": pair["id"], "choice": choice}, who=name)[0] == 200:
                    with lock:
                        accepted.append((name, pair["id"], choice))
            except (OSError, http.client.HTTPException):  # the server was killed: wait for it to come back
                restarted.wait(60)

    threads = [threading.Thread(target=labeller, args=(name,), daemon=True) for name in names]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        while len(accepted) < kill_after and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc, current = start_page(command, "labelling page: ")
        restarted.set()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = [(r["labeller"], r["pair"], r["choice"]) for r in judgement_lines(folder)]
    assert len(accepted) == len(names) * per and len(lines) == len(set(r[1] for r in lines))
    assert sorted(set(lines) & set(accepted)) == sorted(accepted)  # nothing accepted is lost
    assert set(lines) <= set(sent) and len(lines) - len(accepted) <= len(names)  # nothing under another labeller
    assert len(labelling.Labelling(folder, 0, 6).active) == len(lines)
