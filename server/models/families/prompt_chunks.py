"""A prompt as the families' ``encode`` feeds it to a CLIP text encoder, A1111's way: parsed for
emphasis, cut into chunks of 75 tokens (:mod:`server.models.emphasis`), each chunk one row of
start + tokens + end + padding ids (77), encoded on its own; the weights then scale each token's
hidden state and the chunk's mean is restored (A1111's "Original" emphasis).

A prompt without emphasis or ``BREAK`` and at most 75 tokens is one chunk whose ids are exactly
what diffusers' tokenizer call gives (``padding="max_length"``, ``truncation=True``), and whose
weights are all 1 (nothing is multiplied): its encoding is diffusers' bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.models.emphasis import Chunk, prompt_chunks


@dataclass(frozen=True)
class TokenChunk:
    """One chunk as the encoder reads it."""

    ids: torch.Tensor  # (1, width): start, tokens, end, padding
    mask: torch.Tensor  # (1, width): 1 over start, tokens and end; 0 over the padding
    weights: torch.Tensor | None  # (width,) float32 emphasis; None when every weight is 1


def tokenize_chunks(tokenizer, text: str, device: torch.device, *, count: int = 0) -> list[TokenChunk]:
    """``text``'s chunks for ``tokenizer`` (at least ``count``: empty chunks are added, A1111's padding)."""
    width = int(tokenizer.model_max_length)

    def ids_of(texts: list[str]) -> list[list[int]]:
        return tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False)["input_ids"]

    chunks = prompt_chunks(text, ids_of, comma=comma_id(tokenizer), length=width - 2)
    chunks += [Chunk() for _ in range(count - len(chunks))]
    return [_row(tokenizer, chunk, width, device) for chunk in chunks]


def comma_id(tokenizer) -> int | None:
    """The id of a ``,`` token (A1111's comma backtracking), or None if the vocabulary has none."""
    token = tokenizer.convert_tokens_to_ids(",</w>")
    return None if token is None or token == tokenizer.unk_token_id else int(token)


def _row(tokenizer, chunk: Chunk, width: int, device: torch.device) -> TokenChunk:
    used = len(chunk.tokens) + 2
    ids = [tokenizer.bos_token_id, *chunk.tokens, tokenizer.eos_token_id]
    ids += [tokenizer.pad_token_id] * (width - used)
    mask = [1] * used + [0] * (width - used)
    weights = None
    if any(weight != 1.0 for weight in chunk.weights):
        weights = torch.tensor([1.0, *chunk.weights, *[1.0] * (width - used + 1)], dtype=torch.float32)
    return TokenChunk(
        ids=torch.tensor([ids], dtype=torch.long, device=device),
        mask=torch.tensor([mask], dtype=torch.long, device=device),
        weights=weights,
    )


# Below this share of the states' mean magnitude, a mean is rounding noise, not a level to restore.
ZERO_MEAN = 1e-4


def emphasize(states: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """A1111's "Original" emphasis of one chunk's states (1, width, dim): each token's state times
    its weight, then the whole chunk rescaled to its mean before weighting (in float32).

    An encoder whose states average zero (a final layer norm without a bias, as the toy model's)
    has no mean to restore (A1111 divides by a rounding error there): the states are only
    weighted, as A1111's "No norm" emphasis does.
    """
    if weights is None:
        return states
    z = states.float()
    original_mean = z.mean()
    z = z * weights.to(z.device).reshape(1, -1, 1)
    new_mean = z.mean()
    floor = ZERO_MEAN * float(z.abs().mean())
    if abs(float(original_mean)) > floor and abs(float(new_mean)) > floor:
        z = z * (original_mean / new_mean)
    return z.to(states.dtype)


def final_layer_norm(encoder):
    """The encoder's final layer norm (a CLIP skip's hidden state goes through it, as diffusers'):
    ``encoder.final_layer_norm`` (transformers 5), or ``encoder.text_model.final_layer_norm``."""
    for owner in (encoder, getattr(encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None) if owner is not None else None
        if norm is not None:
            return norm
    raise ValueError(
        f"clip_skip above 1 needs the text encoder's final layer norm; {type(encoder).__name__} has none"
    )
