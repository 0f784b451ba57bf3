"""The toy world: its hidden human (oracle), its renderer, the run data it writes, the oracle
report, and a smoke run of the toy base model's pretraining."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from sail import files, generation, models
from sail.common import SailError
from toy import base
from toy import data as toy_data
from toy import report as toy_report
from toy import world

PROMPT = "a medium red circle at the top left"


def u8(x):
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def draw(shape="circle", colour="red", position="top left", size="medium", **kw):
    return world.render_clean(shape, world.COLOURS[colour], *world.POSITIONS[position], world.SIZES[size], **kw)


# ---------------------------------------------------------------- oracle
@pytest.mark.parametrize("wrong", [dict(colour="orange"), dict(colour="blue"), dict(shape="square"),
                                   dict(shape="triangle"), dict(shape="cross"), dict(position="top"),
                                   dict(position="bottom right"), dict(size="small"), dict(size="large")])
def test_oracle_prefers_what_the_caption_says(wrong):
    right, other = u8(draw()), u8(draw(**wrong))
    assert world.oracle_prefers(PROMPT, right, other) == 0
    assert world.oracle_prefers(PROMPT, other, right) == 1
    assert world.oracle_score(PROMPT, right) > 0.9


def test_oracle_prefers_clean_over_messy():
    rng = np.random.default_rng(0)
    clean = draw()
    specks = clean.copy()
    for y, x in rng.integers(0, 32, (6, 2)):
        specks[y, x] = rng.uniform(0, 255, 3)
    messy = {"blurred": world._blur(clean, 1.2), "noisy": clean + rng.normal(0, 15, clean.shape), "specks": specks,
             "tinted background": draw(background=np.array([200.0, 230.0, 170.0])),
             "stray blob": world.render_clean("square", (30, 30, 200), 26, 26, 2.0, background=clean)}
    for name, img in messy.items():
        assert world.oracle_prefers(PROMPT, u8(clean), u8(img)) == 0, name


def test_oracle_ties_blank_and_range():
    img = u8(draw())
    assert world.oracle_prefers(PROMPT, img, img.copy()) is None
    blank = u8(np.broadcast_to(world.BACKGROUND, (32, 32, 3)))
    assert world.oracle_score(PROMPT, blank) == 0.0
    rng = np.random.default_rng(1)
    for _ in range(5):
        noise = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        assert 0.0 <= world.oracle_score(PROMPT, noise) < world.oracle_score(PROMPT, img)  # noise is no clean render
    # a bigger image of the same picture is judged like the 32x32 one
    assert world.oracle_prefers(PROMPT, img.resize((64, 64), Image.NEAREST), u8(draw(colour="blue"))) == 0


def test_render_and_oracle_are_deterministic():
    a = [world.render_web(np.random.default_rng(7)) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and a[0][1] == a[1][1]
    images, captions = base.pretraining_set(32, seed=3)
    images2, captions2 = base.pretraining_set(32, seed=3)
    assert np.array_equal(images, images2) and captions == captions2
    scores = [world.oracle_score(c, Image.fromarray(i)) for c, i in zip(captions, images)]
    assert scores == [world.oracle_score(c, Image.fromarray(i)) for c, i in zip(captions, images)]
    assert len(set(np.round(scores, 6))) > 20  # graded, not a handful of levels


def test_captions_parse_and_world_size():
    caps = world.all_captions()
    assert len(caps) == len(set(caps)) == 8 * 4 * 3 * 9
    for c in caps[::37]:
        a = world.parse_caption(c)
        assert world.caption(a["size"], a["colour"], a["shape"], a["position"]) == c
    assert world.parse_caption("a red square")["position"] is None


# ---------------------------------------------------------------- run data (tiny random-weight presets)
TINY = dict(n_pools=2, pool_size=3, n_eval=3, pairs_per_prompt=3, n_universe=6, seed_fraction=0.5, tie_margin=0.0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("toy") / "run"
    toy_data.make_run_data(run, preset="tiny-sd15", **TINY)
    return run


def check_run_data(run):
    pairs = files.read_pairs(run / "seed" / "pairs.jsonl")
    assert 1 <= len(pairs) <= 9
    assert all(p["source"] == "human" and p["image_w"].startswith("images/") for p in pairs)
    for p in pairs:  # the oracle's choice, between images the preset's model drew
        assert Image.open(p["_image_w"]).size == (32, 32)
        assert world.oracle_score(p["prompt"], files.load_image(p["_image_w"])) > world.oracle_score(p["prompt"], files.load_image(p["_image_l"]))
    assert len(files.check_pools_disjoint(run)) == 4
    pools = [files.read_prompts(run / "pools" / f"iter_{k:02d}.jsonl") for k in (1, 2)]
    evals = files.read_prompts(run / "eval" / "prompts.jsonl")
    groups = [{r["prompt"] for r in g} for g in pools + [evals]] + [{p["prompt"] for p in pairs}]
    assert [len(g) for g in groups[:3]] == [3, 3, 3]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not a & b


def test_make_run_data_writes_disjoint_sets_and_valid_pairs(tiny_run):
    check_run_data(tiny_run)
    stats = json.loads((tiny_run / "seed" / "stats.json").read_text())
    assert stats["seed_slots"] == 9 and stats["universe_slots"] == 18 and stats["pairs"]["pairs"] >= 1


def test_make_run_data_with_sdxl_preset(tmp_path):
    toy_data.make_run_data(tmp_path / "run", preset="tiny-sdxl", **TINY)
    check_run_data(tmp_path / "run")


def test_make_run_data_is_deterministic_skips_and_refuses_other_settings(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first = (run / "seed" / "pairs.jsonl").read_text()
    image = sorted((run / "seed" / "images").glob("*.png"))[0]
    stamp = image.stat().st_mtime_ns
    toy_data.make_run_data(run, preset="tiny-sd15", **TINY)  # rerun: everything kept
    assert (run / "seed" / "pairs.jsonl").read_text() == first and image.stat().st_mtime_ns == stamp
    with pytest.raises(SailError, match="other settings"):
        toy_data.make_run_data(run, preset="tiny-sd15", **{**TINY, "seed": 1})
    image.unlink()  # the whole labelled universe; a lost image is drawn again, identical
    stats = toy_data.make_run_data(run, preset="tiny-sd15", all_labels=True, **TINY)
    redrawn, original = (np.asarray(Image.open(p), dtype=int) for p in (image, tiny_run / "seed" / "images" / image.name))
    assert np.abs(redrawn - original).max() <= 1  # same seed, same picture, whatever the batch
    everything = files.read_pairs(run / "seed" / "all_pairs.jsonl")
    assert stats["all_pairs"]["slots"] == 18 and len(everything) >= len(files.read_pairs(run / "seed" / "pairs.jsonl"))
    assert (run / "seed" / "pairs.jsonl").read_text() == first


def test_val_pairs_are_held_out_and_leave_the_seed_as_it_was(tiny_run, tmp_path):
    with pytest.raises(SailError, match="--val-pairs 10: 9 labelled pair slots are outside the seed set"):
        toy_data.make_run_data(tmp_path / "too_many", preset="tiny-sd15", val_pairs=10, **TINY)
    assert not (tmp_path / "too_many").exists()  # refused before anything was written
    stats = toy_data.make_run_data(tmp_path / "run", preset="tiny-sd15", val_pairs=6, **TINY)
    assert (tmp_path / "run" / "seed" / "pairs.jsonl").read_text() == (tiny_run / "seed" / "pairs.jsonl").read_text()
    val = files.read_pairs(tmp_path / "run" / "val" / "pairs.jsonl")
    assert stats["val_pairs"]["slots"] == 6 and len(val) == stats["val_pairs"]["pairs"] >= 1
    assert all(p["_image_w"].parent == tmp_path / "run" / "val" / "images" for p in val)
    seed_images = {p.name for p in (tmp_path / "run" / "seed" / "images").glob("*.png")}
    assert not seed_images & ({p["_image_w"].name for p in val} | {p["_image_l"].name for p in val})


def test_noisy_rater_is_bradley_terry_on_the_oracle_and_one_label_per_slot(monkeypatch):
    """--rater-noise T: the oracle's winner wins with probability sigmoid(gap / T); ties stay ties;
    a slot gets the same label whichever file it is labelled for."""
    gaps = {"tie": 0.01, "near": 0.05, "far": 0.3}
    monkeypatch.setattr(toy_data, "oracle_score", lambda prompt, img: gaps[prompt] if img == "a" else 0.0)
    slots = [(dict(prompt_id=f"p{i}", prompt=kind), 0) for kind in gaps for i in range(1500)]
    images = {(row["prompt_id"], 0, side): (f"images/{row['prompt_id']}{side}.png", side) for row, _ in slots for side in "ab"}
    pairs, ties, agree = toy_data._label_pairs(slots, images, tie_margin=0.02)
    assert ties == 1500 and agree == 1.0 and all(p["image_w"].endswith("a.png") for p in pairs)
    noisy, ties, agree = toy_data._label_pairs(slots, images, tie_margin=0.02, rater_noise=0.1, seed=3)
    assert ties == 1500 and len(noisy) == 3000
    for kind, offset in (("near", 0), ("far", 1500)):
        share = np.mean([p["image_w"].endswith("a.png") for p in noisy[offset:offset + 1500]])
        assert share == pytest.approx(1 / (1 + np.exp(-gaps[kind] / 0.1)), abs=0.035), kind
    assert agree == pytest.approx(np.mean([p["image_w"].endswith("a.png") for p in noisy]))
    again, _, _ = toy_data._label_pairs(slots[1600:1700], images, tie_margin=0.02, rater_noise=0.1, seed=3)
    assert again == noisy[100:200]  # one label per slot, in any file
    other, _, _ = toy_data._label_pairs(slots, images, tie_margin=0.02, rater_noise=0.1, seed=4)
    assert other != noisy


def test_rater_choice_draws_only_for_a_noisy_non_tie():
    """The toy's human (toy/data.py's labels, tools/spot_check.py's toy labeller, toy/study_guard.py's replay)."""
    calls = []

    def uniform():
        calls.append(1)
        return 0.99

    assert world.rater_choice(0.50, 0.49, 0.02, 0.1, uniform) is None
    assert world.rater_choice(0.3, 0.6, 0.02, 0.0, uniform) == 1 and calls == []
    assert world.rater_choice(0.6, 0.3, 0.02, 0.1, uniform) == 1  # sigmoid(3) = 0.953 < 0.99: an upset
    assert world.rater_choice(0.6, 0.3, 0.02, 0.1, lambda: 0.9) == 0 and calls == [1]


def test_split_refuses_a_world_too_small():
    with pytest.raises(SailError, match="no prompts"):
        toy_data.split_prompts(0, n_pools=3, pool_size=300, n_eval=64)


# ---------------------------------------------------------------- oracle report
def test_score_checkpoints_report_and_agreement(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    # a "trained" checkpoint that is the base itself: same seeds, same pictures, win rate 0.5
    desc = models.describe_model("tiny-sd15")
    models.save_checkpoint(models.load_unet(desc), run / "iter_00" / "ckpt",
                       dict(base_model=desc.base_model, arch="sd15", preset="tiny-sd15", parent=None, iteration=0))
    it1 = run / "iter_01"
    it1.mkdir()
    seed_pairs = [files.strip_private(p) for p in files.read_pairs(run / "seed" / "pairs.jsonl")]
    flipped = [dict(p, image_w="../seed/" + p["image_l"], image_l="../seed/" + p["image_w"], source="self") for p in seed_pairs]
    files.write_jsonl_atomic(it1 / "pairs.jsonl", flipped)
    assert toy_report.self_reward_agreement(it1) == 0.0
    files.write_jsonl_atomic(it1 / "pairs.jsonl", [dict(p, image_w=p["image_l"], image_l=p["image_w"]) for p in flipped])
    assert toy_report.self_reward_agreement(it1) == 1.0

    res = toy_report.score_checkpoints(run, ["base", run / "iter_00" / "ckpt"], n_images_per_prompt=2)
    assert set(res) == {"base", "iter_00"}
    base_scores = [r["score"] for r in files.read_jsonl(run / "eval" / "oracle" / "base" / "scores.jsonl")]
    assert res["base"]["n"] == 6 == len(base_scores) and res["base"]["mean"] == pytest.approx(np.mean(base_scores))
    assert res["iter_00"]["mean"] == res["base"]["mean"] and res["iter_00"]["win_rate"] == 0.5
    scores = run / "eval" / "oracle" / "iter_00" / "scores.jsonl"
    stamp = scores.stat().st_mtime_ns
    toy_report.score_checkpoints(run, [run / "iter_00" / "ckpt"], n_images_per_prompt=2)  # cached
    assert scores.stat().st_mtime_ns == stamp

    toy_report.main(toy_report.build_parser().parse_args(["--run", str(run), "--images-per-prompt", "2"]))
    out = capsys.readouterr().out
    report = json.loads((run / "eval" / "oracle_report.json").read_text())
    assert set(report) == {"base", "iter_00"} and "win_rate" in report["iter_00"]
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in report}
    for name, r in report.items():  # the printed table carries the report's numbers
        assert f"{r['mean']:.3f}" in rows[name], (name, rows.get(name))


# ---------------------------------------------------------------- toy base model
def test_toy_base_smoke_build_loads_in_diffusers_and_is_deterministic(tmp_path):
    from diffusers import StableDiffusionPipeline
    small = dict(n_images=64, vae_steps=2, unet_steps=2, batch_size=8, log_every=0)
    a = base.build_toy_base(tmp_path / "a", **small)
    b = base.build_toy_base(tmp_path / "b", **small)
    assert not (tmp_path / "a.tmp").exists()
    pipe = StableDiffusionPipeline.from_pretrained(a)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 4 and pipe.unet.config.sample_size == 8
    assert json.loads((a / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe.set_progress_bar_config(disable=True)
    [(_, [img])] = generation.draw_images(pipe, ["a small red circle at the top"], [0], 2, 1.0, 32, 1)
    assert img.size == (32, 32)
    pipe_b = StableDiffusionPipeline.from_pretrained(b)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(pipe, name).state_dict(), getattr(pipe_b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_ensure_toy_base_reuses_the_cache(tmp_path, monkeypatch):
    calls = []

    def fake_build(path, **kw):
        calls.append(path)
        path.mkdir(parents=True)
        (path / "model_index.json").write_text("{}")
        return path

    monkeypatch.setattr(base, "build_toy_base", fake_build)
    first = base.ensure_toy_base(tmp_path)
    assert first == tmp_path / base.TOY_BASE_NAME and base.ensure_toy_base(tmp_path) == first
    assert len(calls) == 1


def test_world_tokenizer_has_one_token_per_word(tmp_path):
    from transformers import CLIPTokenizer
    base.write_world_tokenizer(tmp_path)
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)
    ids = tok("a medium yellow triangle at the bottom right").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == [w + "</w>" for w in "a medium yellow triangle at the bottom right".split()]
    assert ids[0] == len(tok) - 2 and ids[-1] == len(tok) - 1  # where the text encoder config expects them
    assert len(tok("an astronaut riding a horse").input_ids) > 6  # other words fall back to bytes


def test_ensure_toy_base_waits_for_a_build_in_another_process(tmp_path, monkeypatch):
    """A second process asking for the base while the first builds it waits instead of failing."""
    import threading
    import time
    monkeypatch.setattr(base, "build_toy_base", lambda path, **kw: pytest.fail("built twice"))
    holding = threading.Event()

    def other_builder():  # holds the OS lock of the cache folder, as a build in another process does
        with files.folder_lock(tmp_path, "toy-base build"):
            holding.set()
            time.sleep(0.5)
            (tmp_path / base.TOY_BASE_NAME).mkdir()
            (tmp_path / base.TOY_BASE_NAME / "model_index.json").write_text("{}")

    thread = threading.Thread(target=other_builder)
    thread.start()
    holding.wait()
    assert base.ensure_toy_base(tmp_path) == tmp_path / base.TOY_BASE_NAME
    thread.join()
