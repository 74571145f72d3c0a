"""What a server process sets for itself: no telemetry, no library forks, an exit that never aborts.

``prepare()`` runs first in ``loraloom serve``, before OpenVINO is imported:

- OpenVINO's usage telemetry is off (``server.backends.openvino_runtime.disable_telemetry``).
  It posted each event from a child forked off a thread of the server.
- Libraries start processes with ``spawn``, never ``fork``: a fork of this threaded
  process copies locks that other threads hold (the child can block forever, e.g. in
  a DNS lookup) and asyncio's signal set-up. Such a child ignores SIGTERM (asyncio's
  no-op handler, so ``Process.terminate`` leaves it running) and writes every signal
  it gets into the server's wake-up socket: the server took the telemetry child's
  SIGTERM for its own and shut down in the middle of loading the model, exit 0.
  A child forked anyway (``os.fork``) gets default signal handling and no wake-up
  socket, and the server logs a warning naming the thread that forked.

``exit_now(code)`` ends the process without the interpreter's teardown, which the
server does once it has stopped: the teardown of torch and OpenVINO takes seconds, and
under a thread still inside native code (an engine step past its time, a model load)
it aborts the process (``terminate called without an active exception``, see
``server.api.app``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading

log = logging.getLogger("loraloom.server")

_prepared = False


def prepare() -> None:
    """Telemetry off, ``spawn`` for library subprocesses, the fork hooks. Idempotent."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    from server.backends.openvino_runtime import disable_telemetry

    log.info("OpenVINO telemetry off (%s)", disable_telemetry())
    multiprocessing.set_start_method("spawn", force=True)
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def _before_fork() -> None:
    log.warning(
        "thread %s forks the server process (a library using os.fork); the child gets default "
        "signal handling",
        threading.current_thread().name,
    )


def _after_fork_in_child() -> None:
    """A forked child must not act on the server's signals: default SIGTERM/SIGINT, no wake-up socket."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except (OSError, ValueError):  # not the main thread of the child: nothing inherited to undo
        pass


def exit_now(code: int) -> None:
    """Flush the log and the standard streams, then end the process at once (``os._exit``)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)
