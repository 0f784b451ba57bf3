"""tools/label.py: the prompt split, the labelling server's routes (bad requests, reservations, undo, restart after
a kill), --finish's seed pairs and pools, the page in a real headless Chromium, and the candidates drawn by the
library in a child process, equal to 01_generate.py's. The server's defences are tests/tools/test_label_server.py."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_stage
from label_client import Client, fake_candidates, judgement_lines, label_args, label_command, start_page, write_prompts
from PIL import Image

from sail import files, labelling
from sail.common import SailError
from tools import label

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run(tmp_path):
    args = label_args(tmp_path / "run", write_prompts(tmp_path / "prompts.txt"))
    fake_candidates(label.prepare(args))
    return args


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
    folder, client = run.run / "label", Client.serve(run.run / "label")
    try:
        status, first = client.post("/api/next", {})
        assert status == 200 and first["pair"]["prompt_id"] and first["progress"]["pairs"] == 9
        pid = first["pair"]["id"]
        bad = [(b"{not json", 400, "malformed JSON"), (b"[1, 2]", 400, "JSON object"),
               ({"pair": pid}, 400, "choice"), ({"choice": "a"}, 400, "pair"),
               ({"pair": pid, "choice": "left"}, 400, "expected a choice"),
               ({"pair": "nope/0-1", "choice": "a"}, 404, "unknown pair"), ({"pair": 3, "choice": "a"}, 400, "pair")]
        for body, status, message in bad:
            got = client.post("/api/judge", body)
            assert got[0] == status and message in got[1]["error"], (body, got)
        assert client.post("/api/judge", json.dumps({"pair": pid, "choice": "a"}).encode(),
                           kind="text/plain")[0] == 415  # what another site's page could send without asking
        assert client.post("/api/undo", {})[0] == 409
        assert client.post("/api/nope", {})[0] == 404
        assert client.get("/api/judge")[0] == 405
        assert judgement_lines(folder) == []
        status, second = client.post("/api/next", {}, who="bob")
        assert second["pair"]["id"] != pid  # never the pair alice holds
        assert client.post("/api/judge", {"pair": pid, "choice": "a"}, who="bob")[0] == 409
        assert client.post("/api/next", {})[1]["pair"]["id"] == pid  # a reload: the same pair
        assert client.post("/api/judge", {"pair": pid, "choice": "a"})[0] == 200
        assert client.post("/api/judge", {"pair": pid, "choice": "b"})[0] == 409  # double submit
        assert client.post("/api/judge", {"pair": pid, "choice": "b"}, who="bob")[0] == 409
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
    client = Client.serve(folder)
    done = []
    try:
        answer = client.post("/api/next", {})[1]
        for choice in ("a", "b", "tie", "skip", "a"):
            done.append((answer["pair"], choice))
            answer = client.post("/api/judge", {"pair": answer["pair"]["id"], "choice": choice})[1]
        undone = client.post("/api/undo", {})[1]
        assert undone["pair"] == done[-1][0] and undone["progress"]["done"] == 3
        assert client.post("/api/next", {}, who="bob")[1]["pair"] != undone["pair"]  # held for alice again
        answer = client.post("/api/judge", {"pair": undone["pair"]["id"], "choice": "b"})[1]
        done[-1] = (done[-1][0], "b")
        held = answer["pair"]["id"]
    finally:
        client.close()  # a stop with nothing to save: every answer came after its line was fsynced
    with open(folder / "judgements.jsonl", "a") as f:
        f.write('{"id": "j9", "pair": "cut by a ki')  # a line cut by a kill
    client = Client.serve(folder)
    try:
        status = json.loads(client.get("/api/status")[2])
        assert status["done"] == 4 and status["skips"] == 1 and status["yours"] == 5 and status["left"] == 4
        answer = client.post("/api/next", {})[1]
        assert answer["pair"]["id"] not in {p["id"] for p, _ in done}
        assert client.post("/api/undo", {})[1]["pair"] == done[-1][0]  # undo reaches back over the restart
        client.post("/api/judge", {"pair": done[-1][0]["id"], "choice": "b"})
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
    client = Client.serve(folder)
    try:
        answer = client.post("/api/next", {}, who="bob")[1]
        client.post("/api/judge", {"pair": answer["pair"]["id"], "choice": "a"}, who="bob")
    finally:
        client.close()
    before = files.seed_pairs_path(run.run).read_bytes()
    with pytest.raises(SailError, match="exists and differs.*not overwriting"):
        label.finish(run)
    assert files.seed_pairs_path(run.run).read_bytes() == before


def test_killed_server_continues(run):
    """A real process, killed with SIGKILL between two judgements, then started again with the same command; the
    links (tokens) stay the same, and the process never loads torch."""
    proc, client = start_page(label_command(run, "--labellers", "dora"), "labelling page: ")
    try:
        answer = client.post("/api/next", {}, who="dora")[1]
        first = client.post("/api/judge", {"pair": answer["pair"]["id"], "choice": "b"}, who="dora")[1]
        libraries = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in libraries and "/torch/" not in libraries  # candidates were there: no model loaded
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tokens = client.tokens
    proc, client = start_page(label_command(run, "--labellers", "dora"), "labelling page: ")
    try:
        assert client.tokens == tokens
        again = client.post("/api/next", {}, who="dora")[1]
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
    client = Client.serve(folder, labellers=("erin",), target=8)
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
        driver.get(client.url + "/?token=" + client.tokens["erin"])  # the link the command prints for erin
        first = shown()
        assert driver.current_url == client.url + "/"  # the token moved into a cookie, out of the address bar
        style = "return getComputedStyle(document.body).backgroundColor"
        assert driver.execute_script(style) == "rgb(244, 242, 238)"  # the page's policy lets its own style apply
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


DRAW = """
import sys
from tools import label
args = label.build_parser().parse_args(sys.argv[1:])
label.generate(args, label.prepare(args))
assert "torch" not in sys.modules, "the labelling process loaded torch"
"""


def draw_in_a_labelling_process(tmp_path):
    """The label folder after a `tools.label` process (up to the server) drew the candidates of the tiny SD1.5 model."""
    args = label_args(tmp_path / "run", write_prompts(tmp_path / "prompts.txt"))
    command = [sys.executable, "-c", DRAW] + [str(a) for a in ("--run", args.run, "--prompts", args.prompts, "--preset",
                                                                "tiny-sd15", "--label-prompts", 3, "--candidates", 3,
                                                                "--pool-sizes", "4,5")]
    subprocess.run(command, check=True, timeout=600)
    return args.run / "label"


def test_candidates_drawn_in_a_child(tmp_path):
    """The real path on the tiny SD1.5 model: tools/label.py's process has the library draw the candidates in a
    child process and never loads torch itself."""
    folder = draw_in_a_labelling_process(tmp_path)
    rows = files.read_jsonl(folder / "generations.jsonl")
    assert len(rows) == 9 and json.loads((folder / "generate.settings.json").read_text())["model"] == "tiny-sd15"
    assert all(Image.open(folder / r["image"]).size == (32, 32) for r in rows)
    assert len(labelling.Labelling(folder, 0, 6).pairs) == 9


@pytest.mark.slow
def test_candidates_equal_01_generate(tmp_path):
    """Parity: the candidates equal those of 01_generate.py (this commit) with the same model, prompts, count and
    seed, pixel for pixel, with the same generations.jsonl and settings record."""
    folder = draw_in_a_labelling_process(tmp_path)
    stage = load_stage("01_generate")
    stage.locked_main(stage.build_parser().parse_args(
        ["--ckpt", "tiny-sd15", "--pool", str(folder / "prompts.jsonl"), "--out", str(tmp_path / "by01"),
         "--num-candidates", "3", "--seed", "0"]))
    rows = files.read_jsonl(folder / "generations.jsonl")
    assert [files.strip_private(r) for r in files.read_jsonl(tmp_path / "by01" / "generations.jsonl")] == \
        [files.strip_private(r) for r in rows]
    for row in rows:
        assert np.array_equal(np.asarray(Image.open(folder / row["image"])),
                              np.asarray(Image.open(tmp_path / "by01" / row["image"])))
    settings = [json.loads((out / "generate.settings.json").read_text()) for out in (folder, tmp_path / "by01")]
    assert settings[0] | {"pool": None} == settings[1] | {"pool": None}  # the pool's path is relative to each folder
