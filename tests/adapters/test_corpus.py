"""Malicious and broken files: each refused with its own message, fast, without crashing."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from adapters.canonical import BaseModelRef
from adapters.formats import load_adapter
from adapters.safeparse import peek_header
from adapters.validation import validate_against_base
from tests.adapters.corpus import build_corpus

MICRO = BaseModelRef("loraloom:micro")
# Generous for a loaded 2-core CI machine; measured times are ~0.1-5 ms except
# too_many_tensors and header_deep_nesting (a 4 MB / 400 kB header: ~50-150 ms).
MAX_SECONDS = 1.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, micro_shapes):
    return {case.name: case for case in build_corpus(tmp_path_factory.mktemp("corpus"), micro_shapes)}


def test_corpus_is_large_enough(corpus):
    assert len(corpus) >= 15
    assert {"pickle_zip", "wrong_architecture", "rank_zero", "nan_weights", "loha", "lokr"} <= set(corpus)


def _refuse(case, shapes):
    adapter = load_adapter(case.path, module_names=shapes)
    validate_against_base(adapter, shapes, MICRO)


def test_every_bad_file_is_refused_with_its_message(corpus, micro_shapes):
    timings = {}
    for case in corpus.values():
        start = time.perf_counter()
        with pytest.raises(case.error, match=case.match):
            _refuse(case, micro_shapes)
        timings[case.name] = time.perf_counter() - start
    slow = {name: round(t, 3) for name, t in timings.items() if t > MAX_SECONDS}
    assert not slow, f"refusals slower than {MAX_SECONDS}s: {slow}"


def test_messages_are_specific(corpus, micro_shapes):
    """No two cases share a message: each says what is wrong with that file."""
    messages = {}
    for case in corpus.values():
        with pytest.raises(case.error) as info:
            _refuse(case, micro_shapes)
        messages[case.name] = str(info.value)
    assert len(set(messages.values())) == len(messages), messages


@pytest.mark.parametrize(
    "name", ["header_length_huge", "huge_declared_shape", "offsets_outside_file", "shape_offsets_mismatch"]
)
def test_precheck_refuses_before_reading_tensors_with_little_memory(corpus, name):
    case = corpus[name]
    tracemalloc.start()
    try:
        with pytest.raises(case.error, match=case.match):
            peek_header(case.path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_pickle_message_says_how_to_convert(corpus):
    with pytest.raises(Exception, match="Convert it offline") as info:
        load_adapter(corpus["pickle_zip"].path)
    assert "safetensors" in str(info.value)


def test_bytes_and_paths_give_the_same_refusal(corpus, micro_shapes):
    for case in corpus.values():
        if case.path.suffix != ".safetensors":
            continue
        with pytest.raises(case.error, match=case.match):
            adapter = load_adapter(case.path.read_bytes(), module_names=micro_shapes)
            validate_against_base(adapter, micro_shapes, MICRO)


def test_random_corruption_only_ever_raises_loraloom_errors(micro_shapes):
    """Byte flips (mostly in the header) and truncations of files from all three writers."""
    import random

    from adapters.errors import LoraloomError
    from adapters.formats import save_canonical, to_diffusers, to_kohya
    from tests.adapters.corpus import make_adapter

    adapter = make_adapter(micro_shapes)
    rng = random.Random(0)
    refused = 0
    for writer in (save_canonical, to_kohya, to_diffusers):
        data = writer(adapter)
        header_end = 8 + int.from_bytes(data[:8], "little")
        for _ in range(150):
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                limit = header_end + 16 if rng.random() < 0.8 else len(mutated)
                mutated[rng.randrange(limit)] = rng.randrange(256)
            if rng.random() < 0.1:
                mutated = mutated[: rng.randrange(len(mutated))]
            try:
                validate_against_base(load_adapter(bytes(mutated), module_names=micro_shapes), micro_shapes)
            except LoraloomError:
                refused += 1
    assert refused > 300
