"""The released SD1.5 and SDXL configurations the kit relies on, as data, and the tiny models
built from them.

The values are those of the config files of stable-diffusion-v1-5/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json, unet/, vae/,
text_encoder/, text_encoder_2/ config.json, tokenizer*/). `bench/speed.py` builds the full-size models
from them; `tiny_configs(arch)` shrinks only widths, depths and the vocabulary, so that a bug
hiding in a config difference (a scheduler class, a VAE scaling factor, an activation, the
time-id layout) shows on a CPU too.
"""
import copy

# scheduler/scheduler_config.json. SD1.5 samples with PNDM, SDXL with Euler; training and the
# self-reward noise with DDPM's forward process built from these (sail/dpo.py: forward_process).
SCHEDULERS = {
    "sd15": dict(_class_name="PNDMScheduler", beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
                 steps_offset=1, trained_betas=None),
    "sdxl": dict(_class_name="EulerDiscreteScheduler", beta_end=0.012, beta_schedule="scaled_linear",
                 beta_start=0.00085, clip_sample=False, interpolation_type="linear", num_train_timesteps=1000,
                 prediction_type="epsilon", sample_max_value=1.0, set_alpha_to_one=False, skip_prk_steps=True,
                 steps_offset=1, timestep_spacing="leading", trained_betas=None, use_karras_sigmas=False),
}

# text_encoder*/config.json. The released configs keep CLIP's legacy token ids (bos 0, eos 2,
# pad 1): with eos_token_id == 2 transformers pools at the highest token id, <|endoftext|>.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77, vocab_size=49408,
              bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5)
OPENCLIP_BIGG = dict(CLIP_L, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280, hidden_act="gelu")

# tokenizer*/: 77 tokens; SDXL's second tokenizer pads with "!" instead of <|endoftext|>.
TOKENIZERS = {"sd15": [dict(model_max_length=77, pad_token="<|endoftext|>")],
              "sdxl": [dict(model_max_length=77, pad_token="<|endoftext|>"), dict(model_max_length=77, pad_token="!")]}

_VAE = dict(act_fn="silu", block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, in_channels=3, out_channels=3, latent_channels=4,
            layers_per_block=2, norm_num_groups=32, force_upcast=True)
VAES = {"sd15": dict(_VAE, sample_size=512, scaling_factor=0.18215),
        "sdxl": dict(_VAE, sample_size=1024, scaling_factor=0.13025)}

_UNET = dict(act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
             in_channels=4, out_channels=4, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-5,
             norm_num_groups=32)
UNETS = {
    "sd15": dict(_UNET, block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, sample_size=64),
    # SDXL conditions on size and crop: 6 time ids of addition_time_embed_dim each, plus the pooled
    # text embedding of encoder 2 (6 * 256 + 1280 = 2816).
    "sdxl": dict(_UNET, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20),  # diffusers' name for the number of heads (64 channels each)
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True,
                 sample_size=128),
}
TEXT_ENCODERS = {"sd15": [CLIP_L], "sdxl": [CLIP_L, OPENCLIP_BIGG]}  # SDXL's second one projects
TIME_IDS = 6  # SDXL: original size (h, w), crop top-left (y, x), target size (h, w)


def released_configs(arch):
    """Deep copies of the released model's configs: scheduler, unet, vae, text (list), tokenizers (list)."""
    return copy.deepcopy(dict(scheduler=SCHEDULERS[arch], unet=UNETS[arch], vae=VAES[arch],
                              text=TEXT_ENCODERS[arch], tokenizers=TOKENIZERS[arch]))


def tiny_configs(arch, vocab_size):
    """The released configs with small widths and depths and the given vocabulary; every other key
    (scheduler, activations, scaling factor, token ids, time-id layout, block types) as released."""
    cfg = released_configs(arch)
    # SDXL's second encoder is the wider one (1280 vs 768); single-file loaders tell the two apart by width
    widths = (32, 48)
    text = [dict(t, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2, num_attention_heads=4, projection_dim=w,
                 vocab_size=vocab_size) for t, w in zip(cfg["text"], widths)]
    unet = cfg["unet"]
    unet.update(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, sample_size=16)
    if arch == "sdxl":  # the first two of SDXL's three blocks: no attention, then cross-attention
        unet.update(down_block_types=unet["down_block_types"][:2], up_block_types=unet["up_block_types"][-2:],
                    transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), cross_attention_dim=sum(widths),
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=TIME_IDS * 8 + text[1]["projection_dim"])
    else:  # the last two of SD1.5's four blocks: cross-attention, then none
        unet.update(down_block_types=unet["down_block_types"][-2:], up_block_types=unet["up_block_types"][:2],
                    attention_head_dim=4, cross_attention_dim=32)
    cfg["vae"].update(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                      up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8, sample_size=32)
    cfg["text"] = text
    return cfg
