"""Component configs of Stable Diffusion 2.1, shipped so single files load offline.

``SD2_768_V_CONFIGS`` are ``stabilityai/stable-diffusion-2-1``'s (768 px, v-prediction): a UNet
with per-block head widths (5, 10, 20, 20 heads of 64), linear transformer projections and
1024-wide cross-attention; the OpenCLIP ViT-H text encoder as diffusers converts it (a CLIP text
model of 23 layers: OpenCLIP's last layer is dropped, SD 2.x reads the penultimate one); the
SD 1.x VAE; DDIM with v-prediction. ``SD2_512_BASE_CONFIGS`` (``stable-diffusion-2-1-base``)
differ only in the prediction type (epsilon) and the sample size (512 px).
"""

from __future__ import annotations

import copy
from typing import Any

MODEL_INDEX: dict[str, Any] = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "safety_checker": [None, None],
    "requires_safety_checker": False,
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD2_768_V_CONFIGS: dict[str, dict[str, Any]] = {
    "model_index": MODEL_INDEX,
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 1024,
        "down_block_types": [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ],
        "downsample_padding": 1,
        "dual_cross_attention": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": 4,
        "sample_size": 96,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": True,
        "use_linear_projection": True,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 768,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_size": 1024,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 4096,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "pad_token_id": 1,
        "projection_dim": 512,
        "vocab_size": 49408,
    },
    "scheduler": {
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "num_train_timesteps": 1000,
        "prediction_type": "v_prediction",
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
    },
}


def _base_variant() -> dict[str, dict[str, Any]]:
    configs = copy.deepcopy(SD2_768_V_CONFIGS)
    configs["unet"]["sample_size"] = 64
    configs["vae"]["sample_size"] = 512
    configs["scheduler"]["prediction_type"] = "epsilon"
    return configs


SD2_512_BASE_CONFIGS: dict[str, dict[str, Any]] = _base_variant()


def sd2_configs(prediction_type: str) -> dict[str, dict[str, Any]]:
    """The 768-v configs for ``v_prediction``, the 512-base ones for ``epsilon``."""
    return SD2_768_V_CONFIGS if prediction_type == "v_prediction" else SD2_512_BASE_CONFIGS
