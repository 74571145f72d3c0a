"""The offline CLIP tokenizer gives OpenAI CLIP's ids.

Expected ids were produced by open_clip's reference ``SimpleTokenizer`` (a
separate implementation of CLIP's BPE) on the same merges file.
"""

from __future__ import annotations

import pytest

from server.models.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, VOCAB_SIZE, clip_tokenizer

REFERENCE_IDS = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A small RED circle on a white background": [49406, 320, 2442, 736, 7117, 525, 320, 1579, 5994, 49407],
    "hello world!": [49406, 3306, 1002, 256, 49407],
    "watercolor, ink-wash style": [49406, 14211, 267, 967, 268, 7810, 1844, 49407],
    "<lora:ink:0.5> cat": [49406, 283, 2179, 320, 281, 967, 281, 271, 269, 276, 285, 2368, 49407],
    "naïve café 123": [49406, 1097, 35689, 563, 15304, 272, 273, 274, 49407],
    "a   photo\tof  dogs": [49406, 320, 1125, 539, 3255, 49407],
}


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.mark.parametrize("prompt", sorted(REFERENCE_IDS))
def test_ids_match_openai_clip(tokenizer, prompt):
    assert tokenizer(prompt).input_ids == REFERENCE_IDS[prompt]


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.bos_token_id == BOS_TOKEN_ID
    assert tokenizer.eos_token_id == EOS_TOKEN_ID
    assert tokenizer.model_max_length == 77


def test_padding_to_the_pipeline_length(tokenizer):
    ids = tokenizer("a cat", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[:4] == [49406, 320, 2368, 49407]
    assert set(ids[4:]) == {EOS_TOKEN_ID}
