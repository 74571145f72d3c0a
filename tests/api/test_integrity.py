"""Damaged blobs through a real server: DATA_LOSS naming the version, never a silently different image.

A server uploads four adapters and generates with one; it stops; the blobs are damaged on disk
(4 KiB of other finite weights, NaN bytes, a deleted file); a new server on the same data folder
answers each damaged version with DATA_LOSS (counted in ``loraloom_adapter_load_failures_total``)
while the intact one keeps generating; VerifyStore (manage scope) and ``loraloom adapters verify``
list the damaged versions; uploading the same file again repairs its blob.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from PIL import Image

from adapters import errors
from server.client import Client, DamagedVersion
from server.client.errors import ServerError
from tests.api.helpers import adapter_bytes, micro_config
from tests.api.test_metrics import scrape, value
from tests.store.damage import local_blob, overwrite_tensor_bytes

TOKENS = "adm manage;gen generate"
PROMPT = "a red circle"


def _pixels(result) -> np.ndarray:
    import io

    return np.asarray(Image.open(io.BytesIO(result.images[0].data)))


def test_damaged_blobs_are_data_loss_and_verify_lists_them(tmp_path, micro_shapes):
    from typer.testing import CliRunner

    from server.api.app import ServerThread
    from server.cli.main import app

    home = tmp_path / "home"
    config = micro_config(home, metrics_port=0, tokens=TOKENS)
    names = ("tamper", "poison", "gone", "fine")
    files = {name: adapter_bytes(micro_shapes, seed=seed) for seed, name in enumerate(names, 1)}
    with (
        ServerThread(config) as first,
        Client(first.address, timeout=60, token="adm") as admin,
        Client(first.address, timeout=60, token="gen") as client,
    ):
        versions = {name: admin.upload_adapter(data, name) for name, data in files.items()}
        before = _pixels(client.generate(PROMPT, adapters=["tamper:0.8"], steps=2, seed=3))

    overwrite_tensor_bytes(local_blob(home, versions["tamper"].sha256), 0.25)  # finite: parses fine
    overwrite_tensor_bytes(local_blob(home, versions["poison"].sha256), float("nan"))
    local_blob(home, versions["gone"].sha256).unlink()

    with (
        ServerThread(config) as running,  # restarted: nothing resident, every load reads the disk
        Client(running.address, timeout=60, token="gen") as client,
        Client(running.address, timeout=60, token="adm") as admin,
    ):
        for name in ("tamper", "poison", "gone", "tamper"):
            with pytest.raises(errors.DataLoss) as caught:
                client.generate(PROMPT, adapters=[f"{name}:0.8"], steps=2, seed=3)
            message = str(caught.value)
            assert f"{name}@1" in message and "loraloom adapters verify" in message, message
        with pytest.raises(errors.DataLoss, match="gone@1"):
            admin.load_adapter("gone")
        assert [item.name for item in admin.list_adapters().adapters] == ["fine", "gone", "poison", "tamper"]
        # every other adapter keeps working, and in the same blend as a damaged one nothing is served
        assert client.generate(PROMPT, adapters=["fine:0.8"], steps=2, seed=3).images
        with pytest.raises(errors.DataLoss):
            client.generate(PROMPT, adapters=["fine:0.5", "tamper:0.5"], steps=2, seed=3)

        samples = scrape(running)
        assert value(samples, "loraloom_adapter_load_failures_total", reason="sha256_mismatch") == 4
        assert value(samples, "loraloom_adapter_load_failures_total", reason="missing") == 2
        assert value(samples, "loraloom_adapter_load_failures_total", reason="undecodable") == 0
        assert ("loraloom_adapter_load_failures_total", (("reason", "undecodable"),)) in samples
        assert value(samples, "loraloom_requests_total", method="Generate", code="DATA_LOSS") == 5
        assert value(samples, "loraloom_requests_total", method="Generate", code="INTERNAL") == 0

        with pytest.raises(ServerError) as refused:
            client.verify_store()
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        report = admin.verify_store()
        assert report.checked == 4 and not report.ok
        assert report.damaged == [
            DamagedVersion("gone@1", versions["gone"].sha256, "missing"),
            DamagedVersion("poison@1", versions["poison"].sha256, "sha256_mismatch"),
            DamagedVersion("tamper@1", versions["tamper"].sha256, "sha256_mismatch"),
        ]

        verify = ["adapters", "verify", "--server", running.address]
        cli = CliRunner().invoke(app, verify, env={"LORALOOM_TOKEN": "adm"})
        assert cli.exit_code == 3, cli.output
        for line in ("damaged  gone@1  blob missing", "damaged  tamper@1  bytes changed (sha256 mismatch)"):
            assert line in cli.output
        assert "checked 4 blob(s): 3 damaged version(s)" in cli.output

        # the operator uploads the same files again: the blobs are whole, the old versions serve again
        for name in ("tamper", "poison", "gone"):
            admin.upload_adapter(files[name], name)
        after = _pixels(client.generate(PROMPT, adapters=["tamper@1:0.8"], steps=2, seed=3))
        assert np.array_equal(before, after)
        assert admin.verify_store().ok
        cli = CliRunner().invoke(app, verify, env={"LORALOOM_TOKEN": "adm"})
        assert cli.exit_code == 0 and "every version intact" in cli.output, cli.output
