"""`loraloom serve` as a subprocess: the README's commands end to end, then a SIGTERM drain.

The tests in this module share one server process; the drain test runs last and ends it.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image as PILImage

from adapters import errors
from server.api.codegen import REPO_ROOT
from server.client import Client
from tests.api.helpers import adapter_bytes

pytestmark = pytest.mark.slow
LISTENING = re.compile(r"listening on (127\.0\.0\.1:\d+)")


def cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli.main", *args],
        cwd=REPO_ROOT,
        stdin=subprocess.DEVNULL,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "LORALOOM_HOME": str(home), "LORALOOM_MODEL": "micro", "LORALOOM_DEFAULT_STEPS": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "server.cli.main", "serve", "--port", "0", "--grace-s", "60"],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def pump() -> None:
        for line in process.stderr:
            log.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    address = None
    deadline = time.monotonic() + 120
    while address is None and time.monotonic() < deadline:
        try:
            match = LISTENING.search(lines.get(timeout=1))
        except queue.Empty:
            assert process.poll() is None, "".join(log)
            continue
        address = match.group(1) if match else None
    assert address, "".join(log)
    env["LORALOOM_SERVER"] = address
    with Client(address, timeout=60) as client:
        client.wait_ready(120)
        yield process, client, env, log
    if process.poll() is None:
        process.kill()
        process.wait(10)


def test_configuration_is_logged_at_start(served):
    _, client, _, log = served
    assert any("configuration:" in line and "model=micro" in line for line in log)
    assert client.server_info().base_model.name == "micro"


def test_readme_commands(served, micro_shapes, tmp_path):
    _, _, env, log = served
    path = tmp_path / "style.safetensors"
    path.write_bytes(adapter_bytes(micro_shapes, seed=2))
    uploaded = cli("adapters", "upload", str(path), "--name", "style", env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    assert "uploaded style@1" in uploaded.stdout
    out = tmp_path / "out.png"
    made = cli("generate", "a red circle", "--adapter", "style:0.8", "-o", str(out), "--seed", "3", env=env)
    assert made.returncode == 0, made.stderr
    assert "--seed 3 --steps 2" in made.stdout and "--adapter style@1:0.8" in made.stdout
    request_id = re.search(r", request ([0-9a-f]{16}); reproduce with", made.stdout).group(1)
    deadline = time.monotonic() + 10  # the server's stderr is read by another thread
    while not any(f"request_id={request_id}" in line for line in log) and time.monotonic() < deadline:
        time.sleep(0.05)
    logged = [line for line in log if "loraloom.requests: generated" in line]
    assert any(f"request_id={request_id}" in line and "seed=3" in line for line in logged), logged
    assert PILImage.open(io.BytesIO(out.read_bytes())).size == (32, 32)
    listed = cli("adapters", "list", env=env)
    assert listed.returncode == 0 and "style@1" in listed.stdout
    shown = cli("adapters", "show", "style", "--json", env=env)
    assert '"name": "style"' in shown.stdout
    aliased = cli("adapters", "alias", "style", "stable", "1", env=env)
    assert "style@stable -> style@1" in aliased.stdout
    info = cli("info", env=env)
    assert "micro" in info.stdout and "ready" in info.stdout
    pinned = cli("adapters", "load", "style@stable", "--pin", env=env)
    assert pinned.returncode == 0 and "pinned style@1" in pinned.stdout, pinned.stderr
    resident = cli("adapters", "resident", env=env)
    assert "style@1" in resident.stdout and "(pinned)" in resident.stdout
    unloaded = cli("adapters", "unload", "style@1", env=env)
    assert unloaded.returncode == 0 and "unloaded style@1" in unloaded.stdout
    again = cli("adapters", "unload", "style@1", env=env)
    assert "was not resident" in again.stdout
    failed = cli("generate", "a red circle", "--adapter", "nobody", env=env)
    assert failed.returncode == 1 and "NotFound" in failed.stderr
    failed_id = re.search(r"request ([0-9a-f]{16})", failed.stderr).group(1)  # the CLI's own id
    deadline = time.monotonic() + 10
    while not any(f"request_id={failed_id}" in line for line in log) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(f"request_id={failed_id}" in line and "generation failed" in line for line in log)
    missing = cli("adapters", "show", "nobody", env=env)
    assert missing.returncode == 1 and "NotFound" in missing.stderr
    unasked = cli("adapters", "delete", "style", env=env)  # no terminal to confirm on: nothing deleted
    assert unasked.returncode == 1 and "add --yes" in unasked.stderr
    assert "style@1" in cli("adapters", "list", env=env).stdout
    deleted = cli("adapters", "delete", "style", "--yes", env=env)
    assert deleted.returncode == 0 and "style@1" in deleted.stdout


def test_client_commands_do_not_import_torch():
    code = (
        "import sys, server.cli.main, server.client; "
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


def test_unreachable_server_is_a_clear_error(tmp_path):
    env = {**os.environ, "LORALOOM_SERVER": "127.0.0.1:1"}
    result = cli("adapters", "list", "--timeout", "3", env=env)
    assert result.returncode == 1 and "loraloom serve" in result.stderr


def test_sigterm_drains_three_requests_in_flight(served):
    """Runs last: readiness NOT_SERVING at once, new calls UNAVAILABLE, the 3 in flight finish, exit 0."""
    process, client, _, log = served
    results: list[object] = []
    steps = _steps_lasting(client, seconds=1.5)

    def one(seed: int) -> None:
        try:
            results.append(client.generate("a red circle", steps=steps, seed=seed, timeout=120))
        except errors.LoraloomError as error:
            results.append(error)

    workers = [threading.Thread(target=one, args=(seed,)) for seed in range(3)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        queue_stats = client.server_info().queue
        if queue_stats.running + queue_stats.queued == 3:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the three requests never got in flight")
    process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.health() == "NOT_SERVING"
    with pytest.raises(errors.Unavailable):
        client.generate("too late", steps=1)
    for worker in workers:
        worker.join(120)
    assert process.wait(120) == 0, "".join(log)
    assert len(results) == 3 and all(not isinstance(item, Exception) for item in results), results
    assert any("draining: 3 call(s) in flight" in line for line in log)


def _steps_lasting(client: Client, seconds: float) -> int:
    """Steps for a request of about ``seconds`` on this machine now (4 to 150)."""
    started = time.monotonic()
    client.generate("a red circle", steps=4, seed=0)
    per_step = (time.monotonic() - started) / 4
    return max(4, min(150, round(seconds / per_step)))
