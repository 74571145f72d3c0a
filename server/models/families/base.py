"""The family interface and the conditioning a UNet step is called with."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# Rows of different lengths are tiled up to the least common multiple of their lengths when it is
# at most this many times the longest; beyond, they are padded with empty-prompt chunks.
MAX_TILING = 4


@dataclass(frozen=True)
class Conditioning:
    """A prompt's encoding: the cross-attention states, and SDXL's added conditioning.

    A long prompt has more tokens (77 per chunk of 75). Rows of different lengths (a long prompt
    and its short negative, or batch mates) are made one length by :meth:`cat`.
    """

    embeds: torch.Tensor  # (n, tokens, dim)
    pooled: torch.Tensor | None = None  # (n, projection): SDXL's pooled text embedding
    time_ids: torch.Tensor | None = None  # (n, 6): SDXL's (original size, crop, target size)
    # The empty prompt's encoding, one chunk (1, 77, dim), made when asked: what :meth:`cat` pads
    # this row with when tiling would cost too much.
    padding: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def repeat(self, n: int) -> Conditioning:
        """This encoding for ``n`` images (the prompt's one row repeated)."""

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            return tensor.repeat(n, *([1] * (tensor.dim() - 1)))

        return Conditioning(rows(self.embeds), rows(self.pooled), rows(self.time_ids), self.padding)

    @property
    def tokens(self) -> int:
        return int(self.embeds.shape[1])

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """The parts' rows as one batch; rows of different token counts are made one length.

        Tiling: each part's states repeated whole up to the least common multiple of the lengths.
        Cross-attention over keys and values repeated k times equals attention over them once, so
        a tiled row conditions the UNet as it would alone (as A1111 running prompt and negative
        in separate passes, and ComfyUI's batching); a short prompt's image does not depend on a
        long one beside it. When the multiple is over ``MAX_TILING`` times the longest, the
        shorter rows are padded with the empty prompt's chunks instead (A1111's "pad
        prompt/negative prompt" option), which changes their images somewhat.
        """
        lengths = {part.tokens for part in parts}
        if len(lengths) > 1:
            longest, common = max(lengths), math.lcm(*lengths)
            if common <= MAX_TILING * longest:
                parts = [part.tiled(common // part.tokens) for part in parts]
            else:
                parts = [part.padded(longest) for part in parts]

        def joined(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
            return None if tensors[0] is None else torch.cat(tensors)  # type: ignore[arg-type]

        return Conditioning(
            torch.cat([part.embeds for part in parts]),
            joined([part.pooled for part in parts]),
            joined([part.time_ids for part in parts]),
        )

    def tiled(self, times: int) -> Conditioning:
        """Each row's states repeated ``times`` times along the tokens (the same attention)."""
        if times == 1:
            return self
        embeds = self.embeds.repeat(1, times, 1)
        return Conditioning(embeds, self.pooled, self.time_ids, self.padding)

    def padded(self, tokens: int) -> Conditioning:
        """Each row followed by empty-prompt chunks up to ``tokens`` (A1111's padding)."""
        missing = tokens - self.tokens
        if missing == 0:
            return self
        chunk = None if self.padding is None else self.padding()
        if chunk is None or missing % chunk.shape[1]:
            raise ValueError(
                f"cannot pad a conditioning of {self.tokens} tokens to {tokens}: "
                f"no empty-prompt chunk that fits"
            )
        rows = self.embeds.shape[0]
        pad = chunk.to(self.embeds.dtype).to(self.embeds.device).repeat(rows, missing // chunk.shape[1], 1)
        embeds = torch.cat([self.embeds, pad], dim=1)
        return Conditioning(embeds, self.pooled, self.time_ids, self.padding)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeds.dtype

    def unet_kwargs(self) -> dict[str, Any]:
        """The keyword arguments ``UNet2DConditionModel.forward`` takes this conditioning as."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


# A1111 / ComfyUI's "latent2rgb" approximation of SD 1.x/2.x's VAE: latent channel -> RGB.
SD_LATENT_RGB: tuple[tuple[float, float, float], ...] = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)


class Encoder(Protocol):
    """A prompt's conditioning, one row: ``clip_skip`` in A1111's numbering (1 = the last layer);
    ``height``/``width`` the image size (SDXL conditions on it); ``negative``: the negative prompt."""

    def __call__(
        self, pipeline: Any, text: str, *, height: int, width: int, negative: bool, clip_skip: int = 1
    ) -> Conditioning: ...


@dataclass(frozen=True)
class Family:
    """One model family: its identity, its components and how it conditions the UNet."""

    name: str  # sd1 | sd2 | sdxl
    architecture: str  # the base's identity in the store: sd_v1 | sd_v2 | sdxl
    title: str  # what a person calls it
    pipeline_class: str  # the diffusers pipeline a folder of this family loads as
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    resolution: int  # the native size of the real models
    kohya_version: str  # ss_base_model_version kohya writes
    encode: Encoder
    matches: Callable[[Any], bool]  # whether a loaded pipeline is of this family
    latent_rgb: tuple[tuple[float, float, float], ...] = SD_LATENT_RGB  # for cheap previews

    @property
    def weight_components(self) -> tuple[str, ...]:
        """The components that hold weights (fingerprinted, frozen, moved between devices)."""
        return ("unet", "vae", *self.text_encoders)

    @property
    def required_components(self) -> tuple[str, ...]:
        """What a diffusers folder of this family must have."""
        return (*self.weight_components, *self.tokenizers, "scheduler")

    def pipeline_type(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)
