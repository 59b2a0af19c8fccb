"""The Prefect API a command-line run talks to: the one at ``PREFECT_API_URL``, or a private
temporary server that is the run's own child and dies with it.

Prefect's own ephemeral server is a plain child process: Ctrl-C in a terminal (SIGINT to the
whole process group) kills it before the run has stopped, and after SIGKILL of the run it is
left running. This one is started in its own session (a terminal's Ctrl-C reaches only the
run, which then stops its flow and the server in order) with the parent-death signal set (the
kernel ends it when the run dies, however it dies). A server that does not come up is tried
again, then reported in one line.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from tera_pipeline.core.errors import TeraError

log = logging.getLogger("tera_pipeline")

ATTEMPTS = 3
STARTUP_TIMEOUT_S = 60


class ApiServerError(TeraError):
    """The temporary Prefect server did not come up."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    with suppress(OSError, AttributeError):  # not Linux: the atexit stop still applies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


def _server_class():
    from prefect.server.api.server import SubprocessASGIServer

    class OwnSessionServer(SubprocessASGIServer):
        """Prefect's temporary server, in its own session, ended with its parent."""

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            real_popen = subprocess.Popen

            def popen(*args, **kwargs):
                kwargs.update(start_new_session=True, preexec_fn=_die_with_parent)
                return real_popen(*args, **kwargs)

            subprocess.Popen = popen  # type: ignore[misc]
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = real_popen  # type: ignore[misc]

    return OwnSessionServer


_SERVER = None


def _server():
    """This process's temporary server, started on first use and kept for later runs of the
    same process (it stops at exit, or with the process however it dies)."""
    global _SERVER
    if _SERVER is not None and _SERVER.server_process and _SERVER.server_process.poll() is None:
        return _SERVER
    for attempt in range(1, ATTEMPTS + 1):
        server = _server_class()()
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
