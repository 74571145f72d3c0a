"""SD 2.x: an OpenCLIP ViT-H text encoder (1024 wide, converted as a CLIP text model whose last
layer is dropped), linear projections in the UNet's transformers, v-prediction for the 768 px model.

The conditioning is SD 1.x's (the last hidden state of the converted encoder); what differs is the
component configs, the tokenizer's padding and the prediction type, which the checkpoint carries.
"""

from __future__ import annotations

from server.models.families.base import Family
from server.models.families.sd1 import encode_last_hidden

OPEN_CLIP_WIDTH = 1024


def _matches(pipeline) -> bool:
    unet = getattr(pipeline, "unet", None)
    if unet is None:
        return False
    config = unet.config
    # SD 2.x: the OpenCLIP-H width, or (the factory's tiny SD 2.x) linear projections with a
    # "!"-padding tokenizer, OpenCLIP's. (A backend's UNet stand-in may not carry these fields.)
    if getattr(config, "cross_attention_dim", None) == OPEN_CLIP_WIDTH:
        return True
    tokenizer = getattr(pipeline, "tokenizer", None)
    linear = bool(getattr(config, "use_linear_projection", False))
    return linear and getattr(tokenizer, "pad_token", None) == "!"


SD2 = Family(
    name="sd2",
    architecture="sd_v2",
    title="Stable Diffusion 2.x",
    pipeline_class="StableDiffusionPipeline",
    text_encoders=("text_encoder",),
    tokenizers=("tokenizer",),
    resolution=768,
    kohya_version="sd_v2",
    encode=encode_last_hidden,
    matches=_matches,
)
