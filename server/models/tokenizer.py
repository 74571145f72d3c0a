"""The CLIP BPE tokenizer for the built-in models, built offline.

OpenAI CLIP ships a gzipped list of BPE merges (``bpe_simple_vocab_16e6.txt.gz``,
MIT licence, see ``data/LICENSE.clip-bpe``). CLIP derives its 49408-token
vocabulary from it: the 256 byte symbols, the same with ``</w>``, one token per
merge, then ``<|startoftext|>`` and ``<|endoftext|>``. We derive ``vocab.json``
and ``merges.txt`` the same way and hand them to transformers' CLIP tokenizer,
so ids match OpenAI CLIP (and SD 1.x checkpoints) exactly.
"""

from __future__ import annotations

import gzip
import json
import shutil
from functools import lru_cache
from pathlib import Path

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges of the file.
_NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
MAX_LENGTH = 77
EOS_TOKEN = "<|endoftext|>"
# OpenCLIP (SD 2.x's encoder, SDXL's second) pads with "!" (id 0), OpenAI CLIP with end-of-text.
OPEN_CLIP_PAD = "!"
OPEN_CLIP_PAD_ID = 0


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode mapping."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Return CLIP's vocabulary (token -> id) and its merges, in order."""
    with gzip.open(BPE_FILE, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = lines[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_tokenizer_files(folder: Path, *, pad_token: str = EOS_TOKEN) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer config into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def _tokenizer_folder() -> Path:
    import tempfile

    from adapters.home import cache_dir

    folder = cache_dir() / "clip-tokenizer"
    if not (folder / "merges.txt").exists():
        # Build beside the target and rename: concurrent first uses never see half a folder.
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".clip-tokenizer-"))
        write_tokenizer_files(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race; its folder is complete
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def clip_tokenizer(*, pad_token: str = EOS_TOKEN):
    """A transformers ``CLIPTokenizer`` whose ids match OpenAI CLIP; ``pad_token="!"`` pads as
    OpenCLIP does (SD 2.x, SDXL's second tokenizer)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(_tokenizer_folder()))
    if pad_token != EOS_TOKEN:
        tokenizer.pad_token = pad_token
    return tokenizer
