"""Model families: what differs between SD 1.x, SD 2.x and SDXL, in one module each.

The loader, the engine's conditioning, the adapter key maps, the exporters and the
trainer ask a pipeline's ``Family`` instead of testing for SDXL themselves.
"""

from __future__ import annotations

from server.models.families.base import Conditioning, Family
from server.models.families.sd1 import SD1
from server.models.families.sd2 import SD2
from server.models.families.sdxl import SDXL

FAMILIES: dict[str, Family] = {family.name: family for family in (SD1, SD2, SDXL)}

__all__ = ["FAMILIES", "SD1", "SD2", "SDXL", "Conditioning", "Family", "family_for_architecture", "family_of"]


def family_of(pipeline) -> Family:
    """The family of a loaded pipeline, read from its components (not from its class)."""
    for family in (SDXL, SD2, SD1):
        if family.matches(pipeline):
            return family
    return SD1


def family_for_architecture(architecture: str) -> Family:
    """The family an architecture name (``sd_v1``, ``sdxl``, ``loraloom:tiny-sdxl``...) belongs to."""
    from adapters.formats.base_ref import architecture_family

    wanted = architecture_family(architecture)
    for family in FAMILIES.values():
        if family.architecture == wanted:
            return family
    return SD1
