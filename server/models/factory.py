"""Tiny Stable Diffusion pipelines built from a seed, for tests and benchmarks.

Every size has the real topology of its family (``sd1``: a cross-attention
UNet2DConditionModel, an AutoencoderKL, a CLIP text encoder, a DPM++ scheduler;
``sd2``: linear transformer projections, an OpenCLIP-style encoder padding with
"!", v-prediction; ``sdxl``: two text encoders, the second with a projection,
``text_time`` added conditioning, a transformer depth of 2 in its last block),
only narrower and shallower, so LoRA, export and serving code runs on it
unchanged. A size and a seed fully determine the weights: two builds are equal
bit for bit.
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
    family: str = "sd1"
    # sd2 / sdxl topology
    attention_heads: tuple[int, ...] | None = None  # per block (SD 2.x / SDXL style); else attention_head_dim
    transformer_layers: tuple[int, ...] | None = None  # transformer depth per block (SDXL: 1, 2, 10)
    text2_hidden: int = 0  # SDXL's second text encoder width (0: none)
    text2_layers: int = 0
    time_embed_dim: int = 0  # SDXL's addition_time_embed_dim
    prediction_type: str = "epsilon"
    vae_scaling_factor: float = 0.18215

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
        # SDXL topology: three UNet levels as SDXL (no attention at the top level, none in the last
        # up block), transformer depth 2 in the deepest level and the mid block, two text encoders.
        FactorySpec(
            name="tiny-sdxl",
            resolution=64,
            unet_channels=(32, 64, 64),
            unet_down_blocks=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            unet_up_blocks=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            unet_layers_per_block=2,
            attention_head_dim=8,
            attention_heads=(2, 4, 8),
            transformer_layers=(1, 1, 2),
            text_hidden=32,
            text_layers=3,
            text_heads=4,
            text_intermediate=37,
            text2_hidden=32,
            text2_layers=3,
            time_embed_dim=8,
            vae_channels=(32, 64),
            vae_layers_per_block=1,
            family="sdxl",
            vae_scaling_factor=0.13025,
        ),
        # SD 2.x topology: linear projections, per-block head counts, an OpenCLIP-style encoder,
        # v-prediction (as the 768 px SD 2.x models).
        FactorySpec(
            name="tiny-sd2",
            resolution=64,
            unet_channels=(32, 64),
            unet_down_blocks=("CrossAttnDownBlock2D", "DownBlock2D"),
            unet_up_blocks=("UpBlock2D", "CrossAttnUpBlock2D"),
            unet_layers_per_block=2,
            attention_head_dim=8,
            attention_heads=(2, 4),
            text_hidden=32,
            text_layers=3,
            text_heads=4,
            text_intermediate=37,
            vae_channels=(32, 64),
            vae_layers_per_block=1,
            family="sd2",
            prediction_type="v_prediction",
        ),
    )
}


def _seeded(seed: int, offset: int) -> None:
    torch.manual_seed(seed * 1009 + offset)


def build_unet(spec: FactorySpec, seed: int):
    from diffusers import UNet2DConditionModel

    _seeded(seed, 1)
    extra: dict = {}
    if spec.family in ("sd2", "sdxl"):
        extra["use_linear_projection"] = True
    if spec.transformer_layers is not None:
        extra["transformer_layers_per_block"] = spec.transformer_layers
    if spec.family == "sdxl":
        extra.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=spec.time_embed_dim,
            projection_class_embeddings_input_dim=6 * spec.time_embed_dim + spec.text2_hidden,
        )
    return UNet2DConditionModel(
        sample_size=spec.resolution // spec.vae_scale_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=spec.unet_channels,
        down_block_types=spec.unet_down_blocks,
        up_block_types=spec.unet_up_blocks,
        layers_per_block=spec.unet_layers_per_block,
        attention_head_dim=spec.attention_heads or spec.attention_head_dim,
        cross_attention_dim=spec.text_hidden + spec.text2_hidden,
        norm_num_groups=32,
        **extra,
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
        scaling_factor=spec.vae_scaling_factor,
        force_upcast=spec.family == "sdxl",
    )


def _text_config(hidden: int, layers: int, spec: FactorySpec, *, open_clip: bool):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=clip.VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=layers,
        num_attention_heads=spec.text_heads,
        max_position_embeddings=clip.MAX_LENGTH,
        hidden_act="gelu" if open_clip else "quick_gelu",
        bos_token_id=clip.BOS_TOKEN_ID,
        eos_token_id=clip.EOS_TOKEN_ID,
        pad_token_id=clip.OPEN_CLIP_PAD_ID if open_clip else clip.EOS_TOKEN_ID,
        projection_dim=hidden,
    )


def build_text_encoder(spec: FactorySpec, seed: int):
    """The (first) text encoder: CLIP ViT-L style, or OpenCLIP style for SD 2.x."""
    from transformers import CLIPTextModel

    _seeded(seed, 3)
    config = _text_config(spec.text_hidden, spec.text_layers, spec, open_clip=spec.family == "sd2")
    return CLIPTextModel(config).eval()


def build_text_encoder_2(spec: FactorySpec, seed: int):
    """SDXL's second text encoder: OpenCLIP bigG style, with the projection of its pooled output."""
    from transformers import CLIPTextModelWithProjection

    _seeded(seed, 4)
    config = _text_config(spec.text2_hidden, spec.text2_layers, spec, open_clip=True)
    return CLIPTextModelWithProjection(config).eval()


def build_scheduler(prediction_type: str = "epsilon"):
    """DPM++ 2M with SD's noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type=prediction_type,
        steps_offset=1,
    )


def build_pipeline(size: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A pipeline of the given factory size (``StableDiffusionPipeline``, or
    ``StableDiffusionXLPipeline`` for an SDXL size), deterministic in ``seed``."""
    from server.models.noise import quiet_library_noise

    quiet_library_noise()
    try:
        spec = SPECS[size]
    except KeyError:
        raise ValueError(f"unknown factory size {size!r}; choose one of {', '.join(SPECS)}") from None
    if spec.family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline(
            vae=build_vae(spec, seed).eval(),
            text_encoder=build_text_encoder(spec, seed),
            text_encoder_2=build_text_encoder_2(spec, seed),
            tokenizer=clip.clip_tokenizer(),
            tokenizer_2=clip.clip_tokenizer(pad_token=clip.OPEN_CLIP_PAD),
            unet=build_unet(spec, seed).eval(),
            scheduler=build_scheduler(spec.prediction_type),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pad = clip.OPEN_CLIP_PAD if spec.family == "sd2" else clip.EOS_TOKEN
        pipeline = StableDiffusionPipeline(
            vae=build_vae(spec, seed).eval(),
            text_encoder=build_text_encoder(spec, seed),
            tokenizer=clip.clip_tokenizer(pad_token=pad),
            unet=build_unet(spec, seed).eval(),
            scheduler=build_scheduler(spec.prediction_type),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)


# The published model each real size copies the component configs of (server/models/*_configs.py).
REAL_SIZES: dict[str, str] = {"sd15": "SD 1.5", "sdxl": "SDXL base 1.0"}


def build_real_size(
    name: str, seed: int = 0, dtype: torch.dtype = torch.float32, *, device: str | torch.device = "cpu"
):
    """A pipeline with the exact component configs of SD 1.5 (``sd15``) or SDXL base 1.0
    (``sdxl``) and seeded random weights: benchmarks at the sizes users run.

    Gigabytes and half a minute or more to build (SD 1.5 ~4.3 GB, SDXL ~14 GB in float32),
    so never in tests but on ``device="meta"`` (the topology and shapes, no weights);
    ``bench`` builds each once and caches it as a diffusers folder.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel, schedulers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from server.models.checkpoint_configs import shipped
    from server.models.families import SD1, SDXL
    from server.models.noise import quiet_library_noise

    quiet_library_noise()
    if name not in REAL_SIZES:
        raise ValueError(f"unknown real size {name!r}; choose one of {', '.join(REAL_SIZES)}")
    family = SDXL if name == "sdxl" else SD1
    configs = shipped(family, "epsilon")[1]
    scheduler_config = configs["scheduler"]
    scheduler = getattr(schedulers, scheduler_config["_class_name"]).from_config(scheduler_config)
    with torch.device(device):
        _seeded(seed, 1)
        unet = UNet2DConditionModel.from_config(configs["unet"]).eval()
        _seeded(seed, 2)
        vae = AutoencoderKL.from_config(configs["vae"]).eval()
        _seeded(seed, 3)
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(configs["text_encoder"])).eval()
        _seeded(seed, 4)
        encoder_2 = (
            CLIPTextModelWithProjection(CLIPTextConfig.from_dict(configs["text_encoder_2"])).eval()
            if family is SDXL
            else None
        )
    if family is SDXL:
        from diffusers import StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=encoder_2,
            tokenizer=clip.clip_tokenizer(),
            tokenizer_2=clip.clip_tokenizer(pad_token=clip.OPEN_CLIP_PAD),
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
    else:
        from diffusers import StableDiffusionPipeline

        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=clip.clip_tokenizer(),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
