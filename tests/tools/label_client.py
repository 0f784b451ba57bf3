"""What the labelling tests share: a small labelling run with made-up candidates, and a client that speaks to the
page's server as its labellers (each with their own token), in a thread of the test or in a process of its own."""
import http.client
import json
import subprocess
import sys
import threading

from helpers import COLOURS, coloured_image

from sail import files, labelling
from tools import label, label_server


def write_prompts(path, n=14):
    path.write_text("\n".join(f"a picture of thing {i}" + ("\n" if i % 5 == 0 else "") for i in range(n)) + "\n")
    return path


def label_args(run, prompts, *extra):
    return label.build_parser().parse_args(["--run", str(run), "--prompts", str(prompts), "--preset", "tiny-sd15",
                                            "--label-prompts", "3", "--candidates", "3", "--pool-sizes", "4,5",
                                            "--target", "6", *extra])


def label_command(args, *extra):
    """The command that labels the run of label_args(...) args, on any free port."""
    return [sys.executable, "-m", "tools.label", "--run", str(args.run), "--prompts", str(args.prompts), "--preset",
            args.preset, "--label-prompts", str(args.label_prompts), "--candidates", str(args.candidates),
            "--pool-sizes", args.pool_sizes, "--port", "0", *extra]


def fake_candidates(folder, draw=None, candidates=3):
    """images/ and generations.jsonl as the kit's generation writes them; candidate k of every prompt has colour k."""
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for row in files.read_prompts(folder / "prompts.jsonl"):
        for k in range(candidates):
            image = f"images/{files.image_name(row['prompt_id'], k)}"
            (draw(row["prompt"], k) if draw else coloured_image(COLOURS[k], 32, seed=k)).save(folder / image)
            rows.append(dict(prompt_id=row["prompt_id"], prompt=row["prompt"], index=k, seed=k, image=image))
    files.write_jsonl_atomic(folder / "generations.jsonl", rows)


def judgement_lines(folder):
    path = folder / "judgements.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Client:
    """Requests to the page's server at url as one of the labellers of `tokens` (who=None: without a token)."""

    def __init__(self, url, tokens, server=None, thread=None):
        self.url, self.tokens, self.server, self.thread = url, tokens, server, thread
        self.port = int(url.rsplit(":", 1)[1])

    @classmethod
    def serve(cls, folder, labellers=("alice", "bob"), seed=0, target=6, **limits):
        """The server on 127.0.0.1 in a thread of this process, over the labelling run in folder."""
        tokens = label_server.labeller_tokens(folder, labellers)
        server = label_server.PageServer(labelling.Labelling(folder, seed, target), tokens, "127.0.0.1", 0, **limits)
        thread = threading.Thread(target=server.serve, daemon=True)
        thread.start()
        return cls(f"http://127.0.0.1:{server.port}", tokens, server, thread)

    def request(self, method, path, body=None, who="alice", headers=None, kind="application/json"):
        """(status, headers, body bytes) of one request; who names the labeller whose token it carries."""
        sent = {"Content-Type": kind} if body is not None else {}
        if who:
            sent["Authorization"] = f"Bearer {self.tokens[who]}"
        sent.update(headers or {})
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, data, sent)
            answer = conn.getresponse()
            return answer.status, answer.headers, answer.read()
        finally:
            conn.close()

    def post(self, route, body, who="alice", **kw):
        status, _, data = self.request("POST", route, body, who, **kw)
        return status, json.loads(data)

    def get(self, path, who="alice", **kw):
        return self.request("GET", path, None, who, **kw)

    def close(self):
        if self.server:
            self.server.stop()
            self.thread.join()


def start_page(command, banner):
    """A server process started with command, and a Client for the links it prints before the line starting with
    banner."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tokens, url, seen = {}, None, []
    for line in proc.stdout:
        seen.append(line)
        if "?token=" in line:
            name, link = line.split(": ", 1)
            url, token = link.strip().split("/?token=")
            tokens[name.strip()] = token
        if line.startswith(banner) and tokens:
            client = Client(url, tokens)
            client.output = seen  # the rest of its output, read on so that the pipe never fills
            threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
            return proc, client
    raise AssertionError(f"no links printed; exit status {proc.wait()}: {''.join(seen)}")

