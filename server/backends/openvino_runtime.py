"""What the OpenVINO backends share: the lazy import, the precision setting, compile properties.

Precision ``"fp32"`` runs float32 throughout (parity with torch within float
rounding). ``"bf16"`` asks the CPU plugin for bfloat16 inference
(``INFERENCE_PRECISION_HINT``); it needs native BF16 (AVX512-BF16 or AMX) and
falls back to fp32, with a log line, on a CPU without it.

OpenVINO's usage telemetry is off in every process that reaches OpenVINO through
this module (``disable_telemetry``): a server never phones home.

Compiled-model cache (``compiled_cache``, on by default, ``--no-compile-cache`` turns
it off): a compile is given OpenVINO's ``CACHE_DIR`` (``<cache>/compiled``), so a
restart imports the plugin's blob instead of compiling again (at SD 1.5 size ~97 s of
compile and warm-up a start). OpenVINO keys a blob on a hash of the model's graph
*and its constants' values* (``ov::pass::Hash`` over the serialized model and its
weights), the device and the compile properties (precision, threads) and its own
version; so the lean UNet variant, which holds the spatial convolutions and biases
as constants at the base's values, never reuses another base's blob (two bases of
one graph and different weights get two blobs: ``tests/backends/test_openvino_cache.py``).
The weight *inputs* (every target of the full variant) are not in a blob: a blend is
never baked in. The UNet and the text encoders are cached at both precisions (a
cached compile's output is bit for bit a fresh one's); the VAE decoder only at fp32:
OpenVINO 2026.4's bf16 VAE decoder gave wrong images from its blob (max error 0.94
of the [-1, 1] range against 0.02 fresh), so a bf16 decoder is always compiled fresh
(``OvVaeDecoder``). Blobs are never evicted: remove the folder to reclaim them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from adapters.errors import FailedPrecondition, InvalidArgument
from adapters.home import cache_dir

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16")


TELEMETRY_PACKAGE = "openvino_telemetry"
TELEMETRY_STUB = "openvino.tools.ovc.telemetry_stub"
# The converter's modules that bind ``openvino_telemetry`` as ``tm`` at import.
_TELEMETRY_USERS = (
    "openvino.tools.ovc.convert_impl",
    "openvino.tools.ovc.telemetry_utils",
    "openvino.tools.ovc.utils",
    "openvino.tools.ovc.main",
)


def disable_telemetry() -> str:
    """Turn OpenVINO's usage telemetry off in this process; returns how, for the log.

    ``import openvino`` imports its model converter (ovc), which sends a usage event to
    Google Analytics through the ``openvino_telemetry`` package at import, and more at
    every ``convert_model`` (version, parameters, each converted operation). Its only opt-outs are a consent
    file (``~/intel/openvino_telemetry`` holding 0; when the file is missing, ovc counts
    that as consent) and ``CI=true``; there is no OpenVINO variable for it. Each event is
    posted from a child forked off the calling thread that OpenVINO terminates after 3 s:
    in a threaded server such a child can hang on a copied lock or a DNS lookup, and it
    inherits asyncio's signal set-up (see ``server.api.process``).

    ovc falls back to its own no-op stub (``openvino.tools.ovc.telemetry_stub``) when
    ``openvino_telemetry`` cannot be imported. Before openvino is imported, the package is
    blocked (``sys.modules[...] = None``), so that fallback is taken: call this first (the
    server does, before anything imports torch or OpenVINO). If the converter is already
    imported (its import event is then gone), its modules are pointed at the stub and the
    live instance is silenced. Nothing is written to the user's home, no variable is set.
    """
    if sys.modules.get(TELEMETRY_PACKAGE) is None:  # not imported yet, or blocked already
        sys.modules[TELEMETRY_PACKAGE] = None  # type: ignore[assignment]  # its import raises ImportError
        return f"{TELEMETRY_PACKAGE} blocked: ovc uses its no-op stub"
    import importlib

    stub = importlib.import_module(TELEMETRY_STUB)  # (this imports ovc if it was not yet)
    for name in _TELEMETRY_USERS:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "tm", stub) is not stub:
            module.tm = stub
    real = sys.modules[TELEMETRY_PACKAGE]
    instance = getattr(getattr(real, "Telemetry", None), "_SingletonMetaClass__single_instance", None)
    if instance is not None:
        instance.consent = False
    return "ovc was imported already: pointed at its no-op stub"


def telemetry_enabled() -> bool:
    """Whether OpenVINO's converter would send usage events from this process (imports openvino)."""
    import openvino.tools.ovc.convert_impl as convert_impl
    import openvino.tools.ovc.telemetry_utils as telemetry_utils

    return any(module.tm.__name__ != TELEMETRY_STUB for module in (convert_impl, telemetry_utils))


def openvino() -> Any:
    """The ``openvino`` module (telemetry off), or a ``FailedPrecondition`` saying how to install it."""
    disable_telemetry()
    try:
        import openvino as ov
    except ImportError as error:
        raise FailedPrecondition(
            f"backend openvino needs the openvino package ({error}): pip install 'loraloom[openvino]'"
        ) from None
    return ov


@cache
def core() -> Any:
    """One ``ov.Core`` per process (it holds the loaded plugins)."""
    return openvino().Core()


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``; else an ``InvalidArgument`` naming them."""
    if precision not in PRECISIONS:
        raise InvalidArgument(f"precision {precision!r} is not supported: use one of {', '.join(PRECISIONS)}")
    return precision


def cpu_supports_bf16() -> bool:
    """Whether the CPU plugin reports native BF16 (AVX512-BF16 or AMX)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def effective_precision(precision: str, bf16_supported: bool | None = None) -> str:
    """``precision``, or ``"fp32"`` (logged) when bf16 is asked of a CPU without native BF16.

    ``bf16_supported`` overrides the CPU query (to show the fallback on any machine).
    """
    if check_precision(precision) != "bf16":
        return precision
    if not (cpu_supports_bf16() if bf16_supported is None else bf16_supported):
        log.warning("precision bf16 asked, but this CPU has no native BF16 (AVX512-BF16 or AMX): using fp32")
        return "fp32"
    return precision


def cache_folder(folder: Path | None = None) -> Path:
    """Where converted models and compiled blobs are kept (default: the data folder's cache)."""
    return folder or cache_dir() / "openvino"


def converted(
    part: str, fingerprint: str, convert: Callable[[], Any], *, version: int, folder: Path | None = None
) -> Path:
    """``part`` of a base model as OpenVINO IR: ``convert()`` the first time, then from the cache.

    Kept under ``<cache>/<part>-<key>/<part>.xml`` (float32 weights), where the key hashes
    the base fingerprint, ``version`` (bump when the converted graph changes) and the
    converter versions. Written to a temporary folder and renamed into place, so a reader
    never sees half a model.
    """
    import torch

    ov = openvino()
    versions = {"openvino": ov.__version__, "torch": torch.__version__}
    text = json.dumps({"fingerprint": fingerprint, "version": version, **versions}, sort_keys=True)
    root = cache_folder(folder) / f"{part}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"
    path = root / f"{part}.xml"
    if path.is_file():
        return path
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{part}-", dir=root.parent))
    try:
        ov.save_model(convert(), str(staging / path.name), compress_to_fp16=False)
        try:
            os.rename(staging, root)
        except OSError:  # another process converted it first: use theirs
            if not path.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def compiled_cache(folder: Path | None = None) -> Path:
    """Where OpenVINO keeps compiled blobs (``CACHE_DIR``): ``<cache>/compiled``."""
    return cache_folder(folder) / "compiled"


def compile_properties(precision: str, threads: int | None, cache: Path | None = None) -> dict[str, str]:
    """CPU plugin properties: one stream with the latency hint, the precision, the thread count,
    and ``CACHE_DIR`` when ``cache`` is given (see the module's doc for what may be cached)."""
    properties = {
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
    }
    if threads:
        properties["INFERENCE_NUM_THREADS"] = str(threads)
    if cache is not None:
        properties["CACHE_DIR"] = str(cache)
    return properties


def compile_model(model: Any, precision: str, threads: int | None, cache: Path | None = None) -> Any:
    """``model`` compiled for the CPU with ``compile_properties`` (from the blob in ``cache`` when
    one matches; logged with the time it took)."""
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    compiled = core().compile_model(model, "CPU", compile_properties(precision, threads, cache))
    seconds = time.perf_counter() - start
    release_freed_memory()  # the compile's temporaries
    how = "from the cache" if loaded_from_cache(compiled) else "uncached" if cache is None else "now cached"
    log.info("compiled %s in %.2f s (%s)", model.get_friendly_name(), seconds, how)
    return compiled


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim`` (``None`` elsewhere: musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the heap's freed pages back to the system (glibc ``malloc_trim``); whether it could.

    Freed tensors below glibc's mmap threshold (which grows to 32 MiB as large blocks are freed)
    stay in the heap: after the float32 weights a bf16 backend replaces are freed, and after a
    compile's temporaries, RSS stays ~1.6 GB (SD 1.5) higher until they are trimmed. Called only
    after those one-time steps (it walks the heap: milliseconds)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def loaded_from_cache(compiled: Any) -> bool:
    """Whether OpenVINO imported ``compiled`` from a cached blob (``LOADED_FROM_CACHE``)."""
    try:
        return bool(compiled.get_property("LOADED_FROM_CACHE"))
    except RuntimeError:  # a plugin without the property
        return False


class PerShape:
    """Values made once per input shape, on first use (thread-safe): compiled models and their requests.

    OpenVINO runs fastest on static shapes, so each backend compiles per shape it sees.
    """

    def __init__(self, make: Callable[[tuple], Any]) -> None:
        self._make = make
        self._made: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    @property
    def shapes(self) -> tuple[tuple, ...]:
        """The shapes made so far, in order."""
        return tuple(self._made)

    def get(self, shape: tuple) -> Any:
        found = self._made.get(shape)
        if found is None:
            with self._lock:
                found = self._made.get(shape)
                if found is None:
                    found = self._made[shape] = self._make(shape)
        return found
