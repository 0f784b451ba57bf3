"""The tiny models are the released SD1.5 / SDXL in everything but size: the saved config files of
tiny-sd15 / tiny-sdxl equal configs.py's released configs on every key that is not a width,
a depth or the vocabulary."""
import json
from pathlib import Path

import pytest

from sail import configs, models

SIZE_KEYS = {
    "unet": {"block_out_channels", "layers_per_block", "norm_num_groups", "sample_size", "down_block_types",
             "up_block_types", "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
             "addition_time_embed_dim", "projection_class_embeddings_input_dim"},
    "vae": {"block_out_channels", "down_block_types", "up_block_types", "layers_per_block", "norm_num_groups",
            "sample_size"},
    "text": {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "projection_dim",
             "vocab_size"},
}


def saved(folder, name):
    path = Path(folder) / name
    return json.loads(path.read_text())


def assert_same_except_size(tiny, released, kind, where):
    for key, value in released.items():
        if key in SIZE_KEYS.get(kind, ()) or key.startswith("_") and key != "_class_name":
            continue
        got = tiny.get(key)
        got, value = (list(got) if isinstance(got, (list, tuple)) else got), (list(value) if isinstance(value, tuple) else value)
        assert got == value, f"{where}: {key} is {got!r}, released {value!r}"


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_tiny_models_keep_every_released_setting_but_size(arch):
    folder = models.resolve_model_path(f"tiny:{arch}")
    released = configs.released_configs(arch)
    scheduler = saved(folder, "scheduler/scheduler_config.json")
    assert scheduler["_class_name"] == {"sd15": "PNDMScheduler", "sdxl": "EulerDiscreteScheduler"}[arch]
    assert saved(folder, "model_index.json")["scheduler"] == ["diffusers", scheduler["_class_name"]]
    assert_same_except_size(scheduler, released["scheduler"], "scheduler", "scheduler")
    assert scheduler.get("prediction_type", "epsilon") == "epsilon"

    vae = saved(folder, "vae/config.json")
    assert_same_except_size(vae, released["vae"], "vae", "vae")
    assert vae["scaling_factor"] == {"sd15": 0.18215, "sdxl": 0.13025}[arch] and vae["force_upcast"] is True

    encoders = ["text_encoder", "text_encoder_2"][:len(released["text"])]
    for name, text in zip(encoders, released["text"]):
        assert_same_except_size(saved(folder, f"{name}/config.json"), text, "text", name)
    assert saved(folder, "text_encoder/config.json")["hidden_act"] == "quick_gelu"  # CLIP ViT-L/14

    unet = saved(folder, "unet/config.json")
    assert_same_except_size(unet, released["unet"], "unet", "unet")
    blocks = released["unet"]["down_block_types"]
    tiny_blocks = tuple(unet["down_block_types"])
    assert any(blocks[i:i + len(tiny_blocks)] == tiny_blocks for i in range(len(blocks))), "block layout not released"

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(folder)
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if arch == "sdxl" else [])
    for tokenizer, expected in zip(tokenizers, released["tokenizers"]):
        assert tokenizer.model_max_length == 77 and tokenizer.pad_token == expected["pad_token"]
    if arch == "sdxl":
        assert saved(folder, "text_encoder_2/config.json")["hidden_act"] == "gelu"  # OpenCLIP ViT-bigG/14
        # time ids: six of addition_time_embed_dim each, then the pooled embedding of encoder 2
        projection = pipe.text_encoder_2.config.projection_dim
        assert unet["projection_class_embeddings_input_dim"] == configs.TIME_IDS * unet["addition_time_embed_dim"] + projection


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_text_encoders_pool_at_the_end_of_text_token(arch):
    """The released encoders keep eos_token_id 2, so transformers pools where the token id is highest:
    the byte vocabulary of the tiny models puts <|endoftext|> last, as CLIP's does."""
    import torch
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(models.resolve_model_path(f"tiny:{arch}"))
    encoder = pipe.text_encoder_2 if arch == "sdxl" else pipe.text_encoder
    tokenizer = pipe.tokenizer_2 if arch == "sdxl" else pipe.tokenizer
    ids = tokenizer(["a red square"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert encoder.config.eos_token_id == 2 and eos == len(tokenizer) - 1
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
    pooled = out.text_embeds if arch == "sdxl" else out.pooler_output
    at_end = out.last_hidden_state[0, ids[0].tolist().index(eos)]
    expected = encoder.text_projection(at_end) if arch == "sdxl" else at_end
    torch.testing.assert_close(pooled[0], expected)


def test_tiny_sdxl_text_encoders_differ_in_width_as_released():
    """SDXL's second text encoder is the wider one and the UNet attends to both side by side: loaders
    such as from_single_file tell the encoders apart by width, so the tiny model keeps that order."""
    for cfg in (configs.released_configs("sdxl"), configs.tiny_configs("sdxl", 300)):
        widths = [t["hidden_size"] for t in cfg["text"]]
        assert widths[0] < widths[1] and cfg["unet"]["cross_attention_dim"] == sum(widths)
        assert cfg["text"][1]["projection_dim"] == widths[1]
