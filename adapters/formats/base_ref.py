"""Which base model an adapter was made for, read from (and written to) its metadata."""

from __future__ import annotations

from collections.abc import Mapping

from adapters.canonical import BaseModelRef

ARCH_KEY = "loraloom.base_architecture"
FINGERPRINT_KEY = "loraloom.base_fingerprint"
FORMAT_KEY = "loraloom.format"
# Recorded with a stored version (not in the file): what the adapter is, as ``LoraAdapter.kind`` says.
ADAPTER_TYPE_KEY = "loraloom.adapter_type"


def normalize_architecture(value: str) -> str:
    """Fold the spellings tools use into ``sd_v1`` / ``sd_v2`` / ``sdxl`` / ``loraloom:<size>`` / as is."""
    v = value.strip().lower()
    if v.startswith("loraloom:"):
        return v
    if v.startswith("sdxl") or v.startswith("stable-diffusion-xl"):
        return "sdxl"
    if v.startswith(("sd_v2", "sd2", "stable-diffusion-v2")):
        return "sd_v2"
    if v.startswith(("sd_v1", "sd1", "stable-diffusion-v1")):
        return "sd_v1"
    if v.startswith(("sd3", "stable-diffusion-3")):
        return "sd3"
    if v.startswith("flux"):
        return "flux"
    return v


def architecture_family(architecture: str) -> str:
    """The family an architecture belongs to: ``sd_v1``, ``sd_v2``, ``sdxl`` (or itself).

    loraloom's built-in sizes name their family in the size (``loraloom:tiny-sdxl``,
    ``loraloom:tiny-sd2``); the others are SD 1.x topology.
    """
    name = normalize_architecture(architecture)
    if not name.startswith("loraloom:"):
        return name
    size = name.split(":", 1)[1]
    if size.endswith("sdxl"):
        return "sdxl"
    if size.endswith("sd2"):
        return "sd_v2"
    return "sd_v1"


def compatible_architectures(made_for: str, serving: str) -> bool:
    """Whether an adapter made for ``made_for`` may be applied to a ``serving`` base (shapes are
    checked on their own): the same architecture, or a generic family name (``sdxl``) on a base of
    that family. A specific built-in size (``loraloom:tiny``) needs that size."""
    made_for, serving = normalize_architecture(made_for), normalize_architecture(serving)
    if not made_for or not serving or made_for == serving:
        return True
    if made_for.startswith("loraloom:"):
        return False
    return made_for == architecture_family(serving)


def base_from_metadata(metadata: Mapping[str, str]) -> BaseModelRef | None:
    """Our own keys first, then ModelSpec, then kohya's ``ss_*`` keys; ``None`` when nothing says."""
    fingerprint = (
        metadata.get(FINGERPRINT_KEY)
        or metadata.get("ss_new_sd_model_hash")
        or metadata.get("ss_sd_model_hash")
        or ""
    ).strip()
    architecture = metadata.get(ARCH_KEY, "").strip()
    if not architecture:
        spec = metadata.get("modelspec.architecture", "")
        architecture = spec.split("/", 1)[0] if spec else ""
    if not architecture:
        architecture = metadata.get("ss_base_model_version", "").strip()
    if not architecture and "ss_v2" in metadata:
        architecture = "sd_v2" if metadata["ss_v2"].strip().lower() == "true" else "sd_v1"
    if not architecture:
        return None
    return BaseModelRef(architecture=normalize_architecture(architecture), fingerprint=fingerprint)


def base_metadata(base: BaseModelRef | None) -> dict[str, str]:
    if base is None:
        return {}
    return {ARCH_KEY: base.architecture, FINGERPRINT_KEY: base.fingerprint}


def kohya_version(architecture: str) -> str | None:
    """The ``ss_base_model_version`` kohya writes for an architecture, when it has one."""
    return {"sd_v1": "sd_v1", "sd_v2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(architecture)
