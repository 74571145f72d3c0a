"""Prompts read A1111's way: emphasis weights, chunks of 75 tokens, BREAK, clip skip; a short plain
prompt still encodes exactly as diffusers (bit for bit); conditionings of different lengths batch."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from adapters.errors import InvalidArgument
from server.api import convert as api_convert
from server.client import convert as client_convert
from server.engine import Engine, GenerateRequest
from server.engine.denoise import denoise_batch
from server.models.families import Conditioning, family_of
from server.models.families.base import MAX_TILING
from server.models.families.prompt_chunks import emphasize, tokenize_chunks
from server.models.loader import load_base_model
from server.models.toy.measures import CHROMA_THRESHOLD, MIN_SHAPE_PIXELS, _as_array, hue_degrees
from tests.engine.conftest import base_from

CPU = torch.device("cpu")
FAMILIES = ("tiny_pipeline", "tiny_sd2_pipeline", "tiny_sdxl_pipeline")
SHORT_PROMPTS = (
    "a red circle",
    "",
    "a photo: of, a cat; 'quoted' and émoji 🐱 - 12.5% {braces} <angles> break",
    "word " * 75,  # exactly 75 tokens
)
# 130 tokens, no comma: the chunks are simply tokens 0-74 and 75-129.
LONG_PROMPT = " ".join(["a red circle on a white background with"] * 16 + ["a blue"])


def encode(pipeline, text: str, *, negative: bool = False, clip_skip: int = 1) -> Conditioning:
    with torch.inference_mode():
        return family_of(pipeline).encode(
            pipeline, text, height=64, width=64, negative=negative, clip_skip=clip_skip
        )


def diffusers_encode(pipeline, text: str, clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """diffusers' own ``encode_prompt`` (A1111's clip skip n is diffusers' n - 1)."""
    with torch.inference_mode():
        out = pipeline.encode_prompt(
            text,
            device=CPU,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=None if clip_skip == 1 else clip_skip - 1,
        )
    return out[0], (out[2] if len(out) == 4 else None)


@pytest.fixture()
def text_model_alias(monkeypatch):
    """diffusers' SD ``encode_prompt(clip_skip=...)`` reads ``text_encoder.text_model.final_layer_norm``,
    which transformers 5 flattened away: give it that name for the reference call."""

    def alias(pipeline):
        encoder = pipeline.text_encoder
        if not hasattr(encoder, "text_model"):
            names = SimpleNamespace(final_layer_norm=encoder.final_layer_norm)
            monkeypatch.setitem(encoder.__dict__, "text_model", names)
        return pipeline

    return alias


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------ short prompts: diffusers' bits


@pytest.mark.parametrize("family", FAMILIES)
def test_short_plain_prompts_and_clip_skip_encode_as_diffusers_bit_for_bit(family, request, text_model_alias):
    pipeline = text_model_alias(request.getfixturevalue(family))
    assert token_count(pipeline.tokenizer, SHORT_PROMPTS[-1]) == 75
    for text in SHORT_PROMPTS:
        for clip_skip in (1, 2, 3):
            ours = encode(pipeline, text, clip_skip=clip_skip)
            embeds, pooled = diffusers_encode(pipeline, text, clip_skip)
            assert ours.embeds.shape[1] == 77
            assert torch.equal(ours.embeds, embeds), (text, clip_skip)
            if pooled is not None:
                assert torch.equal(ours.pooled, pooled)
    # Clip skip changes the states (each layer counts), and the last layer is the default.
    assert not torch.equal(encode(pipeline, "a cat", clip_skip=2).embeds, encode(pipeline, "a cat").embeds)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plain_prompts_chunk_is_the_tokenizers_own_ids(family, request):
    pipeline = request.getfixturevalue(family)
    for tokenizer in (pipeline.tokenizer, getattr(pipeline, "tokenizer_2", None)):
        if tokenizer is None:
            continue
        for text in SHORT_PROMPTS:
            (chunk,) = tokenize_chunks(tokenizer, text, CPU)
            ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            assert torch.equal(chunk.ids, ids.input_ids) and torch.equal(chunk.mask, ids.attention_mask)
            assert chunk.weights is None


def test_sdxls_empty_negative_prompt_stays_zeros(tiny_sdxl_pipeline):
    empty = encode(tiny_sdxl_pipeline, "", negative=True, clip_skip=2)
    assert empty.embeds.shape == (1, 77, 64) and not empty.embeds.any() and not empty.pooled.any()
    assert encode(tiny_sdxl_pipeline, "fog", negative=True).embeds.any()


@pytest.mark.parametrize("family", ("tiny_pipeline", "tiny_sdxl_pipeline"))
def test_clip_skip_draws_diffusers_images_bit_for_bit(family, request, text_model_alias):
    """Without guidance (no negative prompt: diffusers skips layers on the prompt only)."""
    pipeline = request.getfixturevalue(family)
    engine = Engine(base_from(pipeline, family))
    reference_pipeline = text_model_alias(copy.deepcopy(pipeline))
    ask = {"steps": 2, "seed": 5, "guidance_scale": 1.0}
    for clip_skip in (1, 2):
        ours = engine.generate(GenerateRequest("a red castle", clip_skip=clip_skip, **ask)).images
        reference = reference_pipeline(
            "a red castle",
            num_inference_steps=2,
            guidance_scale=1.0,
            clip_skip=None if clip_skip == 1 else clip_skip - 1,
            generator=torch.Generator().manual_seed(5),
        ).images
        assert np.asarray(ours[0]).tobytes() == np.asarray(reference[0]).tobytes(), clip_skip


# ------------------------------------------------------------------ long prompts and BREAK


def test_a_long_prompt_is_encoded_in_chunks_of_75_tokens(tiny_pipeline):
    tokenizer, encoder = tiny_pipeline.tokenizer, tiny_pipeline.text_encoder
    ids = tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
    assert len(ids) == 130
    ours = encode(tiny_pipeline, LONG_PROMPT).embeds
    assert ours.shape == (1, 154, 32)
    # Built by hand: each 75-token slice between start and end tokens, padded, encoded alone.
    expected = []
    for part in (ids[:75], ids[75:]):
        row = [tokenizer.bos_token_id, *part, tokenizer.eos_token_id]
        row += [tokenizer.pad_token_id] * (77 - len(row))
        with torch.inference_mode():
            expected.append(encoder(torch.tensor([row]))[0])
    assert torch.equal(ours, torch.cat(expected, dim=1))
    # The first chunk is what diffusers keeps (it truncates); the rest is read, not dropped.
    truncated, _ = diffusers_encode(tiny_pipeline, LONG_PROMPT)
    assert torch.equal(ours[:, :77], truncated)


def test_a_long_prompt_draws_differently_from_its_truncation(tiny_pipeline):
    engine = Engine(base_from(tiny_pipeline))
    tokenizer = tiny_pipeline.tokenizer
    ids = tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
    truncated = tokenizer.decode(ids[:75])
    assert encode(tiny_pipeline, truncated).embeds.shape[1] == 77
    ask = {"steps": 2, "seed": 3, "negative_prompt": "blurry"}  # a 1-chunk negative beside 2 chunks
    long_image = engine.generate(GenerateRequest(LONG_PROMPT, **ask)).images[0]
    short_image = engine.generate(GenerateRequest(truncated, **ask)).images[0]
    assert np.asarray(long_image).tobytes() != np.asarray(short_image).tobytes()


def test_sdxl_chunks_both_encoders_and_pools_the_first_chunk(tiny_sdxl_pipeline):
    ours = encode(tiny_sdxl_pipeline, LONG_PROMPT)
    assert ours.embeds.shape == (1, 154, 64) and ours.pooled.shape == (1, 32)
    truncated, pooled = diffusers_encode(tiny_sdxl_pipeline, LONG_PROMPT)
    assert torch.equal(ours.embeds[:, :77], truncated) and torch.equal(ours.pooled, pooled)
    ids = tiny_sdxl_pipeline.tokenizer(LONG_PROMPT, add_special_tokens=False).input_ids
    tail = tiny_sdxl_pipeline.tokenizer.decode(ids[75:])  # the second chunk's 55 tokens
    assert torch.equal(ours.embeds[:, 77:], encode(tiny_sdxl_pipeline, tail).embeds)


@pytest.mark.parametrize("family", ("tiny_pipeline", "tiny_sdxl_pipeline"))
def test_break_starts_a_new_chunk(family, request):
    pipeline = request.getfixturevalue(family)
    broken = encode(pipeline, "a red circle BREAK on a white background").embeds
    assert broken.shape[1] == 154
    assert torch.equal(broken[:, :77], encode(pipeline, "a red circle").embeds)
    assert torch.equal(broken[:, 77:], encode(pipeline, "on a white background").embeds)


# ------------------------------------------------------------------ emphasis


def test_emphasis_weights_tokens_then_restores_the_mean_as_a1111():
    states = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(0)) + 0.3
    weights = torch.ones(77)
    weights[3:5] = 1.5
    out = emphasize(states, weights)
    z = states * weights.reshape(1, -1, 1)
    assert torch.allclose(out, z * (states.mean() / z.mean()))
    assert math.isclose(out.mean().item(), states.mean().item(), rel_tol=1e-5)
    assert emphasize(states, None) is states


def test_emphasis_on_zero_mean_states_only_weights_them():
    """A final layer norm without a bias (the toy's and the factory's encoders) averages zero: no
    mean to restore, where A1111 would divide by a rounding error."""
    states = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(0))
    states = states - states.mean(dim=-1, keepdim=True)
    weights = torch.ones(77)
    weights[2] = 0.5
    out = emphasize(states, weights)
    assert torch.isfinite(out).all() and torch.equal(out, states * weights.reshape(1, -1, 1))


@pytest.mark.parametrize("family", ("tiny_pipeline", "tiny_sdxl_pipeline"))
def test_weighted_words_scale_their_tokens_states(family, request):
    pipeline = request.getfixturevalue(family)
    plain = encode(pipeline, "a red circle").embeds
    weighted = encode(pipeline, "a (red:1.5) [circle]").embeds
    expected = torch.ones(77)
    expected[2], expected[3] = 1.5, 1 / 1.1  # start token, "a", "red", "circle"
    width = pipeline.text_encoder.config.hidden_size  # SDXL: each encoder's states on their own
    parts = (plain[..., :width], plain[..., width:]) if plain.shape[-1] > width else (plain,)
    assert torch.allclose(weighted, torch.cat([emphasize(part, expected) for part in parts], dim=-1))
    assert not torch.equal(weighted, plain)
    assert torch.equal(encode(pipeline, "a (red:1) circle").embeds, plain)  # weight 1: untouched


def redness(image) -> float:
    """Share of the shape's (saturated) pixels whose hue is red (within 30 degrees)."""
    rgb = _as_array(image)
    mask = (rgb.max(axis=-1) - rgb.min(axis=-1)) > CHROMA_THRESHOLD
    if int(mask.sum()) < MIN_SHAPE_PIXELS:
        return 0.0
    distance = np.abs((hue_degrees(rgb[mask]) + 180.0) % 360.0 - 180.0)
    return float(np.mean(distance < 30.0))


@pytest.mark.slow
def test_weighting_red_up_or_down_moves_the_toy_models_red():
    engine = Engine(base_from(load_base_model("toy").pipeline, "toy"))

    def red(weight: float) -> float:
        prompt = f"a large (red:{weight}) magenta square on a white background"
        result = engine.generate(GenerateRequest(prompt, steps=20, seed=1, num_images=4))
        assert result.parameters.prompt_pieces[1] == ("red", weight)
        return float(np.mean([redness(image) for image in result.images]))

    low, high = red(0.5), red(1.5)
    assert high > low + 0.4, (low, high)  # measured: 0.0 and 1.0 (20 steps; the toy needs 20)


# ------------------------------------------------------------------ different lengths in one batch


def test_conditionings_of_one_length_concatenate_as_before(tiny_sdxl_pipeline):
    parts = [encode(tiny_sdxl_pipeline, text) for text in ("a", "b c")]
    joined = Conditioning.cat(parts)
    assert torch.equal(joined.embeds, torch.cat([part.embeds for part in parts]))
    assert torch.equal(joined.pooled, torch.cat([part.pooled for part in parts]))


def test_a_shorter_conditioning_is_tiled_which_attends_the_same(tiny_pipeline):
    short, long = encode(tiny_pipeline, "a red circle"), encode(tiny_pipeline, LONG_PROMPT)
    joined = Conditioning.cat([short.repeat(2), long])
    assert joined.embeds.shape == (3, 154, 32)
    assert torch.equal(joined.embeds[:2], short.embeds.repeat(2, 2, 1))
    # Cross-attention over keys repeated twice is attention over them once: the UNet agrees.
    unet = tiny_pipeline.unet
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        alone = unet(sample, 10, encoder_hidden_states=short.embeds).sample
        tiled = unet(sample, 10, encoder_hidden_states=joined.embeds[:1]).sample
    assert torch.allclose(alone, tiled, atol=1e-5)


def test_lengths_without_a_small_common_multiple_are_padded_with_empty_chunks(tiny_pipeline):
    def chunks(count: int, value: float) -> Conditioning:
        return Conditioning(torch.full((1, 77 * count, 32), value), padding=lambda: empty)

    empty = encode(tiny_pipeline, "").embeds
    five, six = chunks(5, 1.0), chunks(6, 2.0)
    assert math.lcm(5, 6) > MAX_TILING * 6
    joined = Conditioning.cat([five, six])
    assert joined.embeds.shape == (2, 462, 32)
    assert torch.equal(joined.embeds[0, : 77 * 5], five.embeds[0])
    assert torch.equal(joined.embeds[0, 77 * 5 :], empty[0])
    assert torch.equal(joined.embeds[1], six.embeds[0])
    with pytest.raises(ValueError, match="cannot pad"):
        Conditioning.cat([Conditioning(five.embeds), six])
    # Real encodings carry their empty chunk: the empty prompt, encoded the same way.
    assert torch.equal(encode(tiny_pipeline, LONG_PROMPT).padding(), empty)


def test_a_short_prompt_batched_beside_a_long_one_draws_as_alone(tiny_pipeline):
    engine = Engine(base_from(tiny_pipeline))
    short = engine.normalize(GenerateRequest("a red circle", steps=2, seed=7)).settings
    long = engine.normalize(GenerateRequest(LONG_PROMPT, steps=2, seed=8)).settings
    alone = denoise_batch(engine.pipeline, [short], output_type="np")[0].images
    batched = denoise_batch(engine.pipeline, [short, long], output_type="np")
    assert np.allclose(batched[0].images, alone, atol=1e-4)
    assert batched[1].images.shape == alone.shape


# ------------------------------------------------------------------ the request and the report


def test_the_parsed_prompt_is_reported_through_the_wire(micro_engine):
    result = micro_engine.generate(
        GenerateRequest("a (red:1.5) <lora:ink:0.5> circle BREAK [sky]", steps=1, seed=1)
    )
    pieces = (("a ", 1.0), ("red", 1.5), (" circle", 1.0), ("BREAK", -1.0), ("", 1.0), ("sky", 1 / 1.1))
    assert result.parameters.prompt == "a (red:1.5) circle BREAK [sky]"  # the tag went to the blend
    assert [item.name for item in result.parameters.adapters] == ["ink"]
    assert result.parameters.prompt_pieces == pieces
    client = client_convert.parameters(api_convert.parameters(result.parameters))
    assert [text for text, _ in client.prompt_pieces] == [text for text, _ in pieces]
    assert [weight for _, weight in client.prompt_pieces] == pytest.approx([w for _, w in pieces])


def test_a_malformed_emphasis_weight_is_refused_before_queueing(micro_engine):
    for field in ("prompt", "negative_prompt"):
        request = GenerateRequest(**{"prompt": "a cat", field: "a (cat:1.2.3)"})
        with pytest.raises(InvalidArgument, match="valid weight"):
            micro_engine.normalize(request)
