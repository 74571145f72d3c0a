"""kohya's SDXL UNet names: the original Stability (SGM / LDM) module paths, to and from diffusers'.

kohya's sd-scripts train SDXL on the SGM UNet, so an SDXL kohya file names
``input_blocks.4.1.transformer_blocks.0.attn1.to_q`` where diffusers has
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`` (kohya's SD 1.x/2.x files
use diffusers' names). SGM numbers the blocks of each side in one sequence:
``input_blocks.0`` is ``conv_in``, then per down block its ``layers_per_block`` layers
(slot 0 the resnet, slot 1 its attention) and its downsampler (``.0.op``); per up block
``layers_per_block + 1`` layers, the upsampler sitting in the last one after the
resnet (slot 1) or after the attention (slot 2); ``middle_block`` 0, 1, 2 is resnet,
attention, resnet. Inside a resnet, ``in_layers.2``/``out_layers.3``/``emb_layers.1``/
``skip_connection`` are ``conv1``/``conv2``/``time_emb_proj``/``conv_shortcut``; attention
blocks keep their inner names.

The arithmetic needs two facts about the base (``UnetLayout``), read from its module
names alone (``layout_of``), so the map fits real SDXL, the factory's tiny SDXL and SD
1.x/2.x topologies alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from adapters.errors import InvalidArgument


@dataclass(frozen=True)
class UnetLayout:
    """``layers_per_block`` (resnets per down block) and the up blocks without attention layers
    (whose upsampler is in slot 1, not 2)."""

    layers_per_block: int
    plain_up_blocks: frozenset[int] = frozenset()


# SDXL base 1.0: two layers per block; up blocks 0 and 1 have attention, up block 2 does not.
SDXL_LAYOUT = UnetLayout(layers_per_block=2, plain_up_blocks=frozenset({2}))

# Modules outside the blocks (the linear layers of the embeddings, the first and last conv).
FIXED: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_out": "out.2",
}
RESNET: dict[str, str] = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
MIDDLE_SLOTS = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}
SGM_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.")

_BLOCK = re.compile(
    r"(?P<side>down_blocks|up_blocks)\.(?P<block>\d+)\.(?P<kind>resnets|attentions|downsamplers|upsamplers)"
    r"\.(?P<index>\d+)\.(?P<rest>.+)$"
)
_MIDDLE = re.compile(r"mid_block\.(?P<kind>resnets|attentions)\.(?P<index>\d+)\.(?P<rest>.+)$")
_LAYER = re.compile(r"unet\.(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.")


def to_sgm(path: str, layout: UnetLayout) -> str | None:
    """The SGM path of a diffusers UNet module path (without ``unet.``); ``None`` when it has none."""
    if path in FIXED:
        return FIXED[path]
    if match := _MIDDLE.match(path):
        slot = MIDDLE_SLOTS.get((match["kind"], int(match["index"])))
        inner = _inner(match["kind"], match["rest"])
        return None if slot is None or inner is None else f"middle_block.{slot}.{inner}"
    match = _BLOCK.match(path)
    if match is None:
        return None
    block, kind, index, rest = int(match["block"]), match["kind"], int(match["index"]), match["rest"]
    layers = layout.layers_per_block + 1  # a down block's SGM layers, with its downsampler
    if kind in ("downsamplers", "upsamplers"):
        if index != 0 or rest != "conv":
            return None
        if kind == "downsamplers":
            return f"input_blocks.{(block + 1) * layers}.0.op"
        slot = 1 if block in layout.plain_up_blocks else 2
        return f"output_blocks.{block * layers + layout.layers_per_block}.{slot}.conv"
    inner = _inner(kind, rest)
    if inner is None:
        return None
    slot = 1 if kind == "attentions" else 0
    if match["side"] == "down_blocks":
        return f"input_blocks.{1 + block * layers + index}.{slot}.{inner}"
    return f"output_blocks.{block * layers + index}.{slot}.{inner}"


def _inner(kind: str, rest: str) -> str | None:
    return RESNET.get(rest) if kind == "resnets" else rest


def layout_of(names: Iterable[str]) -> UnetLayout | None:
    """The layout a base's module keys (``unet.down_blocks.0.resnets.0.conv1``...) show; ``None`` when
    they hold no ``unet.down_blocks.0.resnets`` (a partial list says nothing reliable)."""
    down_block_0: set[int] = set()
    up_blocks: set[int] = set()
    attention_up_blocks: set[int] = set()
    for key in names:
        match = _LAYER.match(key)
        if match is None:
            continue
        side, block, kind, index = match[1], int(match[2]), match[3], int(match[4])
        if side == "down_blocks" and block == 0 and kind == "resnets":
            down_block_0.add(index)
        elif side == "up_blocks":
            up_blocks.add(block)
            if kind == "attentions":
                attention_up_blocks.add(block)
    if not down_block_0:
        return None
    return UnetLayout(max(down_block_0) + 1, frozenset(up_blocks - attention_up_blocks))


def layout_of_adapter(keys: Iterable[str]) -> UnetLayout:
    """The layout an adapter's own module keys show when the base's names are not at hand.

    The keys say the layers per block only when both sides agree: the deepest down layer (index
    ``n - 1``) and the deepest up layer (index ``n``, up blocks have one more) give the same ``n``,
    as an adapter that trains a kind of layer everywhere does. Otherwise SDXL's own layout
    (``SDXL_LAYOUT``) is taken, unless the keys cannot belong to it: then the base's names are
    needed. Upsamplers are placed after an attention (SDXL's up blocks with an upsampler have one).
    """
    deepest = {"down_blocks": -1, "up_blocks": -1}
    for key in keys:
        if match := _LAYER.match(key):
            deepest[match[1]] = max(deepest[match[1]], int(match[4]))
    down, up = deepest["down_blocks"], deepest["up_blocks"]
    if down >= 0 and down + 1 == up:
        return UnetLayout(up)
    if max(down + 1, up) > SDXL_LAYOUT.layers_per_block:
        raise InvalidArgument(
            f"the adapter's UNet modules (layer {max(down, up)} of a block) do not fit SDXL's layout and "
            "do not tell the layers per block; pass module_names (the base model's module keys)"
        )
    return SDXL_LAYOUT


def sgm_aliases(names: Iterable[str]) -> dict[str, str]:
    """SGM path -> module key, for every UNet module key among a base's ``names``."""
    names = list(names)
    layout = layout_of(names) or SDXL_LAYOUT
    table: dict[str, str] = {}
    for key in names:
        component, _, path = key.partition(".")
        if component == "unet" and (sgm := to_sgm(path, layout)) is not None:
            table.setdefault(sgm, key)
    return table
