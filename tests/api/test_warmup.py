"""The server's warm-up: one denoising step at the default size, the decoder prepared, no decode (#22)."""

from __future__ import annotations

import pytest

from server.bootstrap import build_service
from server.engine.types import GenerateRequest
from tests.api.helpers import micro_config


@pytest.mark.parametrize("backend, precision", [("torch", "fp32"), ("openvino", "fp32")])
def test_the_warm_up_denoises_prepares_the_decoder_and_decodes_nothing(tmp_path, backend, precision):
    steps: list[int] = []
    service = build_service(
        micro_config(tmp_path, backend=backend, precision=precision),
        before_step=lambda index, total: steps.append(total),
    )
    try:
        vae = service.engine._run_pipeline.vae
        decode = vae.decode
        decodes: list[tuple[int, ...]] = []

        def counted(latents, *args, **kwargs):
            decodes.append(tuple(latents.shape))
            return decode(latents, *args, **kwargs)

        vae.decode = counted
        service.warmup()
        assert service.ready
        assert steps == [1] and decodes == []  # one step denoised, nothing decoded
        size = service.engine.resolution // service.engine.pipeline.vae_scale_factor
        if backend == "openvino":
            assert (1, 4, size, size) in vae.compiled_shapes  # compiled for the default size
        result = service.submit(GenerateRequest("a fox", steps=2, seed=1)).result(timeout=120)
        assert len(result.images) == 1 and decodes == [(1, 4, size, size)]
    finally:
        service.close()
