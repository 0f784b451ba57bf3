"""The scorers against their authors' code on identical inputs and tiny random weights: the
preprocessing of each metric pixel by pixel, the HPSv2 and ImageReward formulas, and NaN scores.
Where the authors' package does not install beside the kit, its code is transcribed here, with
the repository, file and commit it comes from."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_stage
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from torchvision.transforms import functional as TF

from sail import common, imagereward, metrics, reports, scorers
from sail.common import SailError
from sail.files import image_name

SIZES = [(512, 512), (1024, 1024), (640, 480), (300, 700), (37, 53)]  # (width, height)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def random_image(size, seed=0):
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def assert_same_pixels(got, want):
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- HPSv2
class ResizeMaxSize(torch.nn.Module):
    """github:tgxs002/HPSv2 866735ecaae999fa714bd9edfa05aa2672669ee3 hpsv2/src/open_clip/transform.py (the
    same file as in the hpsv2 1.2.0 wheel, which pins pytest==7.2.0 and protobuf<4, so it is not installed)."""

    def __init__(self, max_size, interpolation=InterpolationMode.BICUBIC, fill=0):
        super().__init__()
        self.max_size, self.interpolation, self.fill = max_size, interpolation, fill

    def forward(self, img):
        height, width = img.shape[1:]
        scale = self.max_size / float(max(height, width))
        if scale != 1.0:
            new_size = tuple(round(dim * scale) for dim in (height, width))
            img = TF.resize(img, new_size, self.interpolation)
            pad_h = self.max_size - new_size[0]
            pad_w = self.max_size - new_size[1]
            img = TF.pad(img, padding=[pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=self.fill)
        return img


def hpsv2_transform(size=224):
    """The same file's image_transform(size, is_train=False, resize_longest_max=True) on an RGB image."""
    return Compose([lambda im: im.convert("RGB"), ToTensor(), ResizeMaxSize(size, fill=0), Normalize(MEAN, STD)])


def tiny_open_clip(seed=0):
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(seed)
    model = open_clip.CLIP(embed_dim=16, vision_cfg=dict(image_size=224, layers=2, width=32, head_width=16, patch_size=32),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, open_clip.get_tokenizer("ViT-H-14")  # open_clip ships the BPE file the hpsv2 wheel lacks


@pytest.fixture(scope="module")
def hps():
    model, tokenizer = tiny_open_clip()
    return scorers.HPSv2("hpsv2", model=model, tokenizer=tokenizer, batch_size=2)


@pytest.mark.parametrize("size", SIZES)
def test_hpsv2_pixels_are_the_authors_transform(hps, size):
    img = random_image(size)
    assert_same_pixels(hps.pixels([img])[0], hpsv2_transform()(img))


def test_hpsv2_score_is_the_authors_formula_on_tiny_open_clip(hps):
    prompts = ["a red cube", "two dogs on a beach at sunset", "x", "a very long prompt " * 20, "Blue!  cafe"]
    images = [random_image(s, seed=i) for i, s in enumerate(SIZES)]
    want = []
    with torch.no_grad():  # hpsv2/img_score.py score(), one image at a time; x 100 as hpsv2/evaluation.py
        for prompt, img in zip(prompts, images):
            image_features, text_features, _ = hps.model(hpsv2_transform()(img)[None], hps.tokenizer([prompt]))
            want.append(100 * (image_features @ text_features.T).diagonal()[0])
    torch.testing.assert_close(torch.tensor(hps(prompts, images)), torch.stack(want), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- ImageReward
def imagereward_transform(n_px=224):
    """github:THUDM/ImageReward c1392c6dd0fd6ecd6d416c96959ab744a6d0a8fb ImageReward/ImageReward.py _transform
    (the image-reward package does not import under transformers 5; see sail/scorers.py)."""
    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])


@pytest.fixture(scope="module")
def tiny_ir():
    model = imagereward.tiny_imagereward()
    with torch.no_grad():  # spread the random weights so that a misplaced one shows
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return imagereward.ImageReward(model=model, batch_size=2)


@pytest.mark.parametrize("size", SIZES)
def test_imagereward_pixels_are_the_authors_transform(tiny_ir, size):
    img = random_image(size)
    assert_same_pixels(tiny_ir.pixels([img])[0], imagereward_transform()(img))


def linear(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])


def layer_norm(x, sd, name, eps):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps)


def authors_vit(sd, x, heads, p="blip.visual_encoder."):
    """ImageReward/models/BLIP/vit.py (same commit) VisionTransformer.forward in eval mode."""
    w = sd[p + "patch_embed.proj.weight"]
    x = F.conv2d(x, w, sd[p + "patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([sd[p + "cls_token"].expand(len(x), -1, -1), x], dim=1)
    x = x + sd[p + "pos_embed"][:, :x.size(1), :]
    for i in range(len({k for k in sd if k.startswith(p + "blocks.") and k.endswith("norm1.weight")})):
        b = f"{p}blocks.{i}."
        h = layer_norm(x, sd, b + "norm1", 1e-6)
        B, N, C = h.shape
        qkv = linear(h, sd, b + "attn.qkv").reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
        attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        x = x + linear((attn @ qkv[2]).transpose(1, 2).reshape(B, N, C), sd, b + "attn.proj")
        x = x + linear(F.gelu(linear(layer_norm(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return layer_norm(x, sd, p + "norm", 1e-6)


def authors_attention(x, context, mask, sd, s, heads):
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, -1).permute(0, 2, 1, 3)  # noqa: E731
    q = split(linear(x, sd, s + "query"))
    k, v = split(linear(context, sd, s + "key")), split(linear(context, sd, s + "value"))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    return (scores.softmax(dim=-1) @ v).permute(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], -1)


def authors_bert(sd, ids, mask, image, heads, p="blip.text_encoder."):
    """ImageReward/models/BLIP/med.py (same commit) BertModel.forward, mode='multimodal', in eval mode."""
    x = sd[p + "embeddings.word_embeddings.weight"][ids] + sd[p + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = layer_norm(x, sd, p + "embeddings.LayerNorm", 1e-12)
    text_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # image_atts are all ones: no image mask
    for i in range(len({k for k in sd if k.startswith(p + "encoder.layer.") and k.endswith("intermediate.dense.weight")})):
        l = f"{p}encoder.layer.{i}."
        for a, context, m in (("attention", None, text_mask), ("crossattention", image, 0.0)):
            out = authors_attention(x, x if context is None else context, m, sd, f"{l}{a}.self.", heads)
            x = layer_norm(linear(out, sd, f"{l}{a}.output.dense") + x, sd, f"{l}{a}.output.LayerNorm", 1e-12)
        x = layer_norm(linear(F.gelu(linear(x, sd, l + "intermediate.dense")), sd, l + "output.dense") + x,
                       sd, l + "output.LayerNorm", 1e-12)
    return x


def authors_checkpoint(vocab, dv=48, dt=32, depth=2, patch=32, ffn=64, seed=0):
    """A random ImageReward.pt with the authors' names: BLIP's ViT, its BERT, the MLP, an unused projection."""
    shapes = {"blip.visual_encoder.cls_token": (1, 1, dv), "blip.visual_encoder.pos_embed": (1, (224 // patch) ** 2 + 1, dv),
              "blip.visual_encoder.patch_embed.proj.weight": (dv, 3, patch, patch), "blip.vision_proj.weight": (256, dv),
              "blip.text_encoder.embeddings.word_embeddings.weight": (vocab, dt),
              "blip.text_encoder.embeddings.position_embeddings.weight": (64, dt)}
    norms = []

    def lin(name, out, inp):
        shapes.update({name + ".weight": (out, inp), name + ".bias": (out,)})

    def norm(name, d):
        shapes.update({name + ".weight": (d,), name + ".bias": (d,)})
        norms.append(name + ".weight")
    shapes["blip.visual_encoder.patch_embed.proj.bias"] = (dv,)
    norm("blip.visual_encoder.norm", dv)
    norm("blip.text_encoder.embeddings.LayerNorm", dt)
    for i in range(depth):
        b, l = f"blip.visual_encoder.blocks.{i}.", f"blip.text_encoder.encoder.layer.{i}."
        norm(b + "norm1", dv), norm(b + "norm2", dv), lin(b + "attn.qkv", 3 * dv, dv), lin(b + "attn.proj", dv, dv)
        lin(b + "mlp.fc1", ffn, dv), lin(b + "mlp.fc2", dv, ffn)
        for a, width in (("attention", dt), ("crossattention", dv)):
            lin(f"{l}{a}.self.query", dt, dt), lin(f"{l}{a}.self.key", dt, width), lin(f"{l}{a}.self.value", dt, width)
            lin(f"{l}{a}.output.dense", dt, dt), norm(f"{l}{a}.output.LayerNorm", dt)
        lin(l + "intermediate.dense", ffn, dt), lin(l + "output.dense", dt, ffn), norm(l + "output.LayerNorm", dt)
    for j, (out, inp) in zip((0, 2, 4, 6, 7), ((1024, dt), (128, 1024), (64, 128), (16, 64), (1, 16))):
        lin(f"mlp.layers.{j}", out, inp)
    gen = torch.Generator().manual_seed(seed)
    state = {k: 0.2 * torch.randn(s, generator=gen) + (k in norms) for k, s in shapes.items()}
    # med_config.json's keys (BLIP_Pretrain replaces encoder_width by the ViT's width)
    med = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1,
               hidden_size=dt, initializer_range=0.02, intermediate_size=ffn, layer_norm_eps=1e-12,
               max_position_embeddings=64, model_type="bert", num_attention_heads=4, num_hidden_layers=depth,
               pad_token_id=0, type_vocab_size=2, vocab_size=vocab, encoder_width=768, add_cross_attention=True)
    vit = dict(hidden_size=dv, intermediate_size=ffn, num_hidden_layers=depth, num_attention_heads=4, image_size=224,
               patch_size=patch, layer_norm_eps=1e-6)
    return state, med, vit


def test_blip_large_vit_is_what_imagereward_builds():
    # ImageReward.py: BLIP_Pretrain(image_size=224, vit='large'); blip.py create_vit: patch 16, width 1024, depth 24,
    # 16 heads; vit.py: mlp_ratio 4, LayerNorm eps 1e-6
    assert imagereward.BLIP_LARGE_VIT == dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=16, layer_norm_eps=1e-6)


def test_imagereward_loads_the_authors_checkpoint_and_scores_as_their_code(tmp_path, monkeypatch):
    from transformers import BertTokenizer
    imagereward.tiny_imagereward()  # writes its character vocabulary
    (tmp_path / "vocab.txt").write_text((common.CACHE_DIR / "tiny-bert-tokenizer" / "vocab.txt").read_text())
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    # ImageReward/models/BLIP/blip.py init_tokenizer (same commit), from a local vocabulary instead of bert-base-uncased
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    state, med, vit = authors_checkpoint(len(tokenizer))
    torch.save(state, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(med))
    monkeypatch.setattr(imagereward, "BLIP_LARGE_VIT", vit)  # a small ViT of the same code
    monkeypatch.setenv("SAIL_IMAGEREWARD_TOKENIZER_PATH", str(tmp_path))
    scorer = metrics.load_scorer("imagereward", path=str(tmp_path), batch_size=2)
    prompts = ["a red cube", "two dogs on a beach at sunset", "x", "a very long prompt " * 8, "Blue!"]
    images = [random_image(s, seed=i) for i, s in enumerate(SIZES)]
    want = []
    with torch.no_grad():  # ImageReward.py score(prompt, image), one pair at a time
        for prompt, img in zip(prompts, images):
            text = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = authors_vit(state, imagereward_transform()(img)[None], heads=4)
            txt = authors_bert(state, text.input_ids, text.attention_mask, image_embeds, heads=4)[:, 0, :].float()
            for j in (0, 2, 4, 6, 7):  # the MLP's Linear layers; dropout is off in eval
                txt = linear(txt, state, f"mlp.layers.{j}")
            want.append(((txt - 0.16717362830052426) / 1.0333394966054072)[0, 0])
    want = torch.stack(want)
    assert want.std() > 0.1  # the images and prompts give different rewards
    torch.testing.assert_close(torch.tensor(scorer(prompts, images)), want, rtol=1e-5, atol=1e-5)
    scorer.batch_size = 5
    torch.testing.assert_close(torch.tensor(scorer(prompts, images)), want, rtol=1e-5, atol=1e-5)


def test_imagereward_checkpoint_missing_weights_is_refused():
    state, _, _ = authors_checkpoint(143, dv=32)
    del state["blip.visual_encoder.blocks.1.norm2.weight"]
    with pytest.raises(SailError, match="lacks 1 weights"):
        imagereward.load_imagereward_state(imagereward.tiny_imagereward(), state)


def test_imagereward_needs_no_extra_package_and_says_where_its_files_go(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # the image-reward package is not installed
    metrics.check_metric("imagereward")
    with pytest.raises(SailError, match="SAIL_IMAGEREWARD_PATH to a folder with ImageReward.pt and med_config.json"):
        metrics.load_scorer("imagereward", path=str(tmp_path))


def test_tiny_imagereward_metric_is_deterministic_and_batch_free():
    prompts, images = ["a red cube", "x", "two dogs"], [random_image(s, seed=i) for i, s in enumerate(SIZES[2:])]
    first = metrics.load_scorer("tiny-imagereward", batch_size=1)(prompts, images)
    np.testing.assert_allclose(first, metrics.load_scorer("tiny-imagereward", batch_size=3)(prompts, images), atol=1e-6)
    assert all(math.isfinite(v) for v in first)


# ---------------------------------------------------------------- PickScore
def transformers4_clip_processor(img, size=224):
    """CLIPImageProcessor of transformers 4.x (github:huggingface/transformers 06053b84c14d72e9789fbf27844a75aa89b3ded7,
    models/clip/image_processing_clip.py with image_transforms.py): the short side to `size` by PIL bicubic,
    the long side int(size * long / short), a centre crop at (h - size) // 2, x / 255 (float64, then float32), normalise."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(size * long / short)
    img = img.convert("RGB").resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    a = (a[top:top + size, left:left + size].astype(np.float64) * (1 / 255)).astype(np.float32)
    a = (a - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)


@pytest.fixture(scope="module")
def pickscore(tmp_path_factory):
    """PickScore loaded through its real path from a processor folder laid out as laion/CLIP-ViT-H-14-laion2B-s32B-b79K."""
    folder = tmp_path_factory.mktemp("pickscore-processor")
    model, processor = scorers.tiny_clip()
    processor.tokenizer.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(  # the hub repo's file
        crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, feature_extractor_type="CLIPFeatureExtractor",
        image_mean=list(MEAN), image_std=list(STD), resample=3, size=224)))
    return scorers.PickScore(model=model, processor=str(folder))


@pytest.mark.parametrize("size", SIZES + [(301, 225)])  # 301 x 225: an odd crop margin, floored by transformers
def test_pickscore_pixels_are_transformers_4_clip_processor(pickscore, size):
    img = random_image(size)
    assert_same_pixels(pickscore.pixels([img])[0], transformers4_clip_processor(img))


def test_pickscore_processor_is_the_pil_one_although_torchvision_is_installed(pickscore):
    pytest.importorskip("torchvision")
    for processor in (pickscore.processor, scorers.tiny_clip()[1]):
        assert "Torchvision" not in " ".join(c.__name__ for c in type(processor.image_processor).__mro__)
        assert not type(processor.image_processor).__name__.endswith("Fast")


# ---------------------------------------------------------------- aesthetic predictor
def openai_clip_transform(n_px=224):
    """github:openai/CLIP d05afc436d78f1c48dc0dbf8e5980a9d471f35f6 clip/clip.py _transform (clip.load's preprocess)."""
    return Compose([Resize(n_px, interpolation=InterpolationMode.BICUBIC), CenterCrop(n_px),
                    lambda im: im.convert("RGB"), ToTensor(), Normalize(MEAN, STD)])


@pytest.mark.parametrize("size", SIZES)
def test_aesthetic_pixels_are_openai_clip_preprocess(size):
    clip, _ = scorers.tiny_clip(image_size=224)
    scorer = scorers.Aesthetic(mlp=scorers.AestheticMLP(clip.config.projection_dim), clip=clip)
    img = random_image(size)
    assert_same_pixels(scorer.pixels([img])[0], openai_clip_transform()(img))


# ---------------------------------------------------------------- NaN scores
class NaNScorer(scorers.Scorer):
    name = "nan-metric"

    def score_batch(self, prompts, images):
        return [float("nan") if p == "bad" else 1.0 for p in prompts]


def test_nan_score_is_an_error_naming_image_and_prompt():
    images = [random_image((8, 8))] * 3
    with pytest.raises(SailError, match=r"nan-metric scored image b\.png \(prompt 'bad'\) nan"):
        NaNScorer(batch_size=2)(["ok", "bad", "ok"], images, names=["a.png", "b.png", "c.png"])
    with pytest.raises(SailError, match=r"image #1 \(prompt 'bad'\)"):
        NaNScorer()(["ok", "bad", "ok"], images)


def test_nan_in_the_statistics_is_an_error_not_a_loss():
    with pytest.raises(SailError, match="not finite"):
        reports.paired([float("nan"), 1.0], [0.0, 0.0])
    with pytest.raises(SailError, match="not finite"):
        reports.pair_accuracy([0.5, float("nan")])
    values = {("bench", "m"): {"base": {"p0": 1.0, "p1": 2.0}, "iter_01": {"p0": 1.5, "p1": float("nan")}}}
    with pytest.raises(SailError, match=r"iter_01.*prompt 'p1'"):
        reports.compare(values, ["base", "iter_01"], "base", n_boot=10)


def test_05_eval_names_the_image_file_of_a_nan_score(tmp_path):
    stage = load_stage("05_eval")
    rows = [dict(prompt_id="p0", prompt="ok"), dict(prompt_id="p1", prompt="bad")]
    (tmp_path / "images").mkdir()
    for r in rows:
        random_image((8, 8)).save(tmp_path / "images" / image_name(r["prompt_id"], 0))
    with pytest.raises(SailError, match=r"p1_0\.png \(prompt 'bad'\)"):
        stage.score(NaNScorer(), "nan-metric", tmp_path, rows, dict(seed=0, images_per_prompt=1))
    assert not (tmp_path / "scores.jsonl").exists()
