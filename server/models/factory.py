"""Tiny Stable Diffusion pipelines built from a seed, for tests and benchmarks.

Every size has the real SD 1.x topology (a cross-attention UNet2DConditionModel,
an AutoencoderKL, a CLIP text encoder, a DPM++ scheduler), only narrower and
shallower, so LoRA, export and serving code runs on it unchanged. A size and a
seed fully determine the weights: two builds are equal bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.models import tokenizer as clip


@dataclass(frozen=True)
class FactorySpec:
    """The shape of one factory model size."""

    name: str
    resolution: int
    unet_channels: tuple[int, ...]
    unet_down_blocks: tuple[str, ...]
    unet_up_blocks: tuple[str, ...]
    unet_layers_per_block: int
    attention_head_dim: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


SPECS: dict[str, FactorySpec] = {
    spec.name: spec
    for spec in (
        FactorySpec(
            name="micro",
            resolution=32,
            unet_channels=(32, 64),
            unet_down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"),
            unet_up_blocks=("CrossAttnUpBlock2D", "UpBlock2D"),
            unet_layers_per_block=1,
            attention_head_dim=8,
            text_hidden=32,
            text_layers=2,
            text_heads=4,
            text_intermediate=64,
            vae_channels=(32, 64),
            vae_layers_per_block=1,
        ),
        FactorySpec(
            name="tiny",
            resolution=64,
            unet_channels=(32, 64),
            unet_down_blocks=("DownBlock2D", "CrossAttnDownBlock2D"),
            unet_up_blocks=("CrossAttnUpBlock2D", "UpBlock2D"),
            unet_layers_per_block=2,
            attention_head_dim=8,
            text_hidden=32,
            text_layers=5,
            text_heads=4,
            text_intermediate=37,
            vae_channels=(32, 64),
            vae_layers_per_block=1,
        ),
        # The trained built-in model's shape (weights: server/models/data/toy, see server.models.toy).
        FactorySpec(
            name="toy",
            resolution=64,
            unet_channels=(32, 64),
            unet_down_blocks=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            unet_up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            unet_layers_per_block=1,
            attention_head_dim=8,
            text_hidden=64,
            text_layers=2,
            text_heads=4,
            text_intermediate=128,
            vae_channels=(32, 64, 64),
            vae_layers_per_block=1,
        ),
        FactorySpec(
            name="small",
            resolution=256,
            unet_channels=(64, 128, 256, 256),
            unet_down_blocks=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            unet_layers_per_block=2,
            attention_head_dim=8,
            text_hidden=128,
            text_layers=4,
            text_heads=4,
            text_intermediate=512,
            vae_channels=(32, 64, 128, 128),
            vae_layers_per_block=1,
        ),
    )
}


def _seeded(seed: int, offset: int) -> None:
    torch.manual_seed(seed * 1009 + offset)


def build_unet(spec: FactorySpec, seed: int):
    from diffusers import UNet2DConditionModel

    _seeded(seed, 1)
    return UNet2DConditionModel(
        sample_size=spec.resolution // spec.vae_scale_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        down_block_types=spec.unet_down_blocks,
        up_block_types=spec.unet_up_blocks,
        layers_per_block=spec.unet_layers_per_block,
        attention_head_dim=spec.attention_head_dim,
        cross_attention_dim=spec.text_hidden,
        norm_num_groups=32,
    )


def build_vae(spec: FactorySpec, seed: int):
    from diffusers import AutoencoderKL

    _seeded(seed, 2)
    blocks = len(spec.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=spec.vae_channels,
        layers_per_block=spec.vae_layers_per_block,
        latent_channels=4,
        sample_size=spec.resolution,
        norm_num_groups=32,
    )


def build_text_encoder(spec: FactorySpec, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    _seeded(seed, 3)
    config = CLIPTextConfig(
        vocab_size=clip.VOCAB_SIZE,
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=clip.MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=clip.BOS_TOKEN_ID,
        eos_token_id=clip.EOS_TOKEN_ID,
        pad_token_id=clip.EOS_TOKEN_ID,
        projection_dim=spec.text_hidden,
    )
    return CLIPTextModel(config).eval()


def build_scheduler():
    """DPM++ 2M with SD 1.x's noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        steps_offset=1,
    )


def build_pipeline(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``StableDiffusionPipeline`` of the given factory size, deterministic in ``seed``."""
    from server.models.noise import quiet_library_noise

    quiet_library_noise()
    from diffusers import StableDiffusionPipeline

    try:
        spec = SPECS[size]
    except KeyError:
        raise ValueError(f"unknown factory size {size!r}; choose one of {', '.join(SPECS)}") from None
    pipeline = StableDiffusionPipeline(
        vae=build_vae(spec, seed).eval(),
        text_encoder=build_text_encoder(spec, seed),
        tokenizer=clip.clip_tokenizer(),
        unet=build_unet(spec, seed).eval(),
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
