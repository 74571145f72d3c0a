"""LyCORIS files written by the lycoris-lora package's own code, and its own merge, for the tests.

``write_lycoris`` builds a LyCORIS network on a copy of a factory pipeline with the
package's kohya front end (``lycoris.kohya.LycorisNetworkKohya``: the names A1111 and
ComfyUI read), fills its factors with seeded noise (a fresh network changes nothing:
its up factors start at zero) and saves it with the network's own ``save_weights``.

``peer_merge`` is ``lycoris.utils.merge`` into a copy of the pipeline (several files:
one after the other, as a user merges them). ``peer_forward`` computes each module's
weight as the package's own module forward does (``W0 + w * get_weight()``, DoRA:
``apply_weight_decompose(W0 + get_weight(), w)``). The two agree except on LoHa and on
LoKr with a low-rank factor, where lycoris-lora's merge path (``get_diff_weight``) applies
alpha/r a second time on top of ``get_weight``'s (4.1.3, also 3.2): its forward, its
bypass forward, A1111 and ComfyUI apply it once, and so does loraloom.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from pathlib import Path

import torch

DIM, ALPHA = 8, 4  # alpha != dim: the scale alpha/dim = 0.5 matters


def presets() -> dict[str, dict]:
    """LyCORIS' built-in ``attn-only`` and ``full`` presets, for diffusers' class names.

    ``attn-only`` names ``CrossAttention``/``SelfAttention`` (sd-scripts' UNet); diffusers calls
    them ``Attention``. ``full`` names ``time_embedding.linear_1/2`` and also the ``TimestepEmbedding``
    class around them, which lycoris-lora then creates twice (an assertion) on a diffusers UNet.
    """
    from lycoris.config import PRESET

    attention = copy.deepcopy(PRESET["attn-only"])
    attention["unet_target_module"] = ["Attention"]
    full = copy.deepcopy(PRESET["full"])
    full["unet_target_name"] = ["conv_in", "conv_out"]
    return {"attention": attention, "full": full}


def _quiet():
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


def write_lycoris(
    pipeline, path: Path, algo: str, preset: str = "full", *, seed: int = 1, metadata=None, **options
) -> Path:
    """A LyCORIS file for ``pipeline`` (``algo``: locon, loha, lokr, full; ``options``: the network's,
    e.g. ``use_tucker``, ``weight_decompose``, ``wd_on_out``), dim 8 alpha 4."""
    from lycoris.kohya import LycorisNetworkKohya

    own = copy.deepcopy(pipeline)
    with _quiet():
        LycorisNetworkKohya.apply_preset(presets()[preset])
        network = LycorisNetworkKohya(
            own.text_encoder,
            own.unet,
            multiplier=1.0,
            lora_dim=DIM,
            conv_lora_dim=DIM,
            alpha=ALPHA,
            conv_alpha=ALPHA,
            network_module=algo,
            **options,
        )
        network.apply_to(own.text_encoder, own.unet, True, True)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("dora_scale"):  # magnitudes near the weights' own norms
                parameter.mul_(1 + 0.1 * noise)
            else:
                parameter.copy_(noise * (0.02 if algo == "full" else 0.2))
    args = {"algo": algo, **{key: str(value) for key, value in options.items()}}
    if options.get("weight_decompose"):
        args["dora_wd"] = "True"
    info = {"ss_network_module": "lycoris.kohya", "ss_network_args": __import__("json").dumps(args)}
    info.update(metadata or {})
    network.save_weights(str(path), torch.float32, info)
    return path


def peer_merge(pipeline, files: list[tuple[Path, float]]):
    """A copy of ``pipeline`` with each file merged by ``lycoris.utils.merge``, in order."""
    from lycoris.utils import merge
    from safetensors.torch import load_file

    own = copy.deepcopy(pipeline)
    for path, weight in files:
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            logging.getLogger("LyCORIS").setLevel(logging.ERROR)
            merge((own.text_encoder,), own.unet, load_file(str(path)), scale=weight)
        assert "Unused state dict key: {}" in out.getvalue(), out.getvalue()[-500:]  # merged in full
    return own


@torch.no_grad()
def peer_forward(pipeline, files: list[tuple[Path, float]]):
    """A copy of ``pipeline`` with each file applied as lycoris-lora's module forward computes it."""
    from lycoris.modules import get_module, make_module
    from safetensors.torch import load_file

    own = copy.deepcopy(pipeline)
    for path, weight in files:
        state = {key: value.float() for key, value in load_file(str(path)).items()}
        for prefix, root in (("lora_te", own.text_encoder), ("lora_unet", own.unet)):
            for child_name, child in list(root.named_modules()):
                name = f"{prefix}.{child_name}".replace(".", "_")
                kind, params = get_module(state, name)
                if kind is None:
                    continue
                with _quiet():
                    module = make_module(kind, params, name, child)
                base = child.weight.detach().clone()
                if hasattr(module, "get_weight"):  # LoHa, LoKr: alpha/r applied once, as in forward
                    delta = module.get_weight(module.shape)
                else:
                    delta = module.get_diff_weight(1.0, module.shape)[0]
                if getattr(module, "wd", False):
                    child.weight.copy_(module.apply_weight_decompose(base + delta, weight))
                else:
                    child.weight.copy_(base + delta * weight)
                bias = params[1] if kind.__name__ == "FullModule" else None
                if bias is not None:
                    child.bias.add_(bias * weight)
    return own


def target_tensors(pipeline) -> dict[str, torch.Tensor]:
    """Every adapter-targetable weight (and bias, ``<key>.bias``) of ``pipeline``, by canonical key."""
    from server.models.shapes import lora_targets

    tensors = {}
    for key, module in lora_targets(pipeline).items():
        tensors[key] = module.weight.detach()
        if module.bias is not None:
            tensors[f"{key}.bias"] = module.bias.detach()
    return tensors


def worst_relative(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``max|got - expected| / max|expected|`` over the tensors, and whose it is."""
    worst, where = 0.0, ""
    for key, value in expected.items():
        scale = float(value.abs().max()) or 1.0
        error = float((got[key].float() - value.float()).abs().max()) / scale
        if error > worst:
            worst, where = error, key
    return worst, where
