"""The Prefect API a command-line run talks to: the one at ``PREFECT_API_URL``, or a private
temporary server that is the run's own child and dies with it.

The temporary server is Prefect's API app under uvicorn, run with the command and settings of
Prefect's own temporary server (``SubprocessASGIServer``), but launched from here: importing
Prefect's server package only to launch it cost this process about 4 s of CPU per run. Prefect's
server is a plain child process: Ctrl-C in a terminal (SIGINT to the whole process group) kills
it before the run has stopped, and after SIGKILL of the run it is left running. This one is
started in its own session (a terminal's Ctrl-C reaches only the run, which then stops its flow
and the server in order) with the parent-death signal set (the kernel ends it when the run
dies, however it dies). A server that does not come up is tried again, then reported in one
line.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

from tera_pipeline.core.errors import TeraError

log = logging.getLogger("tera_pipeline")

ATTEMPTS = 3
STARTUP_TIMEOUT_S = 60
PORT_IN_USE = 3
"""uvicorn's exit status when its port was taken between our choice and its bind."""


class ApiServerError(TeraError):
    """The temporary Prefect server did not come up."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    with suppress(OSError, AttributeError):  # not Linux: the atexit stop still applies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryServer:
    """Prefect's API on a free loopback port, as this process's child."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _launch(self) -> subprocess.Popen:
        import prefect
        from prefect.settings import get_current_settings

        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **settings}  # fmt: skip
        app_dir = str(Path(prefect.__file__).resolve().parent.parent)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory",
                   "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port",
                   str(self.port), "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        return subprocess.Popen(
            command, env=env, start_new_session=True, preexec_fn=_die_with_parent
        )

    def start(self, timeout: float) -> None:
        """Launch it and wait until its health endpoint answers (at most ``timeout`` s)."""
        self.process = self._launch()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == PORT_IN_USE:
                self.port = _free_port()
                self.process = self._launch()
                continue
            if code is not None:
                raise ApiServerError(f"the temporary Prefect server exited with status {code}")
            if self._healthy():
                return
            time.sleep(0.1)
        raise ApiServerError(f"no answer from the temporary Prefect server in {timeout:.0f} s")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


_SERVER: TemporaryServer | None = None


def _server() -> TemporaryServer:
    """This process's temporary server, started on first use and kept for later runs of the
    same process (it stops at exit, or with the process however it dies)."""
    global _SERVER
    if _SERVER is not None and _SERVER.running():
        return _SERVER
    for attempt in range(1, ATTEMPTS + 1):
        server = TemporaryServer()
        try:
            server.start(timeout=STARTUP_TIMEOUT_S)
            _SERVER = server
            return server
        except Exception as err:  # noqa: BLE001 - any failure to come up is retried
            server.stop()
            log.warning("temporary Prefect server, attempt %d: %s", attempt, str(err)[:200])
    raise ApiServerError(
        f"the temporary Prefect server did not come up in {ATTEMPTS} attempts of "
        f"{STARTUP_TIMEOUT_S} s; start one (prefect server start) and set PREFECT_API_URL"
    )


@contextmanager
def prefect_api() -> Iterator[str | None]:
    """Use ``PREFECT_API_URL`` if set, else this process's temporary server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    server = _server()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        try:
            yield server.api_url
        finally:
            _flush_logs()


def _flush_logs() -> None:
    """Send the run's queued log lines and events while the server still listens (and stop
    those senders, which would otherwise retry against a closed port)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        with suppress(Exception):
            service.drain_all(timeout=10, at_exit=False)
