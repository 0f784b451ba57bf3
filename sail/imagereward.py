"""ImageReward built from transformers' port of BLIP with the weights of THUDM/ImageReward: the
`image-reward` package does not import under transformers 5 and pins timm 0.6.13, which open_clip
(timm>=1.0.17) cannot use. Score: (MLP(BLIP cross-attended [CLS]) - 0.16717) / 1.03334.
"""
import json
import string
from pathlib import Path

import torch

from sail.common import CACHE_DIR, SailError
from sail.scorers import AestheticMLP, Scorer, _from_pretrained, clip_pixels, location

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
