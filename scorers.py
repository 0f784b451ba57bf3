"""The metric models of the evaluation (PickScore, HPSv2/HPSv2.1, ImageReward, LAION aesthetic
predictor v2, the toy world's oracle) and the statistics and reports built from their scores.

Each scorer maps (prompts, images) -> one float per pair, with its authors' preprocessing and
formula, at the scale the papers report:
    PickScore    logit_scale * cos(text, image) of a CLIP ViT-H/14 fine-tune        (~21)
    HPSv2(.1)    100 * cos(text, image) of an open_clip ViT-H-14 fine-tune           (~27)
    ImageReward  (MLP(BLIP cross-attended [CLS]) - 0.16717) / 1.03334                (~0-1)
    aesthetic    MLP(image embedding of CLIP ViT-L/14 / its L2 norm)                  (~5-6)
A scorer takes a hub id, a local folder (or file), or an already-built model object; where the
model lives is also set by environment variables (SAIL_PICKSCORE_PATH, ...; see LOCATIONS).
HPSv2 needs `pip install open_clip_torch`, ImageReward `pip install image-reward`.
`tiny-pickscore` and `tiny-aesthetic` are the same architectures with small random weights, built
offline: they exercise the whole evaluation on a CPU but measure nothing.
"""
import importlib
import math
import os
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from sail_common import CACHE_DIR, SailError, log

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# metric -> (environment variable, default location). A location is a hub id, a folder or a file.
LOCATIONS = {
    "pickscore": ("SAIL_PICKSCORE_PATH", "yuvalkirstain/PickScore_v1"),
    "pickscore-processor": ("SAIL_PICKSCORE_PROCESSOR_PATH", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv2": ("SAIL_HPSV2_PATH", "xswu/HPSv2/HPS_v2_compressed.pt"),
    "hpsv2.1": ("SAIL_HPSV21_PATH", "xswu/HPSv2/HPS_v2.1_compressed.pt"),
    "imagereward": ("SAIL_IMAGEREWARD_PATH", "ImageReward-v1.0"),
    "aesthetic": ("SAIL_AESTHETIC_PATH", "https://github.com/christophschuhmann/improved-aesthetic-predictor"
                                         "/raw/main/sac%2Blogos%2Bava1-l14-linearMSE.pth"),
    "aesthetic-clip": ("SAIL_AESTHETIC_CLIP_PATH", "openai/clip-vit-large-patch14"),
}


def location(key, given=None):
    env, default = LOCATIONS[key]
    return given or os.environ.get(env) or default


def optional_import(module, install, what):
    """Import an optional extra, or stop with one message saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise SailError(f"{what} needs the module '{module}', which is missing ({err}); {install}") from None


def clip_pixels(images, size, mode="crop", mean=CLIP_MEAN, std=CLIP_STD):
    """OpenAI CLIP / open_clip preprocessing in PIL + numpy (what torchvision does on PIL images).
    crop: Resize(size, bicubic) on the short side, then CenterCrop(size) (CLIP, the aesthetic predictor).
    pad: the long side to size, bicubic, then zero padding to a square (HPSv2's ResizeMaxSize)."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        if mode == "crop":
            if min(w, h) != size:
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = size, int(size * long / short)
                img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
            w, h = img.size
            top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        elif mode == "pad":
            scale = size / float(max(h, w))
            if scale != 1.0:
                new_h, new_w = round(h * scale), round(w * scale)
                canvas = Image.new("RGB", (size, size), (0, 0, 0))
                canvas.paste(img.resize((new_w, new_h), Image.BICUBIC), ((size - new_w) // 2, (size - new_h) // 2))
                img = canvas
        else:
            raise ValueError(f"unknown mode {mode}")
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    arrays = (np.stack(arrays) - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def _features(out):
    """transformers 5 returns a model output with pooler_output from get_*_features; 4.x a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def _from_pretrained(cls, where, what):
    try:
        return cls.from_pretrained(where)
    except (OSError, ValueError) as err:
        raise SailError(f"cannot load {what} from '{where}' ({err}); point it at a local copy") from None


class Scorer:
    """scorer(prompts, images) -> list of floats, one per (prompt, image) pair, in batches."""
    name, batch_size = "?", 32

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None):
        self.device, self.dtype = torch.device(device), dtype
        self.batch_size = batch_size or self.batch_size

    def __call__(self, prompts, images):
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        out = []
        for start in range(0, len(images), self.batch_size):
            sl = slice(start, start + self.batch_size)
            with torch.no_grad():
                out.extend(float(v) for v in self.score_batch(list(prompts[sl]), list(images[sl])))
        return out

    def score_batch(self, prompts, images):
        raise NotImplementedError


class PickScore(Scorer):
    """As the PickScore model card: the laion CLIP-H processor, normalised embeddings, logit_scale * cos."""
    name = "pickscore"

    def __init__(self, model=None, processor=None, **kw):
        super().__init__(**kw)
        from transformers import AutoProcessor, CLIPModel
        if model is None or isinstance(model, (str, Path)):
            model = _from_pretrained(CLIPModel, str(location("pickscore", model)), "PickScore")
        if processor is None or isinstance(processor, (str, Path)):
            processor = _from_pretrained(AutoProcessor, str(location("pickscore-processor", processor)),
                                         "the PickScore processor")
        self.model, self.processor = model.eval().to(self.device, self.dtype), processor

    def score_batch(self, prompts, images):
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        text = self.processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = text.to(self.device)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        txt = F.normalize(_features(self.model.get_text_features(**text)).float(), dim=-1)
        return (self.model.logit_scale.exp().float() * (img * txt).sum(-1)).cpu()


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head (its layer names, so its .pth loads as is)."""

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class Aesthetic(Scorer):
    """LAION aesthetic predictor v2: the MLP on the L2-normalised CLIP ViT-L/14 image embedding."""
    name = "aesthetic"

    def __init__(self, mlp=None, clip=None, **kw):
        super().__init__(**kw)
        from transformers import CLIPModel
        if clip is None or isinstance(clip, (str, Path)):
            clip = _from_pretrained(CLIPModel, str(location("aesthetic-clip", clip)), "CLIP ViT-L/14")
        if mlp is None or isinstance(mlp, (str, Path)):
            where = str(location("aesthetic", mlp))
            try:
                state = (torch.hub.load_state_dict_from_url(where, map_location="cpu") if "://" in where
                         else torch.load(where, map_location="cpu", weights_only=True))
            except Exception as err:
                raise SailError(f"cannot load the aesthetic predictor from '{where}' ({err}); "
                                "set SAIL_AESTHETIC_PATH to a local sac+logos+ava1-l14-linearMSE.pth") from None
            mlp = AestheticMLP(state["layers.0.weight"].shape[1])
            mlp.load_state_dict(state)
        self.clip, self.mlp = clip.eval().to(self.device, self.dtype), mlp.eval().to(self.device)
        self.size = clip.config.vision_config.image_size

    def score_batch(self, prompts, images):
        pixels = clip_pixels(images, self.size).to(self.device, self.dtype)
        emb = _features(self.clip.get_image_features(pixel_values=pixels)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.mlp(emb).squeeze(-1).cpu()


class HPSv2(Scorer):
    """HPSv2 / HPSv2.1: open_clip ViT-H-14 with the HPS checkpoint; 100 * cos of the features."""
    name = "hpsv2"

    def __init__(self, version="hpsv2", checkpoint=None, model=None, tokenizer=None, **kw):
        super().__init__(**kw)
        self.name = version
        if model is None:
            open_clip = optional_import(*NEEDS[version], version)
            model = open_clip.create_model("ViT-H-14", pretrained=None)
            where = str(location(version, checkpoint))
            if Path(where).is_dir():
                where = str(Path(where) / LOCATIONS[version][1].split("/")[-1])
            elif not Path(where).is_file():
                from huggingface_hub import hf_hub_download
                repo, filename = where.rsplit("/", 1)
                try:
                    where = hf_hub_download(repo, filename)
                except Exception as err:
                    raise SailError(f"cannot fetch {filename} from {repo} ({err}); set {LOCATIONS[version][0]}") from None
            state = torch.load(where, map_location="cpu", weights_only=False)
            model.load_state_dict(state.get("state_dict", state))
            tokenizer = open_clip.get_tokenizer("ViT-H-14")
        self.model, self.tokenizer = model.eval().to(self.device, self.dtype), tokenizer
        size = getattr(model.visual, "image_size", 224)
        self.size = size[0] if isinstance(size, (tuple, list)) else size

    def score_batch(self, prompts, images):
        pixels = clip_pixels(images, self.size, mode="pad").to(self.device, self.dtype)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return (100.0 * (img * txt).sum(-1)).cpu()


class ImageReward(Scorer):
    """ImageReward v1.0 through its package, batched the way its score() computes one pair."""
    name = "imagereward"

    def __init__(self, model=None, **kw):
        super().__init__(**kw)
        if model is None or isinstance(model, (str, Path)):
            rm = optional_import(*NEEDS["imagereward"], "imagereward")
            where = str(location("imagereward", model))
            folder = Path(where) if Path(where).is_dir() else None
            local = dict(download_root=str(folder), med_config=str(folder / "med_config.json")) if folder else {}
            try:
                model = rm.load(str(folder / "ImageReward.pt") if folder else where, device=self.device, **local)
            except Exception as err:
                raise SailError(f"cannot load ImageReward from '{where}' ({err}); set SAIL_IMAGEREWARD_PATH "
                                "to a folder with ImageReward.pt and med_config.json") from None
        self.model = model.eval().to(self.device)

    def score_batch(self, prompts, images):
        m = self.model
        text = m.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        text = text.to(self.device)
        image_embeds = m.blip.visual_encoder(torch.stack([m.preprocess(img) for img in images]).to(self.device))
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = m.blip.text_encoder(text.input_ids, attention_mask=text.attention_mask, encoder_hidden_states=image_embeds,
                                  encoder_attention_mask=image_atts, return_dict=True)
        rewards = m.mlp(out.last_hidden_state[:, 0, :].float())
        return ((rewards - m.mean) / m.std).squeeze(-1).cpu()


class Oracle(Scorer):
    """The toy world's ground truth: toy_world.oracle_score(prompt, image)."""
    name = "oracle"

    def score_batch(self, prompts, images):
        toy_world = optional_import(*NEEDS["oracle"], "oracle")
        return [toy_world.oracle_score(p, img) for p, img in zip(prompts, images)]


def tiny_clip(seed=0, image_size=32):
    """A small random-weight CLIPModel and its processor, built offline (same seed, same weights)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from sail_common import write_byte_tokenizer
    folder = CACHE_DIR / "tiny-clip-tokenizer"
    vocab = write_byte_tokenizer(folder)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=vocab,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, max_position_embeddings=77)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": image_size},
                                           crop_size={"height": image_size, "width": image_size}),
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77))
    return model.eval(), processor


def _tiny_aesthetic(**kw):
    clip, _ = tiny_clip(seed=1)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        mlp = AestheticMLP(clip.config.projection_dim)
    return Aesthetic(mlp=mlp, clip=clip, **kw)


# name -> (table label, decimals, factory(path, **kw))
METRICS = {
    "pickscore": ("P.S.", 2, lambda path, **kw: PickScore(model=path, **kw)),
    "imagereward": ("I.R.", 4, lambda path, **kw: ImageReward(model=path, **kw)),
    "aesthetic": ("Aes.", 2, lambda path, **kw: Aesthetic(mlp=path, **kw)),
    "hpsv2": ("HPSv2", 2, lambda path, **kw: HPSv2("hpsv2", checkpoint=path, **kw)),
    "hpsv2.1": ("HPSv2.1", 2, lambda path, **kw: HPSv2("hpsv2.1", checkpoint=path, **kw)),
    "oracle": ("Oracle", 4, lambda path, **kw: Oracle(**kw)),
    "tiny-pickscore": ("tiny P.S.", 4, lambda path, **kw: PickScore(*tiny_clip(), **kw)),
    "tiny-aesthetic": ("tiny Aes.", 4, lambda path, **kw: _tiny_aesthetic(**kw)),
}
# metric -> (module it imports, how to get it)
NEEDS = {"hpsv2": ("open_clip", "pip install open_clip_torch"), "hpsv2.1": ("open_clip", "pip install open_clip_torch"),
         "imagereward": ("ImageReward", "pip install image-reward"),
         "oracle": ("toy_world", "it is the kit's toy_world.py: run from the kit's folder")}


def check_metric(name):
    """Fail early, before any image is generated, on an unknown metric or a missing extra."""
    if name not in METRICS:
        raise SailError(f"unknown metric '{name}'; choose from: {', '.join(METRICS)}")
    if name in NEEDS:
        optional_import(*NEEDS[name], name)


def load_scorer(name, device="cpu", path=None, batch_size=None, dtype=torch.float32):
    check_metric(name)
    scorer = METRICS[name][2](path, device=device, dtype=dtype, batch_size=batch_size)
    scorer.name = name
    return scorer


class LazyScorer:
    """load_scorer on the first call: a rerun that finds every score there never loads the model."""

    def __init__(self, name, **kw):
        self.name, self.kw, self.scorer = name, kw, None

    def __call__(self, prompts, images):
        self.scorer = self.scorer or load_scorer(self.name, **self.kw)
        return self.scorer(prompts, images)


# ---------------------------------------------------------------- statistics
def bootstrap_ci(values, stat=np.mean, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap over the rows of `values` (prompts); returns (low, high)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(values), size=(n_boot, len(values)))
    stats = stat(values[idx], axis=1)
    return tuple(float(q) for q in np.quantile(stats, [(1 - level) / 2, (1 + level) / 2]))


def summarize(values, n_boot=1000, seed=0):
    values = np.asarray(values, dtype=np.float64)
    return dict(mean=float(values.mean()), std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                n=int(len(values)), ci95=list(bootstrap_ci(values, n_boot=n_boot, seed=seed)))


def paired(a, b, n_boot=1000, seed=0):
    """a against b, prompt by prompt: mean difference and win rate (a tie counts half), with CIs."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    wins = (d > 0) + 0.5 * (d == 0)
    return dict(delta=float(d.mean()), delta_ci=list(bootstrap_ci(d, n_boot=n_boot, seed=seed)),
                win=float(wins.mean()), win_ci=list(bootstrap_ci(wins, n_boot=n_boot, seed=seed)), n=int(len(d)))


def pair_accuracy(margins, n_boot=1000, seed=0):
    """Share of pairs with sigma(r_w - r_l) > 0.5, i.e. margin r_w - r_l > 0; a tie counts as wrong."""
    margins = np.asarray(margins, dtype=np.float64)
    correct = (margins > 0).astype(np.float64)
    return dict(accuracy=float(correct.mean()), ci95=list(bootstrap_ci(correct, n_boot=n_boot, seed=seed)),
                ties=int((margins == 0).sum()), n=int(len(margins)))


# ---------------------------------------------------------------- reports
def write_text_atomic(path, text):
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def accuracy_table(title, results):
    """results: {model: [dict(method, accuracy, ci95, ties, n)]} -> markdown (Figure 5 as a table)."""
    lines = [f"## {title}", "", "sigma(r_w - r_l) > 0.5 counts as right; a tie counts as wrong.", "",
             "| Model | Reward | Accuracy [95% CI] | Ties |", "|---|---|---|---|"]
    lines += [f"| {model} | {r['method']} | {100 * r['accuracy']:.1f}% [{100 * r['ci95'][0]:.1f}, "
              f"{100 * r['ci95'][1]:.1f}] | {r['ties']} of {r['n']} |" for model, rs in results.items() for r in rs]
    return "\n".join(lines) + "\n"


def _fmt(x, dec, sign=False):
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{'+' if sign else ''}.{dec}f}"


def _mean_cell(s, dec):
    return f"{_fmt(s['mean'], dec)} [{_fmt(s['ci95'][0], dec)}, {_fmt(s['ci95'][1], dec)}]" if s else "–"


def compare(values, models, ref, n_boot=1000):
    """values[key][model] = {prompt_id: score}. Per key: the prompts shared by every model that has
    scores (n), each model's summary on them, and each model's paired comparison against `ref`."""
    out = {}
    for key, by_model in values.items():
        have = [m for m in models if by_model.get(m)]
        ids = sorted(set.intersection(*(set(by_model[m]) for m in have))) if have else []
        vec = {m: [by_model[m][i] for i in ids] for m in have} if ids else {}
        out[key] = dict(n=len(ids), summary={m: summarize(v, n_boot) for m, v in vec.items()},
                        paired={m: paired(v, vec[ref], n_boot) for m, v in vec.items() if ref in vec and m != ref})
    return out


def markdown_table(title, columns, models, stats, ref):
    """The layout of the paper's Tables 1-2, then the answer to "did it get better?" against `ref`.
    columns: [(key, label, decimals)]; stats: from compare()."""
    head = "| Model | " + " | ".join(label for _, label, _ in columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    lines = [f"## {title}", "", "Mean score [95% bootstrap CI over prompts].", "", head, rule]
    for m in models:
        cells = [_mean_cell(stats[key]["summary"].get(m), dec) for key, _, dec in columns]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", f"Prompts per column: {', '.join(str(n) for n in sorted({stats[k]['n'] for k, _, _ in columns}))}.", ""]
    if not any(stats[key]["paired"] for key, _, _ in columns):
        return "\n".join(lines) + "\n"
    lines += [f"Against {ref}, prompt by prompt on the same seeds: mean difference [95% CI] / win rate [95% CI] "
              "(a tie counts half).", "", head, rule]
    for m in models:
        if m == ref:
            continue
        cells = []
        for key, _, dec in columns:
            p = stats[key]["paired"].get(m)
            cells.append("–" if p is None else
                         f"{_fmt(p['delta'], dec, True)} [{_fmt(p['delta_ci'][0], dec, True)}, "
                         f"{_fmt(p['delta_ci'][1], dec, True)}] / {100 * p['win']:.1f}% "
                         f"[{100 * p['win_ci'][0]:.1f}, {100 * p['win_ci'][1]:.1f}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def image_grid(rows, models, out_path, label_width=220):
    """rows: [(prompt, [image path per model])]; one column per model, the same seed in a row."""
    first = Image.open(rows[0][1][0])
    cell = max(128, min(256, first.width))
    font = ImageFont.load_default()
    grid = Image.new("RGB", (label_width + cell * len(models), 24 + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(models):
        draw.text((label_width + j * cell + 4, 4), name, fill="black", font=font)
    for i, (prompt, paths) in enumerate(rows):
        y = 24 + i * cell
        text = "\n".join(textwrap.wrap(" ".join(prompt.split()), 34)[: cell // 14])
        draw.multiline_text((4, y + 4), text, fill="black", font=font)
        for j, path in enumerate(paths):
            with Image.open(path) as img:
                grid.paste(img.convert("RGB").resize((cell, cell), Image.BICUBIC), (label_width + j * cell, y))
    tmp = Path(out_path).with_name(Path(out_path).stem + ".tmp.png")
    grid.save(tmp)
    os.replace(tmp, out_path)


def plot_metrics(series, models, out_path, title=""):
    """series: {metric label: {line label: [(mean, low, high) or None per model]}} -> one panel per metric.
    matplotlib is optional: without it the plot is skipped with a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install matplotlib): skipping %s", out_path)
        return False
    fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.2), squeeze=False)
    for ax, (metric, lines) in zip(axes[0], series.items()):
        for label, points in lines.items():
            xs = [i for i, p in enumerate(points) if p]
            means = np.array([points[i][0] for i in xs])
            err = np.array([[means[k] - points[i][1], points[i][2] - means[k]] for k, i in enumerate(xs)]).T
            ax.errorbar(xs, means, yerr=np.nan_to_num(err), marker="o", capsize=3, label=label)
        ax.set_xticks(range(len(models)), models, rotation=30)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, out_path)
    return True


def save_figure(fig, out_path):
    """Write a matplotlib figure to out_path (a temporary name, then renamed) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    tmp = Path(out_path).with_name(Path(out_path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_path)
