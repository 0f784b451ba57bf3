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
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sail.common import CACHE_DIR, SailError

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
            open_clip = optional_import("open_clip", "pip install open_clip_torch", version)
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


def tiny_clip(seed=0, image_size=32):
    """A small random-weight CLIPModel and its processor, built offline (same seed, same weights)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    from sail.tiny import write_byte_tokenizer
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
