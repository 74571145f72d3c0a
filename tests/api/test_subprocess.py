"""`loraloom serve` as a subprocess: the README's commands end to end, then a SIGTERM drain.

The tests of the ``served`` fixture share one server process; its drain test ends it. The
tests after it start their own: a stop past the grace on each backend (readiness at once,
the running request stopped, exit 0 in time, no abort), a start that forks nothing and
sends no OpenVINO telemetry, a start that fails or is stopped while loading.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image as PILImage

from adapters import errors
from server.api.codegen import REPO_ROOT
from server.client import Client, types
from server.client.errors import Unreachable
from tests.api.helpers import adapter_bytes
from tests.serving import Serving

pytestmark = pytest.mark.slow


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
    server = Serving("--grace-s", "60", env=env)
    address = server.address()
    env["LORALOOM_SERVER"] = address
    try:
        with Client(address, timeout=60) as client:
            client.wait_ready(120)
            yield server.process, client, env, server.log
    finally:
        server.kill()


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


# ---------------------------------------------------------------- stops, starts, no forks, no telemetry

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="the openvino package is not installed"
)
# Variables under which OpenVINO's telemetry is off anyway: not in the tests' environment.
CI_VARIABLES = ("CI", "TF_BUILD", "JENKINS_URL")


@pytest.fixture(scope="module")
def model_home(tmp_path_factory):
    """A LORALOOM_HOME shared by the tests below, so OpenVINO converts the model once."""
    return tmp_path_factory.mktemp("model-home")


def _env(home, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in CI_VARIABLES}
    return {**env, "LORALOOM_HOME": str(home), **extra}


def _descendants(pid: int) -> dict[int, str]:
    """``pid``'s child processes and theirs, now: pid -> command line (psutil, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        found = {}
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return {}
        for child in children:
            try:
                found[child.pid] = " ".join(child.cmdline())
            except psutil.Error:  # gone, or a zombie not yet reaped
                found[child.pid] = "?"
        return found
    found, parents = {}, [pid]
    while parents:
        parent = parents.pop()
        for listing in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(kid) for kid in listing.read_text().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found:
                    try:
                        found[kid] = Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                    except OSError:
                        found[kid] = "?"
                    parents.append(kid)
    return found


class ChildWatch:
    """Every child process ``pid`` has had while watched (polled every 5 ms on a thread)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.seen: dict[int, str] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._done.is_set():
            for child, command in _descendants(self.pid).items():
                self.seen.setdefault(child, command)
            time.sleep(0.005)

    def stop(self) -> dict[int, str]:
        self._done.set()
        self._thread.join(5)
        return self.seen


def _not_serving_after(client: Client, since: float, timeout: float = 5.0) -> float:
    """Seconds from ``since`` until the health service said readiness is NOT_SERVING (polled)."""
    while time.monotonic() < since + timeout:
        if client.health(timeout=1) == "NOT_SERVING":
            return time.monotonic() - since
    pytest.fail(f"readiness still SERVING {timeout:g}s after SIGTERM")


@needs_openvino
def test_an_openvino_server_forks_nothing_and_sends_no_telemetry(model_home, tmp_path):
    """A start that converts the model with OpenVINO (its telemetry used to fork a child per event)."""
    user_home = tmp_path / "user"  # OpenVINO's telemetry keeps its client id in ~/intel
    user_home.mkdir()
    fresh = not any(model_home.iterdir())  # else another test converted the model already
    home = model_home if fresh else tmp_path / "home"
    server = Serving(
        "--model", "tiny", "--backend", "openvino", "--grace-s", "1", env=_env(home, HOME=str(user_home))
    )
    watch = ChildWatch(server.process.pid)
    try:
        with Client(server.address(), timeout=120) as client:
            client.wait_ready(120)
            client.generate("a red circle", steps=2, seed=0)  # whatever is converted lazily
            assert not _descendants(server.process.pid)  # none remains
        children = watch.stop()
        assert server.wait_logged("OpenVINO telemetry off (openvino_telemetry blocked")
        assert not children, f"the server started child processes: {children}"
        assert not (user_home / "intel").exists(), "OpenVINO's telemetry ran (~/intel was written)"
        assert any("compiling the lean OpenVINO UNet" in line for line in server.log)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(10) == 0, server.text
    finally:
        watch.stop()
        server.kill()


@pytest.mark.parametrize(
    ("backend", "size"),
    # OpenVINO at 192 px: a step takes longer than the stop waits for the engine (0.25 s), so the
    # process often exits with the worker inside an infer call (that used to abort).
    [pytest.param("openvino", 192, marks=needs_openvino), ("torch", 64)],
)
def test_sigterm_past_the_grace_stops_the_running_request_and_exits_0(backend, size, model_home):
    grace = 1.0
    server = Serving(
        "--model", "tiny", "--backend", backend, "--grace-s", str(grace), "--max-steps", "1000",
        "--no-warmup", env=_env(model_home),
    )  # fmt: skip
    outcome: list[object] = []
    stepping = threading.Event()
    try:
        with Client(server.address(), timeout=120) as client:
            client.wait_ready(120)

            def long_request() -> None:
                def on_event(event) -> None:
                    if isinstance(event, types.Progress):
                        stepping.set()

                try:
                    outcome.append(
                        client.generate(
                            "a red circle", steps=1000, width=size, height=size, seed=1, on_event=on_event
                        )
                    )
                except errors.LoraloomError as error:
                    outcome.append(error)

            caller = threading.Thread(target=long_request)
            caller.start()
            assert stepping.wait(90), server.text  # denoising has begun
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            flipped = _not_serving_after(client, signalled)
            code = server.process.wait(grace + 10)
            exited = time.monotonic() - signalled
            caller.join(10)
    finally:
        server.kill()
    log = server.text
    assert flipped < 0.1, f"readiness went NOT_SERVING {flipped:.3f}s after SIGTERM"
    assert code == 0 and exited < grace + 1.0, (code, exited, log)
    assert "terminate called" not in log and "Traceback" not in log, log
    assert "grace over; ended 1 call(s) in flight" in log
    assert len(outcome) == 1 and isinstance(outcome[0], errors.Unavailable), outcome
    assert not isinstance(outcome[0], Unreachable)  # the server said why: it shut down
    assert "shut down" in str(outcome[0])


def test_a_start_that_fails_logs_why_and_exits_1(tmp_path):
    missing = tmp_path / "missing.safetensors"
    result = cli("serve", "--port", "0", "--model", str(missing), "--backend", "torch", env=_env(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "could not start" in result.stderr and str(missing) in result.stderr


def test_sigterm_while_loading_exits_0_at_once(tmp_path):
    server = Serving("--model", "tiny", "--backend", "torch", env=_env(tmp_path))
    try:
        server.address()  # listening; the model loads and warms up now (seconds)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        code = server.process.wait(10)
        exited = time.monotonic() - signalled
    finally:
        server.kill()
    assert code == 0 and exited < 1.0, (code, exited, server.text)
    assert "stopping before the model finished loading" in server.text
    assert "terminate called" not in server.text


@needs_openvino
@pytest.mark.parametrize("imported_first", [False, True], ids=["before-import", "after-import"])
def test_openvino_telemetry_is_off_in_process(imported_first, tmp_path):
    """``disable_telemetry`` in a fresh interpreter: ovc's stub, no fork, nothing in ~ (before import)."""
    code = f"""
import os, sys
forks = []
os.register_at_fork(before=lambda: forks.append(1))
if {imported_first}:
    import time
    import openvino  # its import sends an event (from a thread): gone before telemetry is off
    import openvino_telemetry
    sender = openvino_telemetry.Telemetry().sender
    while sender.queue_size and time.sleep(0.01) is None:
        pass
from server.backends.openvino_runtime import disable_telemetry, openvino, telemetry_enabled
print(disable_telemetry())
before = len(forks)
import torch
openvino().convert_model(torch.nn.Linear(4, 4), example_input=torch.zeros(1, 4))
assert not telemetry_enabled()
assert len(forks) == before, "the conversion forked"
print("intel" in os.listdir(os.environ["HOME"]))
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=_env(tmp_path, HOME=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    how, wrote_home = result.stdout.split("\n")[:2]
    assert ("imported already" in how) == imported_first, how
    assert wrote_home == str(imported_first)  # only openvino's own import (before) writes ~/intel
