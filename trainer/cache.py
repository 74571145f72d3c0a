"""Caches of what the frozen parts of the base compute: VAE latents and caption conditionings.

``--cache-latents`` keeps, on disk, the VAE encoder's output for each training image at its
bucket: the latent distribution's parameters (mean and log-variance, float32), not a sample,
so a cached run draws its latents with the same seeded sample an uncached run draws (the runs
agree to the rounding of encoding one image or a batch). With ``random_flip`` both mirror
images are encoded the first time an image is used, so no later step runs the VAE encoder
whatever the flips drawn (kohya's sd-scripts cache both as well). A latent's key is the
sha256 of the image file's bytes (not its name), its bucket, the crop rule, the flip, the
VAE's fingerprint (its weights) and its dtype: an edited image, another bucket or another
VAE is a miss, never a stale hit.

While the text encoders are frozen, a caption's conditioning (the family's encoding: the
states, and SDXL's pooled embedding) is kept in memory, and with ``--cache-latents`` on disk
too (unless tags are shuffled, which makes nearly every caption new), keyed by the caption,
the family and the fingerprint of the text encoders and tokenizers.

Files: ``<LORALOOM_HOME>/cache/trainer/<latents|text>/<fingerprint>/<key[:2]>/<key>.safetensors``,
written under a temporary name and renamed, so a reader never sees half a file and trainers
may share the folder. An unreadable entry counts as a miss and is rewritten. Deleting the
folder only costs the encoding again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from adapters.home import data_home
from server.models.families import Conditioning

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# Bytes of cached tensors also kept in memory (beyond it, entries are read from disk each time).
MEMORY_BYTES = 1 << 30
# How an image becomes its bucket (``trainer.data.resize_and_crop``); a new rule is a new key.
CROP_RULE = "cover-bicubic-center"


def cache_root() -> Path:
    """Where the trainer's caches live: ``<LORALOOM_HOME>/cache/trainer``."""
    return data_home() / "cache" / "trainer"


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True).encode()).hexdigest()


def modules_fingerprint(modules: Iterable[tuple[str, torch.nn.Module]]) -> str:
    """sha256 over named modules' weights (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256()
    for name, module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            shape = tensor.shape
            tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}.{key}:{tuple(shape)}:{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    spec = [type(tokenizer).__name__, tokenizer.model_max_length, tokenizer.pad_token, vocab]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


class TensorCache:
    """Named tensors by key: in memory (up to ``memory_bytes``) in front of a folder (or memory only)."""

    def __init__(self, folder: Path | None, *, memory_bytes: int = MEMORY_BYTES) -> None:
        self.folder = folder
        self.memory_bytes = memory_bytes
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._held = 0
        self.hits = 0  # found in memory or on disk
        self.misses = 0

    def path(self, key: str) -> Path:
        assert self.folder is not None
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        found = self._memory.get(key)
        if found is None and self.folder is not None:
            path = self.path(key)
            if path.is_file():
                try:
                    found = load_file(str(path))
                except Exception as error:  # damaged: encode again, rewrite
                    log.warning("ignoring unreadable cache entry %s: %s", path, error)
                else:
                    self._remember(key, found)
        if found is None:
            self.misses += 1
        else:
            self.hits += 1
        return found

    def put(self, key: str, tensors: dict[str, torch.Tensor], *, disk: bool = True) -> None:
        tensors = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
        if disk and self.folder is not None:
            path = self.path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
            try:
                save_file({name: tensor.cpu() for name, tensor in tensors.items()}, str(partial))
                os.replace(partial, path)
            except OSError as error:  # a full or read-only disk slows training, it does not stop it
                log.warning("cannot write cache entry %s: %s", path, error)
                partial.unlink(missing_ok=True)
        self._remember(key, tensors)

    def _remember(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if key not in self._memory and self._held + size <= self.memory_bytes:
            self._memory[key] = tensors
            self._held += size


class LatentCache:
    """The VAE's latent-distribution parameters of each (image, flip), encoded on first use."""

    def __init__(
        self,
        dataset,
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        vae_fingerprint: str,
        dtype: str,
        both_flips: bool,
        folder: Path | None = None,
    ) -> None:
        self.dataset = dataset
        self.encode = encode  # (n, 3, h, w) pixels -> (n, 2 * channels, h/f, w/f) parameters
        self.fingerprint = vae_fingerprint
        self.dtype = dtype
        self.both_flips = both_flips
        self.store = TensorCache((folder or cache_root()) / "latents" / vae_fingerprint[:16])

    def key(self, index: int, flip: bool) -> str:
        width, height = self.dataset.examples[index].bucket
        return cache_key(
            kind="latents",
            image=self.dataset.digest(index),
            bucket=[width, height],
            crop=CROP_RULE,
            flip=flip,
            vae=self.fingerprint,
            dtype=self.dtype,
        )

    def parameters(self, index: int, flip: bool) -> torch.Tensor:
        found = self.store.get(self.key(index, flip))
        if found is not None:
            return found["parameters"]
        flips = (flip, not flip) if self.both_flips else (flip,)
        pixels = torch.stack([self.dataset.pixels(index, flip=f, keep=False) for f in flips])
        encoded = self.encode(pixels).float().cpu()
        for mirrored, parameters in zip(flips, encoded, strict=True):
            self.store.put(self.key(index, mirrored), {"parameters": parameters})
        return encoded[0]


class TextCache:
    """Each caption's conditioning from frozen text encoders: in memory, and on disk when asked."""

    def __init__(
        self,
        encode: Callable[[str], Conditioning],
        *,
        fingerprint: str,
        family: str,
        disk: bool,
        folder: Path | None = None,
    ) -> None:
        self.encode = encode
        self.fingerprint = fingerprint
        self.family = family
        self.store = TensorCache(((folder or cache_root()) / "text" / fingerprint[:16]) if disk else None)

    def key(self, caption: str) -> str:
        return cache_key(kind="text", caption=caption, family=self.family, encoders=self.fingerprint)

    def get(self, caption: str, device: torch.device) -> Conditioning:
        key = self.key(caption)
        found = self.store.get(key)
        if found is None:
            with torch.no_grad():
                encoded = self.encode(caption)
            found = {"embeds": encoded.embeds}
            if encoded.pooled is not None:
                found["pooled"] = encoded.pooled
            self.store.put(key, found)
        return Conditioning(
            embeds=found["embeds"].to(device),
            pooled=found["pooled"].to(device) if "pooled" in found else None,
            padding=lambda: self.get("", device).embeds,
        )
