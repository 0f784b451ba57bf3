"""tools/label.py: the prompt split, the labelling server (bad requests, reservations, undo, restart after a kill),
--finish's seed pairs and pools, the page in a real headless Chromium, and candidates drawn through 01_generate.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from helpers import COLOURS, coloured_image
from PIL import Image

from sail import files, labelling
from sail.common import SailError
from tools import label, label_server

ROOT = Path(__file__).resolve().parents[2]


def write_prompts(path, n=14):
    path.write_text("\n".join(f"a picture of thing {i}" + ("\n" if i % 5 == 0 else "") for i in range(n)) + "\n")
    return path


def label_args(run, prompts, *extra):
    return label.build_parser().parse_args(["--run", str(run), "--prompts", str(prompts), "--preset", "tiny-sd15",
                                            "--label-prompts", "3", "--candidates", "3", "--pool-sizes", "4,5",
                                            "--target", "6", *extra])


def fake_candidates(folder, draw=None):
    """images/ and generations.jsonl as 01_generate.py writes them; candidate k of every prompt has colour k."""
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for row in files.read_prompts(folder / "prompts.jsonl"):
        for k in range(3):
            image = f"images/{files.image_name(row['prompt_id'], k)}"
            (draw(row["prompt"], k) if draw else coloured_image(COLOURS[k], 32, seed=k)).save(folder / image)
            rows.append(dict(prompt_id=row["prompt_id"], prompt=row["prompt"], index=k, seed=k, image=image))
    files.write_jsonl_atomic(folder / "generations.jsonl", rows)


@pytest.fixture
def run(tmp_path):
    args = label_args(tmp_path / "run", write_prompts(tmp_path / "prompts.txt"))
    fake_candidates(label.prepare(args))
    return args


class Client:
    def __init__(self, folder, seed=0, target=6):
        self.server = label_server.make_server(labelling.Labelling(folder, seed, target), "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def post(self, route, body, kind="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        try:
            request = urllib.request.Request(self.url + route, data=data, headers={"Content-Type": kind}, method="POST")
            with urllib.request.urlopen(request) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def start_page(command, banner):
    """A server process started with command, and a Client for the address it prints on the line starting with banner."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith(banner):
            client = Client.__new__(Client)
            client.url = next(word for word in line.split() if word.startswith("http://")).split("/?")[0]
            return proc, client
    raise AssertionError(f"no address printed; exit status {proc.wait()}")


def judgement_lines(folder):
    path = folder / "judgements.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []



def test_prompt_file_and_split(tmp_path):
    rows = label.read_prompt_file(write_prompts(tmp_path / "p.txt"))
    assert [r["prompt_id"] for r in rows[:3]] == ["p0001", "p0002", "p0003"] and len(rows) == 14
    (tmp_path / "dup.txt").write_text("a cat\n\nA  Cat\n")
    with pytest.raises(SailError, match=r"dup.txt:3: duplicate prompt \(first on line 1\)"):
        label.read_prompt_file(tmp_path / "dup.txt")
    (tmp_path / "p.jsonl").write_text('{"prompt_id": "x", "prompt": "a dog"}\n{"prompt_id": "y", "prompt": "A dog "}\n')
    with pytest.raises(SailError, match=r"p.jsonl:2: duplicate prompt"):
        label.read_prompt_file(tmp_path / "p.jsonl")
    first, pools = label.split_prompts(rows, 3, [4, 5], 0, set())
    again = label.split_prompts(rows[::-1], 3, [4, 5], 0, set())
    assert [r["prompt_id"] for r in first] == [r["prompt_id"] for r in again[0]]  # seeded, not file order
    assert len({r["prompt"] for r in first + pools}) == 12
    kept_out = pools[0]["prompt"]  # as if it were an evaluation prompt: it stays out of the pools
    without = label.split_prompts(rows, 3, [4, 5], 0, {files.normalise_prompt(kept_out)})[1]
    assert len(without) == 9 and kept_out not in [r["prompt"] for r in without]
    assert first != label.split_prompts(rows, 3, [4, 5], 1, set())[0]
    with pytest.raises(SailError, match="need 15 prompts; the file has 14"):
        label.split_prompts(rows, 5, [5, 5], 0, set())


def test_pace():
    assert labelling.pace([0.0]) is None and labelling.pace([0, 2, 4, 200, 203]) == 2  # the 196 s pause left out
    assert labelling.pace(list(range(0, 300, 3)) + [310, 311]) == 3


def test_settings_recorded(run, tmp_path):
    with pytest.raises(SailError, match="candidates = 3.*candidates = 4"):
        label.prepare(label_args(run.run, run.prompts, "--candidates", "4"))


def test_bad_requests_write_nothing(run):
    folder, client = run.run / "label", Client(run.run / "label")
    try:
        status, first = client.post("/api/next", {"name": "alice"})
        assert status == 200 and first["pair"]["prompt_id"] and first["progress"]["pairs"] == 9
        pid = first["pair"]["id"]
        bad = [(b"{not json", 400, "malformed JSON"), (b"[1, 2]", 400, "JSON object"),
               ({"name": "alice", "pair": pid}, 400, "choice"), ({"pair": pid, "choice": "a"}, 400, "name"),
               ({"name": "alice", "pair": pid, "choice": "left"}, 400, "choice 'left'"),
               ({"name": "al ice", "pair": pid, "choice": "a"}, 400, "name 'al ice'"),
               ({"name": "alice", "pair": "nope/0-1", "choice": "a"}, 404, "unknown pair"),
               ({"name": "alice", "pair": 3, "choice": "a"}, 400, "pair")]
        for body, status, message in bad:
            got = client.post("/api/judge", body)
            assert got[0] == status and message in got[1]["error"], (body, got)
        assert client.post("/api/judge", json.dumps({"name": "alice", "pair": pid, "choice": "a"}).encode(),
                           "text/plain")[0] == 415  # what another site's page could send without asking
        assert client.post("/api/undo", {"name": "alice"})[0] == 409
        assert client.post("/api/nope", {"name": "alice"})[0] == 404
        assert judgement_lines(folder) == []
        status, second = client.post("/api/next", {"name": "bob"})
        assert second["pair"]["id"] != pid  # never the pair alice holds
        assert client.post("/api/judge", {"name": "bob", "pair": pid, "choice": "a"})[0] == 409
        assert client.post("/api/next", {"name": "alice"})[1]["pair"]["id"] == pid  # a reload: the same pair
        assert client.post("/api/judge", {"name": "alice", "pair": pid, "choice": "a"})[0] == 200
        assert client.post("/api/judge", {"name": "alice", "pair": pid, "choice": "b"})[0] == 409  # double submit
        assert client.post("/api/judge", {"name": "bob", "pair": pid, "choice": "b"})[0] == 409
        lines = judgement_lines(folder)
        assert len(lines) == 1 and lines[0]["choice"] == "a" and lines[0]["labeller"] == "alice"
        assert {"prompt_id", "prompt", "image_a", "image_b", "time"} <= set(lines[0])
    finally:
        client.close()


def test_order_covers_prompts_first(run):
    pairs = labelling.Labelling(run.run / "label", 0, 6).pairs
    assert len({p["prompt_id"] for p in pairs[:3]}) == 3 and len({p["id"] for p in pairs}) == 9
    assert {p["image_a"] < p["image_b"] for p in pairs} == {True, False}  # sides shuffled


def test_undo_restart_and_finish(run):
    folder = run.run / "label"
    client = Client(folder)
    done = []
    try:
        answer = client.post("/api/next", {"name": "alice"})[1]
        for choice in ("a", "b", "tie", "skip", "a"):
            done.append((answer["pair"], choice))
            answer = client.post("/api/judge", {"name": "alice", "pair": answer["pair"]["id"], "choice": choice})[1]
        undone = client.post("/api/undo", {"name": "alice"})[1]
        assert undone["pair"] == done[-1][0] and undone["progress"]["done"] == 3
        assert client.post("/api/next", {"name": "bob"})[1]["pair"] != undone["pair"]  # held for alice again
        answer = client.post("/api/judge", {"name": "alice", "pair": undone["pair"]["id"], "choice": "b"})[1]
        done[-1] = (done[-1][0], "b")
        held = answer["pair"]["id"]
    finally:
        client.close()  # a stop with nothing to save: every answer came after its line was fsynced
    with open(folder / "judgements.jsonl", "a") as f:
        f.write('{"id": "j9", "pair": "cut by a ki')  # a line cut by a kill
    client = Client(folder)
    try:
        status = json.loads(urllib.request.urlopen(client.url + "/api/status?name=alice").read())
        assert status["done"] == 4 and status["skips"] == 1 and status["yours"] == 5 and status["left"] == 4
        answer = client.post("/api/next", {"name": "alice"})[1]
        assert answer["pair"]["id"] not in {p["id"] for p, _ in done}
        assert client.post("/api/undo", {"name": "alice"})[1]["pair"] == done[-1][0]  # undo reaches back over the restart
        client.post("/api/judge", {"name": "alice", "pair": done[-1][0]["id"], "choice": "b"})
        assert held  # held pairs are not persisted: after a restart the first free pair is handed out again
    finally:
        client.close()
    lines = judgement_lines(folder)
    assert [r.get("choice", "undo") for r in lines] == ["a", "b", "tie", "skip", "a", "undo", "b", "undo", "b"]
    label.main(label.build_parser().parse_args(["--run", str(run.run), "--finish"]))
    pairs = files.read_pairs(files.seed_pairs_path(run.run))
    wanted = [(p, c) for p, c in done if c in "ab"]
    assert len(pairs) == 3 and all(r["source"] == "human" for r in pairs)
    for row, (pair, choice) in zip(pairs, wanted):
        assert row["prompt_id"] == pair["prompt_id"] and row["_image_w"] == (folder / pair["image_" + choice]).resolve()
        assert row["image_w"].startswith("../label/images/")
    pools = [files.read_prompts(files.pool_path(run.run, i)) for i in (1, 2)]
    assert [len(p) for p in pools] == [4, 5]
    files.check_pools_disjoint(run.run)
    labelled = {r["prompt"] for r in files.read_prompts(folder / "prompts.jsonl")}
    assert not labelled & {r["prompt"] for p in pools for r in p}
    stats = json.loads((run.run / "seed/stats.json").read_text())
    assert (stats["pairs"], stats["undone"], stats["tie"], stats["skip"]) == (3, 2, 1, 1)
    label.finish(run)  # the same judgements again: nothing to change
    client = Client(folder)
    try:
        answer = client.post("/api/next", {"name": "bob"})[1]
        client.post("/api/judge", {"name": "bob", "pair": answer["pair"]["id"], "choice": "a"})
    finally:
        client.close()
    before = files.seed_pairs_path(run.run).read_bytes()
    with pytest.raises(SailError, match="exists and differs.*not overwriting"):
        label.finish(run)
    assert files.seed_pairs_path(run.run).read_bytes() == before


def test_killed_server_continues(run):
    """A real process, killed with SIGKILL between two judgements, then started again with the same command."""
    command = [sys.executable, "-m", "tools.label", "--run", str(run.run), "--prompts", str(run.prompts), "--preset",
               "tiny-sd15", "--label-prompts", "3", "--candidates", "3", "--pool-sizes", "4,5", "--port", "0"]

    proc, client = start_page(command, "labelling page: ")
    try:
        answer = client.post("/api/next", {"name": "dora"})[1]
        first = client.post("/api/judge", {"name": "dora", "pair": answer["pair"]["id"], "choice": "b"})[1]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc, client = start_page(command, "labelling page: ")
    try:
        again = client.post("/api/next", {"name": "dora"})[1]
        assert again["progress"]["done"] == 1 and again["pair"]["id"] not in (answer["pair"]["id"], None)
        assert again["pair"]["id"] == first["pair"]["id"]  # the same order after the restart
    finally:
        proc.terminate()
        proc.wait()
    assert [r["choice"] for r in judgement_lines(run.run / "label")] == ["b"]


def toy_picture(prompt, k):
    """Candidates as the toy world draws them, for a page that looks like the toy preset's."""
    from toy import world
    attrs = world.parse_caption(prompt)
    return Image.fromarray(world.render_web(np.random.default_rng(101 * k + 3), attrs)[0])


def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    binary, driver = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(binary).is_file() and Path(driver).is_file()):
        pytest.skip("chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_page_in_a_browser(tmp_path):
    from toy.world import all_captions
    driver = browser()  # skips the test where selenium or chromium is missing
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    prompts = tmp_path / "toy_prompts.txt"
    prompts.write_text("\n".join(all_captions()[::37]) + "\n")
    args = label_args(tmp_path / "run", prompts, "--target", "8")
    folder = label.prepare(args)
    fake_candidates(folder, toy_picture)
    client = Client(folder, target=8)
    lines = lambda: judgement_lines(folder)  # noqa: E731

    def shown():  # the pair on the page once both images have loaded
        WebDriverWait(driver, 10).until(lambda d: d.execute_script(
            "return pair && $('ia').complete && $('ia').naturalWidth > 0 && $('ib').complete && !busy"))
        return driver.execute_script("return pair")

    def act(do, count):
        do()
        WebDriverWait(driver, 10).until(lambda d: len(lines()) == count)
        return shown()

    try:
        driver.get(client.url + "/?name=erin")
        first = shown()
        assert driver.find_element(By.ID, "prompt").text == first["prompt"]
        assert driver.find_element(By.ID, "who").text == "erin"
        body = driver.find_element(By.TAG_NAME, "body")
        driver.find_element(By.ID, "ia").click()  # the left image alone, full size
        assert driver.find_element(By.ID, "zoom").is_displayed()
        body.send_keys(Keys.ESCAPE)
        assert not driver.find_element(By.ID, "zoom").is_displayed()
        act(lambda: driver.find_element(By.CSS_SELECTOR, "button[data-c=a]").click(), 1)
        act(lambda: body.send_keys(Keys.ARROW_RIGHT), 2)
        act(lambda: body.send_keys("1"), 3)
        act(lambda: body.send_keys("t"), 4)
        skipped = act(lambda: body.send_keys("s"), 5)
        back = act(lambda: body.send_keys("u"), 6)
        assert back["id"] == lines()[4]["pair"] and back != skipped
        driver.refresh()
        assert shown()["id"] == back["id"]  # a reload shows the pair the labeller holds
        body = driver.find_element(By.TAG_NAME, "body")
        act(lambda: body.send_keys(Keys.ARROW_DOWN), 7)
        act(lambda: body.send_keys("2"), 8)
        act(lambda: driver.find_element(By.CSS_SELECTOR, "button[data-c=b]").click(), 9)
        assert "7 / 8 pairs" in driver.find_element(By.ID, "stats").text
        body.send_keys("z")
        if os.environ.get("SAIL_SCREENSHOT"):
            body.send_keys(Keys.ESCAPE)
            driver.save_screenshot(str(ROOT / "docs" / "label_page.png"))
    finally:
        driver.quit()
        client.close()
    assert [r.get("choice", "undo") for r in lines()] == ["a", "b", "a", "tie", "skip", "undo", "tie", "b", "b"]
    assert {r["labeller"] for r in lines()} == {"erin"}
    label.finish(args)
    pairs = files.read_pairs(files.seed_pairs_path(args.run))
    kept = [r for r in lines() if r.get("choice") in ("a", "b")]
    assert [p["_image_w"].name for p in pairs] == [Path(r["image_" + r["choice"]]).name for r in kept]


def test_candidates_through_01_generate(tmp_path):
    """The real path on the tiny SD1.5 model: 01_generate.py's main draws the candidates into label/."""
    args = label_args(tmp_path / "run", write_prompts(tmp_path / "prompts.txt"))
    folder = label.prepare(args)
    label.generate(args, folder)
    rows = files.read_jsonl(folder / "generations.jsonl")
    assert len(rows) == 9 and json.loads((folder / "generate.settings.json").read_text())["model"] == "tiny-sd15"
    assert all(Image.open(folder / r["image"]).size == (32, 32) for r in rows)
    assert len(labelling.Labelling(folder, 0, 6).pairs) == 9
