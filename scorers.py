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
PickScore, ImageReward and the aesthetic predictor need only the kit's requirements (transformers);
HPSv2 needs `pip install open_clip_torch`. ImageReward is built here from transformers' port of
BLIP with the weights of THUDM/ImageReward: the `image-reward` package does not import under
transformers 5 and pins timm 0.6.13, which open_clip (timm>=1.0.17) cannot use.
A NaN or infinite score stops the evaluation with the image and prompt it came from.
`tiny-pickscore`, `tiny-aesthetic` and `tiny-imagereward` are the same architectures with small
random weights, built offline: they exercise the whole evaluation on a CPU but measure nothing.
"""
import importlib
import json
import math
import os
import string
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from run_files import SailError, log
from sail_models import CACHE_DIR

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# metric -> (environment variable, default location). A location is a hub id, a folder or a file.
LOCATIONS = {
    "pickscore": ("SAIL_PICKSCORE_PATH", "yuvalkirstain/PickScore_v1"),
    "pickscore-processor": ("SAIL_PICKSCORE_PROCESSOR_PATH", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv2": ("SAIL_HPSV2_PATH", "xswu/HPSv2/HPS_v2_compressed.pt"),
    "hpsv2.1": ("SAIL_HPSV21_PATH", "xswu/HPSv2/HPS_v2.1_compressed.pt"),
    "imagereward": ("SAIL_IMAGEREWARD_PATH", "THUDM/ImageReward"),  # ImageReward.pt and med_config.json
    "imagereward-tokenizer": ("SAIL_IMAGEREWARD_TOKENIZER_PATH", "bert-base-uncased"),
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


def clip_pixels(images, size, mean=CLIP_MEAN, std=CLIP_STD):
    """OpenAI CLIP's preprocessing in PIL + numpy (what its torchvision transform does on PIL images):
    Resize(size, bicubic) on the short side, CenterCrop(size), ToTensor, Normalize (the aesthetic
    predictor's CLIP, ImageReward)."""
    arrays = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        if min(w, h) != size:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = size, int(size * long / short)
            img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
        w, h = img.size
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        img = img.crop((left, top, left + size, top + size))
        arrays.append(np.asarray(img, dtype=np.float32) / 255.0)
    arrays = (np.stack(arrays) - np.array(mean, np.float32)) / np.array(std, np.float32)
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def hps_pixels(images, size, mean=CLIP_MEAN, std=CLIP_STD):
    """HPSv2's preprocessing (image_transform(..., resize_longest_max=True) of the hpsv2 package's
    open_clip): to a float tensor, the long side to `size` (bicubic, antialiased, unclamped), zero
    padding to a square, Normalize. Written out because the hpsv2 package does not install beside the
    kit (it pins pytest==7.2.0, protobuf<4) and open_clip 3's resize_mode='longest' resizes in PIL."""
    import torchvision.transforms.functional as TF
    out = []
    for img in images:
        x = TF.to_tensor(img.convert("RGB"))
        h, w = x.shape[1:]
        scale = size / float(max(h, w))
        if scale != 1.0:
            h, w = round(h * scale), round(w * scale)
            x = TF.resize(x, [h, w], TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.pad(x, [(size - w) // 2, (size - h) // 2, size - w - (size - w) // 2, size - h - (size - h) // 2], fill=0)
        out.append(TF.normalize(x, mean, std))
    return torch.stack(out)


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

    def __call__(self, prompts, images, names=None):
        """names: what an error calls each image (a path); by default its index."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        out = []
        for start in range(0, len(images), self.batch_size):
            sl = slice(start, start + self.batch_size)
            with torch.no_grad():
                out.extend(float(v) for v in self.score_batch(list(prompts[sl]), list(images[sl])))
        for i, v in enumerate(out):
            if not math.isfinite(v):
                raise SailError(f"{self.name} scored image {names[i] if names else f'#{i}'} (prompt {prompts[i]!r}) "
                                f"{v}: a broken image or model; a NaN would count as a loss in the win rate")
        return out

    def pixels(self, images):
        """The model's input tensor for these images, with its authors' preprocessing."""
        raise NotImplementedError

    def score_batch(self, prompts, images):
        raise NotImplementedError


def pil_clip_image_processor():
    """The PIL CLIPImageProcessor class, which PickScore's authors used (transformers 4.x calls it
    CLIPImageProcessor; 5.x calls it CLIPImageProcessorPil and picks a torchvision one when it can)."""
    import transformers
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class PickScore(Scorer):
    """As the PickScore model card: the laion CLIP-H processor, normalised embeddings, logit_scale * cos."""
    name = "pickscore"

    def __init__(self, model=None, processor=None, **kw):
        super().__init__(**kw)
        from transformers import AutoTokenizer, CLIPModel, CLIPProcessor
        if model is None or isinstance(model, (str, Path)):
            model = _from_pretrained(CLIPModel, str(location("pickscore", model)), "PickScore")
        if processor is None or isinstance(processor, (str, Path)):
            where = str(location("pickscore-processor", processor))
            image_processor = _from_pretrained(pil_clip_image_processor(), where, "the PickScore processor")
            processor = CLIPProcessor(image_processor=image_processor,
                                      tokenizer=_from_pretrained(AutoTokenizer, where, "the PickScore tokenizer"))
        self.model, self.processor = model.eval().to(self.device, self.dtype), processor

    def pixels(self, images):
        return self.processor(images=images, return_tensors="pt")["pixel_values"]

    def score_batch(self, prompts, images):
        pixels = self.pixels(images).to(self.device, self.dtype)
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

    def pixels(self, images):
        return clip_pixels(images, self.size)

    def score_batch(self, prompts, images):
        pixels = self.pixels(images).to(self.device, self.dtype)
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
        self.mean = getattr(model.visual, "image_mean", None) or CLIP_MEAN
        self.std = getattr(model.visual, "image_std", None) or CLIP_STD

    def pixels(self, images):
        return hps_pixels(images, self.size, self.mean, self.std)

    def score_batch(self, prompts, images):
        pixels = self.pixels(images).to(self.device, self.dtype)
        img = F.normalize(self.model.encode_image(pixels).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(prompts).to(self.device)).float(), dim=-1)
        return (100.0 * (img * txt).sum(-1)).cpu()


# ImageReward.pt's names (BLIP's vit.py and med.py) -> BlipReward's (transformers' port of BLIP), in this order
IMAGEREWARD_RENAMES = [("blip.text_encoder.", "text_encoder."), ("blip.visual_encoder.", "visual_encoder."),
                       ("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                       ("patch_embed.proj", "embeddings.patch_embedding"), ("blocks.", "encoder.layers."),
                       (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
                       (".attn.proj.", ".self_attn.projection."), ("visual_encoder.norm.", "visual_encoder.post_layernorm.")]
# BLIP's create_vit("large") at 224 px, as ImageReward builds it (timm-style LayerNorm eps 1e-6)
BLIP_LARGE_VIT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      image_size=224, patch_size=16, layer_norm_eps=1e-6)
MED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act", "pad_token_id")


class BlipReward(torch.nn.Module):
    """ImageReward's model (THUDM/ImageReward, ImageReward.py): BLIP's ViT, its BERT cross-attending to
    the image tokens, the MLP on the [CLS] output, then (r - mean) / std."""
    mean, std = 0.16717362830052426, 1.0333394966054072

    def __init__(self, vision, text, tokenizer):
        super().__init__()
        from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel
        self.visual_encoder = BlipVisionModel(BlipVisionConfig(**vision))
        # is_decoder=True builds the cross-attention layers (med.py's add_cross_attention); the forward stays bidirectional
        text = dict(text, encoder_hidden_size=vision["hidden_size"], is_decoder=True, bos_token_id=tokenizer.bos_token_id)
        self.text_encoder = BlipTextModel(BlipTextConfig(**text), add_pooling_layer=False)
        self.mlp = AestheticMLP(text["hidden_size"])  # ImageReward's MLP: the same layers
        self.tokenizer, self.size = tokenizer, vision["image_size"]

    def forward(self, input_ids, attention_mask, pixels):
        image = self.visual_encoder(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        out = self.text_encoder(input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                encoder_attention_mask=image_atts)
        return ((self.mlp(out.last_hidden_state[:, 0, :].float()) - self.mean) / self.std).squeeze(-1)


def blip_tokenizer(tokenizer):
    """BLIP's init_tokenizer: a BERT tokenizer with [DEC] and [ENC] added."""
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_blip_reward(where, tokenizer=None):
    """BlipReward from ImageReward.pt and med_config.json in a folder (or beside a file) or a hub repo."""
    from transformers import BertTokenizer
    try:
        if Path(where).exists():
            folder = Path(where) if Path(where).is_dir() else Path(where).parent
            files = [folder / "ImageReward.pt", folder / "med_config.json"]
        else:
            from huggingface_hub import hf_hub_download
            files = [hf_hub_download(where, name) for name in ("ImageReward.pt", "med_config.json")]
        state, med = torch.load(files[0], map_location="cpu", weights_only=True), json.loads(Path(files[1]).read_text())
    except Exception as err:
        raise SailError(f"cannot load ImageReward from '{where}' ({err}); set SAIL_IMAGEREWARD_PATH to a folder with "
                        "ImageReward.pt and med_config.json (from the hub repo THUDM/ImageReward)") from None
    tokenizer = blip_tokenizer(_from_pretrained(BertTokenizer, str(location("imagereward-tokenizer", tokenizer)),
                                                "ImageReward's BERT tokenizer (bert-base-uncased)"))
    model = BlipReward(BLIP_LARGE_VIT, {k: med[k] for k in MED_KEYS if k in med}, tokenizer)
    return load_imagereward_state(model, state)


def load_imagereward_state(model, state):
    """Load a state dict with ImageReward.pt's names into a BlipReward; its other keys (BLIP's projections) are unused."""
    renamed = {}
    for key, value in state.items():
        for old, new in IMAGEREWARD_RENAMES:
            key = key.replace(old, new, 1)
        renamed[key] = value
    missing = sorted(set(dict(model.named_parameters())) - set(renamed))
    if missing:
        raise SailError(f"the ImageReward checkpoint lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    model.load_state_dict({k: v for k, v in renamed.items() if k in model.state_dict()}, strict=False)  # buffers may lack
    return model


class ImageReward(Scorer):
    """ImageReward v1.0, batched the way its package's score() computes one pair: prompts padded to 35 tokens."""
    name = "imagereward"

    def __init__(self, model=None, tokenizer=None, **kw):
        super().__init__(**kw)
        if model is None or isinstance(model, (str, Path)):
            model = load_blip_reward(str(location("imagereward", model)), tokenizer)
        self.model = model.eval().to(self.device, self.dtype)
        self.model.mlp.float()  # the authors' MLP takes the [CLS] output in float32

    def pixels(self, images):
        return clip_pixels(images, self.model.size)

    def score_batch(self, prompts, images):
        text = self.model.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        pixels = self.pixels(images).to(self.device, self.dtype)
        return self.model(text.input_ids.to(self.device), text.attention_mask.to(self.device), pixels).float().cpu()


class Oracle(Scorer):
    """The toy world's ground truth: toy_world.oracle_score(prompt, image)."""
    name = "oracle"

    def score_batch(self, prompts, images):
        toy_world = optional_import(*NEEDS["oracle"], "oracle")
        return [toy_world.oracle_score(p, img) for p, img in zip(prompts, images)]


def tiny_clip(seed=0, image_size=32):
    """A small random-weight CLIPModel and its processor, built offline (same seed, same weights)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from sail_models import write_byte_tokenizer
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
        image_processor=pil_clip_image_processor()(size={"shortest_edge": image_size},
                                                   crop_size={"height": image_size, "width": image_size}),
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77))
    return model.eval(), processor


def _tiny_aesthetic(**kw):
    clip, _ = tiny_clip(seed=1)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        mlp = AestheticMLP(clip.config.projection_dim)
    return Aesthetic(mlp=mlp, clip=clip, **kw)


def tiny_imagereward(seed=0):
    """A BlipReward with small random weights (224 px input, as ImageReward) and a character-level BERT
    vocabulary, built offline (same seed, same weights)."""
    from transformers import BertTokenizer
    folder = CACHE_DIR / "tiny-bert-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab))
    tokenizer = blip_tokenizer(BertTokenizer(str(folder / "vocab.txt")))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                  patch_size=32, layer_norm_eps=1e-6, initializer_range=0.02)
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return BlipReward(vision, text, tokenizer).eval()


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
    "tiny-imagereward": ("tiny I.R.", 4, lambda path, **kw: ImageReward(model=tiny_imagereward(), **kw)),
}
# metric -> (module it imports, how to get it)
NEEDS = {"hpsv2": ("open_clip", "pip install open_clip_torch"), "hpsv2.1": ("open_clip", "pip install open_clip_torch"),
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

    def __call__(self, prompts, images, names=None):
        self.scorer = self.scorer or load_scorer(self.name, **self.kw)
        return self.scorer(prompts, images, names)


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


def finite(values, what):
    """values as float64, or a SailError naming the rows that are NaN or infinite."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values))
        raise SailError(f"{what}: {values[bad[0]]} at row {bad[0]} ({len(bad)} rows not finite)")
    return values


def paired(a, b, n_boot=1000, seed=0):
    """a against b, prompt by prompt: mean difference and win rate (a tie counts half), with CIs."""
    d = finite(a, "paired scores") - finite(b, "paired reference scores")
    wins = (d > 0) + 0.5 * (d == 0)
    return dict(delta=float(d.mean()), delta_ci=list(bootstrap_ci(d, n_boot=n_boot, seed=seed)),
                win=float(wins.mean()), win_ci=list(bootstrap_ci(wins, n_boot=n_boot, seed=seed)), n=int(len(d)))


def pair_accuracy(margins, n_boot=1000, seed=0):
    """Share of pairs with sigma(r_w - r_l) > 0.5, i.e. margin r_w - r_l > 0; a tie counts as wrong."""
    margins = finite(margins, "reward margins")
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
        for m in have:
            bad = [(i, v) for i, v in by_model[m].items() if not math.isfinite(v)]
            if bad:
                raise SailError(f"{m}, {key}: score {bad[0][1]} for prompt {bad[0][0]!r} ({len(bad)} prompts not finite)")
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


def plot_metrics(series, models, out_path, title="", columns=None, reference=None):
    """series: {metric label: {line label: [(mean, low, high) or None per model]}} -> one panel per metric,
    columns panels to a row (default: all in one row); reference: {metric label: value}, a dotted line
    (the base model's, say). matplotlib is optional: without it the plot is skipped with a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed (pip install matplotlib): skipping %s", out_path)
        return False
    columns = columns or len(series)
    rows = -(-len(series) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.2 * rows), squeeze=False)
    for ax, (metric, lines) in zip(axes.flat, series.items()):
        for label, points in lines.items():
            xs = [i for i, p in enumerate(points) if p]
            means = np.array([points[i][0] for i in xs])
            err = np.array([[means[k] - points[i][1], points[i][2] - means[k]] for k, i in enumerate(xs)]).T
            ax.errorbar(xs, means, yerr=np.nan_to_num(err), marker="o", capsize=3, label=label)
        if reference and reference.get(metric) is not None:
            ax.axhline(reference[metric], color="black", lw=0.8, ls=":")
        ax.set_xticks(range(len(models)), models, rotation=30)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes.flat[len(series):]:
        ax.axis("off")
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
