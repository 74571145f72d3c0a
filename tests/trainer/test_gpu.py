"""Mixed precision on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from trainer import TrainConfig, train


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_autocast_training_on_cuda(tmp_path, shapes_dir, precision):
    config = TrainConfig(
        data_dir=str(shapes_dir), base="tiny", steps=5, batch_size=4, lr=1e-3, device="cuda",
        mixed_precision=precision, min_snr_gamma=5.0, output_dir=str(tmp_path), no_register=True,
        progress=False,
    )  # fmt: skip
    result = train(config)
    assert result.steps == 5 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(m.down.dtype == torch.float32 for m in result.adapter.modules.values())
    assert any(torch.count_nonzero(m.up) for m in result.adapter.modules.values())
