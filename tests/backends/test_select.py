"""``auto`` backend and precision: what a server runs when it is not told."""

from __future__ import annotations

import importlib.util

import pytest

from adapters.errors import InvalidArgument
from server.backends.select import check_backend, choose_backend
from server.settings import EngineSettings

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


def test_the_server_defaults_to_auto():
    config = EngineSettings()
    assert (config.backend, config.precision, config.compile) == ("auto", "auto", False)


@pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed")
def test_auto_on_a_float32_cpu_model_is_openvino_at_the_cpus_best_precision():
    from server.backends.openvino_runtime import cpu_supports_bf16

    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert choose_backend("auto", "auto", "cpu") == ("openvino", expected)
    assert choose_backend("auto", "fp32", "cpu") == ("openvino", "fp32")


def test_auto_is_torch_off_the_cpu_for_half_precision_models_or_with_compile():
    assert choose_backend("auto", "auto", "cuda") == ("torch", "fp32")
    assert choose_backend("auto", "auto", "cpu", "float16") == ("torch", "fp32")
    assert choose_backend("auto", "auto", "cpu", compile=True) == ("torch", "fp32")


def test_explicit_settings_pass_through_and_are_still_checked():
    assert choose_backend("onnxruntime", "auto", "cpu") == ("onnxruntime", "fp32")
    assert choose_backend("torch", "fp32", "cpu") == ("torch", "fp32")
    with pytest.raises(InvalidArgument, match="needs backend openvino"):
        check_backend(*choose_backend("torch", "bf16", "cpu"))
