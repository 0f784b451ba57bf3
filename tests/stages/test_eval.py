"""The evaluation: scorer formulas against hand computations on tiny random-weight models, the
optional extras' messages, the statistics, and 05_eval.py end to end on the tiny-sd15 preset."""
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_stage
from PIL import Image

from sail import metrics, reports, scorers
from sail.common import SailError
from sail.models import describe_model, load_unet, save_checkpoint


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


PROMPTS = ["a red cube", "two dogs on a beach at sunset", "x", "a very long prompt " * 8, "blue"]
IMAGES = random_images([(32, 32), (48, 40), (40, 64), (32, 32), (100, 37)])


def test_pickscore_matches_hand_computation_and_batch_size():
    model, processor = scorers.tiny_clip()
    scorer = scorers.PickScore(model, processor, batch_size=2)
    got = torch.tensor(scorer(PROMPTS, IMAGES))
    assert got.shape == (5,)
    with torch.no_grad():
        pixels = processor(images=IMAGES, return_tensors="pt")["pixel_values"]
        assert pixels.shape == (5, 3, 32, 32)
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        want = []
        for i, prompt in enumerate(PROMPTS):  # one prompt at a time, as the model card does
            text = processor(text=[prompt], padding=True, truncation=True, max_length=77, return_tensors="pt")
            txt = model.text_projection(model.text_model(**text).pooler_output)[0]
            cos = (img[i] @ txt) / (img[i].norm() * txt.norm())
            want.append(model.logit_scale.exp() * cos)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-4, atol=1e-4)
    for batch in (1, 3, 8):
        scorer.batch_size = batch
        torch.testing.assert_close(torch.tensor(scorer(PROMPTS, IMAGES)), got, rtol=1e-4, atol=1e-4)


def test_aesthetic_matches_hand_computation_and_loads_a_pth(tmp_path):
    clip, _ = scorers.tiny_clip(seed=3)
    mlp = scorers.AestheticMLP(clip.config.projection_dim)
    torch.save(mlp.state_dict(), tmp_path / "head.pth")
    scorer = scorers.Aesthetic(mlp=str(tmp_path / "head.pth"), clip=clip, batch_size=4)  # the real loading path
    got = torch.tensor(scorer(PROMPTS, IMAGES))
    with torch.no_grad():
        emb = clip.visual_projection(clip.vision_model(pixel_values=scorers.clip_pixels(IMAGES, 32)).pooler_output)
        x = emb / emb.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):  # Linear layers; dropout is off in eval
            layer = mlp.layers[i]
            x = x @ layer.weight.T + layer.bias
    torch.testing.assert_close(got, x[:, 0], rtol=1e-4, atol=1e-5)
    scorer.batch_size = 1
    torch.testing.assert_close(torch.tensor(scorer(PROMPTS, IMAGES)), got, rtol=1e-4, atol=1e-5)


def test_clip_preprocessing_crop_and_pad_by_hand():
    img = random_images([(64, 48)])[0]
    mean, std = np.array(scorers.CLIP_MEAN, np.float32), np.array(scorers.CLIP_STD, np.float32)
    crop = img.resize((42, 32), Image.BICUBIC).crop((5, 0, 37, 32))  # short side 32, long int(32*64/48)=42
    want = (np.asarray(crop, np.float32) / 255 - mean) / std
    got = scorers.clip_pixels([img], 32)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    pad = scorers.hps_pixels([img], 32)[0].permute(1, 2, 0).numpy()  # long side 32 -> 32x24, 4 rows of zeros each side
    np.testing.assert_allclose(pad[:4], np.broadcast_to(-mean / std, (4, 32, 3)), atol=1e-6)
    np.testing.assert_allclose(pad[28:], np.broadcast_to(-mean / std, (4, 32, 3)), atol=1e-6)


class StubOpenClip(torch.nn.Module):
    """The open_clip model interface HPSv2 uses: encode_image, encode_text, visual.image_size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.visual = types.SimpleNamespace(image_size=32)
        self.img = torch.nn.Linear(3 * 32 * 32, 8)
        self.txt = torch.nn.Embedding(256, 8)

    def encode_image(self, pixels):
        return self.img(pixels.flatten(1))

    def encode_text(self, tokens):
        return self.txt(tokens).mean(1)


def stub_tokenizer(prompts):
    return torch.tensor([[ord(c) % 256 for c in (p + " " * 77)[:77]] for p in prompts])


def test_hpsv2_is_100_times_cosine_with_its_preprocessing():
    model = StubOpenClip()
    scorer = scorers.HPSv2("hpsv2", model=model, tokenizer=stub_tokenizer, batch_size=2)
    got = torch.tensor(scorer(PROMPTS, IMAGES))
    with torch.no_grad():
        img = model.encode_image(scorers.hps_pixels(IMAGES, 32))
        txt = model.encode_text(stub_tokenizer(PROMPTS))
    torch.testing.assert_close(got, 100 * F.cosine_similarity(img, txt), rtol=1e-5, atol=1e-4)
    scorer.batch_size = 5
    torch.testing.assert_close(torch.tensor(scorer(PROMPTS, IMAGES)), got, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric,module,package", [("hpsv2", "open_clip", "open_clip_torch"),
                                                    ("hpsv2.1", "open_clip", "open_clip_torch")])
def test_missing_optional_package_names_what_to_install(monkeypatch, metric, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(SailError, match=f"pip install {package}"):
        metrics.check_metric(metric)
    with pytest.raises(SailError, match=f"pip install {package}"):
        metrics.load_scorer(metric)


def test_oracle_scorer_is_the_toy_worlds_oracle():
    toy_world = pytest.importorskip("toy.world")
    prompts = ["a small red circle at the top left", "a large blue square in the center"]
    got = metrics.load_scorer("oracle")(prompts, IMAGES[:2])
    assert got == [toy_world.oracle_score(p, img) for p, img in zip(prompts, IMAGES[:2])]


def test_unknown_metric_is_refused():
    with pytest.raises(SailError, match="unknown metric"):
        metrics.check_metric("clipscore2")


def test_statistics():
    p = reports.paired([1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 4.0, 3.0])
    assert p["win"] == pytest.approx((1 + 0.5 + 0 + 1) / 4) and p["delta"] == pytest.approx(0.25)
    assert p["win_ci"][0] <= p["win"] <= p["win_ci"][1]
    s = reports.summarize(np.arange(100.0))
    assert s["n"] == 100 and s["mean"] == 49.5 and s["ci95"][0] < 49.5 < s["ci95"][1]
    a = reports.pair_accuracy([0.5, -1.0, 0.0, 0.0])
    assert a["accuracy"] == 0.25 and a["ties"] == 2 and a["n"] == 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with one checkpoint (the tiny UNet, weights perturbed) and a 4-prompt benchmark."""
    root = tmp_path_factory.mktemp("evalrun")
    desc = describe_model("tiny-sd15")
    unet = load_unet(desc)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_checkpoint(unet, root / "run" / "iter_01" / "ckpt",
                    dict(base_model=desc.base_model, arch="sd15", preset="tiny-sd15", iteration=1, parent="tiny-sd15"))
    with open(root / "bench.jsonl", "w") as f:
        for i, prompt in enumerate(["a red cat", "a blue dog", "a green tree", "a car", "not used"]):
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt": prompt}) + "\n")
    return root


def run_eval(*argv):
    stage = load_stage("05_eval")
    stage.main(stage.build_parser().parse_args([str(a) for a in argv]))


def test_end_to_end_tiny_preset(run):
    ev = run / "run" / "eval"
    argv = ["--run", run / "run", "--ckpt", "tiny-sd15", "--ckpt", run / "run" / "iter_01" / "ckpt",
            "--benchmark", run / "bench.jsonl", "--limit", "4", "--bootstrap", "200"]
    run_eval(*argv)
    for name in ("base", "iter_01"):
        info = json.loads((ev / name / "bench" / "eval.json").read_text())
        assert info["n_prompts"] == 4 and set(info["metrics"]) == {"tiny-pickscore", "tiny-aesthetic"}
        assert info["metrics"]["tiny-pickscore"]["n"] == 4 and info["generation"]["steps"] == 4
        rows = [json.loads(line) for line in (ev / name / "bench" / "scores.jsonl").read_text().splitlines()]
        assert [r["prompt_id"] for r in rows] == ["p0", "p1", "p2", "p3"]
    seeds = [[json.loads(line)["seeds"] for line in (ev / n / "bench" / "scores.jsonl").read_text().splitlines()]
             for n in ("base", "iter_01")]
    assert seeds[0] == seeds[1]  # the same noise for every checkpoint
    base_img = np.asarray(Image.open(ev / "base" / "bench" / "images" / "p0_0.png"), np.float32)
    ckpt_img = np.asarray(Image.open(ev / "iter_01" / "bench" / "images" / "p0_0.png"), np.float32)
    assert base_img.shape == (32, 32, 3) and np.abs(base_img - ckpt_img).max() > 0  # the checkpoint's UNet was used
    table = (ev / "table_bench.md").read_text()
    assert "| base |" in table and "| iter_01 |" in table and "Against base" in table and "Prompts per column: 4." in table
    with Image.open(ev / "grid_bench.png") as grid:
        assert grid.size == (220 + 2 * 128, 24 + 4 * 128)
    pytest.importorskip("matplotlib")
    assert (ev / "plot_bench.png").is_file()

    files = sorted(ev.glob("*/bench/images/*.png")) + sorted(ev.glob("*/bench/scores.jsonl"))
    stamps = [f.stat().st_mtime_ns for f in files]
    run_eval(*argv)  # a rerun reuses every image and score
    assert [f.stat().st_mtime_ns for f in files] == stamps
    with pytest.raises(SailError, match="other settings"):
        run_eval(*argv, "--steps", "3")


def test_tiny_imagereward_through_05_eval(run):
    out = run / "ir"
    run_eval("--ckpt", "tiny-sd15", "--benchmark", run / "bench.jsonl", "--limit", "2", "--bootstrap", "50",
             "--metrics", "tiny-imagereward", "--out", out)
    info = json.loads((out / "base" / "bench" / "eval.json").read_text())
    assert info["metrics"]["tiny-imagereward"]["n"] == 2 and np.isfinite(info["metrics"]["tiny-imagereward"]["mean"])
    assert "tiny I.R." in (out / "table_bench.md").read_text()


def test_reward_accuracy_ties_when_model_equals_reference(run):
    folder = run / "pairs"
    folder.mkdir()
    for i, img in enumerate(random_images([(40, 32)] * 4, seed=5)):
        img.save(folder / f"{i}.png")
    with open(folder / "pairs.jsonl", "w") as f:
        for i in range(3):
            f.write(json.dumps(dict(prompt=f"prompt {i}", image_w=f"{i}.png", image_l=f"{i + 1}.png", source="human")) + "\n")
    out = run / "ra"
    run_eval("--reward-accuracy", folder / "pairs.jsonl", "--ckpt", "tiny-sd15", "--ckpt", run / "run" / "iter_01" / "ckpt",
             "--out", out, "--draws", "2", "--bootstrap", "100")
    base = json.loads((out / "base" / "reward_accuracy.json").read_text())["results"]
    assert [r["method"] for r in base] == ["self-reward K=2 common draws", "self-reward K=2 own draws"]
    assert all(r["ties"] == 3 and r["accuracy"] == 0.0 and r["n"] == 3 for r in base)
    trained = json.loads((out / "iter_01" / "reward_accuracy.json").read_text())["results"]
    assert all(r["ties"] == 0 for r in trained)
    assert "| iter_01 | self-reward K=2 own draws |" in (out / "reward_accuracy.md").read_text()
