"""tools/spot_check.py (GUARD=spot): a made-up run whose self pairs the toy's oracle judges right or wrong by
construction, labelled by the toy's human and through the labelling page by a test that plays the
human over HTTP; the rule it applies is the one toy/study_guard.py replays."""
import json
import shutil
import signal
import sys

import numpy as np
import pytest
from label_client import start_page
from PIL import Image

from sail import common, files
from tools import spot_check
from toy import study_guard, world

RIGHT = {1: 8, 2: 6, 3: 2}  # of the 8 self pairs of iterations 1, 2, 3, this many have the oracle's winner as image_w
CAPTIONS = world.all_captions()[::97][:8]


def picture(prompt, right):
    """The caption drawn as asked (right), or another shape in another colour in a corner (wrong)."""
    want = world.parse_caption(prompt)
    if right:
        x, y = world.POSITIONS[want["position"]]
        pixels = world.render_clean(want["shape"], world.COLOURS[want["colour"]], x, y, world.SIZES[want["size"]])
    else:
        shape, colour = ("circle" if want["shape"] != "circle" else "square"), ("blue" if want["colour"] != "blue" else "red")
        pixels = world.render_clean(shape, world.COLOURS[colour], 6, 26, world.SIZES["small"])
    return Image.fromarray(pixels.astype(np.uint8))


def fake_run(folder, rater_noise=0.0):
    for i, right in RIGHT.items():
        iter_dir = folder / files.iteration_name(i)
        (iter_dir / "images").mkdir(parents=True)
        rows = []
        for j, prompt in enumerate(CAPTIONS):
            picture(prompt, True).save(iter_dir / "images" / f"p{j}_good.png")
            picture(prompt, False).save(iter_dir / "images" / f"p{j}_bad.png")
            w, l = ("good", "bad") if j < right else ("bad", "good")
            rows.append(dict(prompt=prompt, prompt_id=f"p{j}", image_w=f"images/p{j}_{w}.png",
                             image_l=f"images/p{j}_{l}.png", source="self", p=0.9))
        files.write_jsonl_atomic(iter_dir / "pairs.jsonl", rows)
    files.write_json_atomic(folder / "toy_world.data.json", dict(rater_noise=rater_noise, tie_margin=0.02))
    files.write_json_atomic(folder / "eval" / "oracle_report.json", {
        "base": dict(mean=0.2), **{files.iteration_name(i): dict(mean=0.3) for i in range(4)}})
    return folder


def check(run, it, *flags):
    args = spot_check.build_parser().parse_args(["--run", str(run), "--iter", str(it), "--labeller", "toy", *flags])
    return spot_check.main(args)


def test_the_pictures_are_right_and_wrong():
    for prompt in CAPTIONS:
        assert world.oracle_score(prompt, picture(prompt, True)) > world.oracle_score(prompt, picture(prompt, False)) + 0.3


@pytest.mark.parametrize("drop, stopped_before", [(0.15, 2), (0.3, 3), (0.8, None)])
def test_the_toy_human_and_the_rule(tmp_path, drop, stopped_before):
    run = fake_run(tmp_path / "run")
    statuses = {}
    for it in (1, 2, 3):
        statuses[it] = check(run, it, "--pairs", "0", "--drop", str(drop))
        if statuses[it]:
            break
    assert statuses == {it: 0 for it in range(1, stopped_before or 4)} | ({stopped_before: 3} if stopped_before else {})
    record = json.loads((run / "eval" / "spot" / "spot.json").read_text())
    expected = {"iter_01": 1.0, "iter_02": 0.75, "iter_03": 0.25}
    assert record["agreement"] == {k: v for k, v in expected.items() if int(k[-2:]) in statuses}
    assert record["reference"] == "iter_01"
    if stopped_before:
        assert record["stopped_before"] == f"iter_{stopped_before:02d}"
        assert record["keep"] == str(files.checkpoint_dir(run, stopped_before - 1))
    # the loop's decision is the one toy/study_guard.py replays on finished runs
    replayed = study_guard.spot_check_keeps(study_guard.load_run(run), 0, "drop", drop, np.random.default_rng(0))
    assert replayed == (stopped_before - 1 if stopped_before else 3)
    judged = [json.loads(line) for line in (run / "eval" / "spot" / "iter_01" / "judgements.jsonl").read_text().splitlines()]
    assert len(judged) == 8 and {j["labeller"] for j in judged} == {"toy-rater"}
    result = json.loads((run / "eval" / "spot" / "iter_01" / "agreement.json").read_text())
    assert result | {"labellers": None} == dict(agreement=1.0, agree=8, judged=8, pairs=8, ties=0, skips=0, labellers=None)


def test_a_fixed_threshold_and_the_first_iteration(tmp_path):
    run = fake_run(tmp_path / "run")
    assert check(run, 1, "--pairs", "0", "--drop", "-1") == 0  # the reference itself never falls below itself
    assert check(run, 2, "--pairs", "0", "--below", "0.8", "--drop", "1") == spot_check.STOP


def test_pairs_one_per_prompt_in_a_seeded_order(tmp_path):
    rows = [dict(prompt=p, source="self", k=k) for k, p in enumerate(CAPTIONS + CAPTIONS[:2])]
    rows.append(dict(prompt="a human pair", source="human", k=99))
    chosen = spot_check.choose_pairs(rows, 5, seed=0, iteration=2)
    assert len(chosen) == 5 and len({r["prompt"] for r in chosen}) == 5 and all(r["source"] == "self" for r in chosen)
    assert all(r["k"] < len(CAPTIONS) for r in chosen)  # the first pair of a prompt
    assert [r["prompt"] for r in spot_check.choose_pairs(rows[::-1], 5, 0, 2)] == [r["prompt"] for r in chosen]
    assert [r["prompt"] for r in spot_check.choose_pairs(rows, 5, 1, 2)] != [r["prompt"] for r in chosen]
    assert len(spot_check.choose_pairs(rows, 0, 0, 2)) == len(CAPTIONS)


def test_the_noisy_human_is_seeded(tmp_path):
    answers = []
    for copy in ("a", "b"):
        run = fake_run(tmp_path / copy, rater_noise=0.3)
        check(run, 1, "--pairs", "0")
        answers.append([json.loads(line)["choice"] for line in
                        (run / "eval" / "spot" / "iter_01" / "judgements.jsonl").read_text().splitlines()])
    assert answers[0] == answers[1] and len(answers[0]) == 8
    agreement = json.loads((tmp_path / "b" / "eval" / "spot" / "iter_01" / "agreement.json").read_text())["agreement"]
    assert 0.5 <= agreement < 1.0  # every gap is over 0.3: p > 0.73 a pair, not all 8 right at this seed


def test_settings_trained_iterations_and_bad_pairs(tmp_path):
    run = fake_run(tmp_path / "run")
    check(run, 1, "--pairs", "4")
    assert check(run, 1, "--pairs", "4") == 0  # finished: found, not labelled again
    args_file = run / "eval" / "spot" / "iter_01" / "spot.args.json"
    before = args_file.read_text()
    with pytest.raises(common.SailError, match=r"pairs = 4.*pairs = 6"):
        check(run, 1, "--pairs", "6")
    assert args_file.read_text() == before  # the refused arguments are not written
    (run / "iter_02" / "ckpt").mkdir()
    (run / "iter_02" / "ckpt" / "sail.json").write_text("{}")
    assert check(run, 2) == 0 and not (run / "eval" / "spot" / "iter_02" / "judgements.jsonl").exists()
    rows = files.read_jsonl(run / "iter_03" / "pairs.jsonl")
    shutil.copy(run / "iter_03" / "images" / "p0_good.png", run / "elsewhere.png")
    rows[0]["image_w"] = "../elsewhere.png"
    files.write_jsonl_atomic(run / "iter_03" / "pairs.jsonl", [files.strip_private(r) for r in rows])
    with pytest.raises(common.SailError, match=r"iter_03/pairs.jsonl:1: image_w ../elsewhere.png is not in"):
        check(run, 3, "--pairs", "0")


def test_the_page_waits_for_the_human_and_continues_after_a_kill(tmp_path):
    """A real process serving the pairs; the test is the human, preferring what the oracle prefers, except on
    one pair it calls a tie; killed with SIGKILL after two judgements, then started again. The page is guarded as
    tools/label.py's: a token per labeller (the same links after the restart), Host checks, security headers."""
    run = fake_run(tmp_path / "run")
    command = [sys.executable, "-m", "tools.spot_check", "--run", str(run), "--iter", "2", "--pairs", "0",
               "--port", "0", "--labellers", "dora,emil"]

    def judge(client, answer):
        pair = answer["pair"]
        a, b = (world.oracle_score(pair["prompt"], Image.open(run / "iter_02" / pair[side])) for side in ("image_a", "image_b"))
        choice = "tie" if pair["prompt_id"] == "p0" else "a" if a > b else "b"
        return client.post("/api/judge", {"pair": pair["id"], "choice": choice}, who="dora")[1]

    proc, client = start_page(command, "spot check page: ")
    try:
        answer = client.post("/api/next", {}, who="dora")[1]
        status, headers, served = client.get("/" + answer["pair"]["image_a"], who="dora")
        assert served == (run / "iter_02" / answer["pair"]["image_a"]).read_bytes()
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
        assert client.get("/" + answer["pair"]["image_a"], who=None)[0] == 401
        assert client.post("/api/next", {}, who=None)[0] == 401
        assert client.post("/api/next", {}, who="dora", headers={"Host": "rebind.evil.example"})[0] == 403
        assert client.post("/api/judge", {"pair": answer["pair"]["id"], "choice": "a"}, who="emil")[0] == 409  # dora's
        answer = judge(client, judge(client, answer))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    tokens = client.tokens
    proc, client = start_page(command, "spot check page: ")
    assert client.tokens == tokens and json.loads((run / "eval" / "spot" / "tokens.json").read_text()) == tokens
    answer = client.post("/api/next", {}, who="dora")[1]
    assert answer["progress"]["done"] == 2
    while answer["pair"]:
        answer = judge(client, answer)
    assert proc.wait(timeout=60) == 0
    result = json.loads((run / "eval" / "spot" / "iter_02" / "agreement.json").read_text())
    right = RIGHT[2] - 1  # p0's pair, a right one, was called a tie
    assert result == dict(agreement=right / 7, agree=right, judged=7, pairs=8, ties=1, skips=0, labellers=["dora"])
