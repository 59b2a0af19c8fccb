"""The one-writer lock of a store: ``_lock.json``, created atomically, refreshed by a heartbeat.

- **Atomic.** The lock's bytes are written to a private file first and hard-linked to
  ``_lock.json``: the link fails if the lock exists, and a lock that exists is always complete.
  Of any number of runs started at once on one store, exactly one gets it.
- **Holder.** host, pid, start time, a random token, and ``heartbeat``: the time the holder
  last refreshed it (every ``HEARTBEAT_S`` while it runs).
- **Stale.** A lock of this host is stale when its pid no longer runs (or now names a process
  started after the lock); a lock of another host
  when its heartbeat is older than ``STALE_AFTER_S``. A stale lock is taken over only by
  ``--resume`` (or by ``--break-lock``, which also takes over another host's live-looking lock
  and says what it breaks). The takeover itself is exclusive (``_lock.json.takeover``).
- **Corrupt.** An empty or unreadable lock refuses, naming the file: no guess is made.
- **Re-entrant.** A process that holds the lock may ask for it again (the CLI takes it before
  Prefect starts; the flow asks again): it gets the same lease.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from tera_pipeline.core.errors import TeraError
from tera_pipeline.storage.atomic import write_bytes

log = logging.getLogger("tera_pipeline")

LOCK = "_lock.json"
TAKEOVER = f"{LOCK}.takeover"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 300.0
"""Another host's lock whose heartbeat is older than this is stale (20 missed heartbeats)."""


class LockError(TeraError):
    """The store is held by another run, or its lock cannot be read."""


def read(root: Path) -> dict | None:
    """The holder recorded in the lock, None when there is no lock; a corrupt lock raises."""
    path = Path(root) / LOCK
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        raise LockError(f"{path} cannot be read ({err}); check it by hand") from None
    try:
        owner = json.loads(text)
        if not isinstance(owner, dict) or not {"host", "pid", "started"} <= set(owner):
            raise ValueError("not a lock record")
        int(owner["pid"])
    except (ValueError, TypeError):
        raise LockError(
            f"{path} is empty or corrupt; if no run is writing this store, delete that file"
        ) from None
    return owner


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host')}, pid {owner.get('pid')}, started {started}"


def _pid_runs(pid: int, since: float) -> bool:
    """Whether ``pid`` runs and is the process that started by ``since`` (not a reused pid)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() <= since + 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True


def alive(owner: dict, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the holder may still be running (see the module docstring)."""
    if owner.get("host") == socket.gethostname():
        return _pid_runs(int(owner["pid"]), float(owner.get("started", 0)))
    beat = float(owner.get("heartbeat", owner.get("started", 0)))
    return time.time() - beat < stale_after_s


@dataclass
class Lease:
    """This process's hold on a store's lock; ``release`` removes the lock only if still ours."""

    root: Path
    record: dict
    depth: int = 1
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def beat(self) -> None:
        """Refresh the heartbeat (atomic replace of our own lock)."""
        if not self.ours():
            return
        self.record["heartbeat"] = time.time()
        write_bytes(self.root / LOCK, json.dumps(self.record).encode())

    def ours(self) -> bool:
        try:
            owner = read(self.root)
        except LockError:
            return False
        return bool(owner) and owner.get("token") == self.record["token"]

    def start_heartbeat(self, every_s: float = HEARTBEAT_S) -> None:
        def run() -> None:
            while not self._stop.wait(every_s):
                with suppress(OSError):
                    self.beat()

        self._thread = threading.Thread(target=run, name="tera-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.ours():
            (self.root / LOCK).unlink(missing_ok=True)


_HELD: dict[str, Lease] = {}
_HELD_GUARD = threading.Lock()


def _record() -> dict:
    now = time.time()
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": now,
        "heartbeat": now,
        "token": uuid.uuid4().hex,
    }


def _link(root: Path, record: dict) -> bool:
    """Create the lock from ``record`` atomically; False if a lock exists."""
    private = root / f"{LOCK}.{record['token']}"
    private.write_text(json.dumps(record))
    try:
        os.link(private, root / LOCK)
        return True
    except FileExistsError:
        return False
    finally:
        private.unlink(missing_ok=True)


def _take_over(root: Path, judged: dict, record: dict) -> None:
    """Replace the stale lock ``judged`` with ours, one taker at a time."""
    guard = root / TAKEOVER
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if time.time() - guard.stat().st_mtime > 60:  # a taker that died mid-takeover
            guard.unlink(missing_ok=True)
            return _take_over(root, judged, record)
        raise LockError(f"{root}: another run is taking over its stale lock") from None
    try:
        os.write(fd, json.dumps(record).encode())
        os.close(fd)
        current = read(root)
        if current is None:
            if not _link(root, record):
                raise LockError(f"{root} was taken by another run at the same moment")
            return
        if current.get("token") != judged.get("token") or current.get("pid") != judged.get("pid"):
            raise LockError(f"{root} is being written by another run ({describe(current)})")
        write_bytes(root / LOCK, json.dumps(record).encode())
    finally:
        guard.unlink(missing_ok=True)


def check(root: Path, resume: bool = False, break_lock: bool = False) -> None:
    """Raise ``LockError`` unless this run could take the lock now (reads only)."""
    owner = read(root)
    if owner is None or _mine(root, owner):
        return
    if break_lock and owner.get("host") != socket.gethostname():
        return
    if alive(owner):
        raise LockError(f"{root} is being written by another run ({describe(owner)})")
    if not (resume or break_lock):
        raise LockError(
            f"{root} was left by a run that died ({describe(owner)}); continue it with --resume"
        )


def _mine(root: Path, owner: dict) -> bool:
    lease = _HELD.get(str(Path(root).resolve()))
    return lease is not None and owner.get("token") == lease.record["token"]


def acquire(root: Path, resume: bool = False, break_lock: bool = False) -> Lease:
    """Take the store's lock (``root`` must exist); see the module docstring for the rules."""
    root = Path(root)
    key = str(root.resolve())
    with _HELD_GUARD:
        lease = _HELD.get(key)
        if lease is not None and lease.ours():
            lease.depth += 1
            return lease
        record = _record()
        if not _link(root, record):
            owner = read(root)
            if owner is None:  # released between our attempt and the read
                if not _link(root, record):
                    raise LockError(f"{root} was taken by another run at the same moment")
            else:
                check(root, resume, break_lock)
                if alive(owner):
                    log.warning("--break-lock: taking %s from %s", root, describe(owner))
                _take_over(root, owner, record)
        lease = Lease(root, record)
        lease.start_heartbeat()
        _HELD[key] = lease
        return lease


def release(lease: Lease) -> None:
    """Give the lease back; the lock goes when its outermost holder releases it."""
    with _HELD_GUARD:
        lease.depth -= 1
        if lease.depth > 0:
            return
        _HELD.pop(str(lease.root.resolve()), None)
        lease.release()


@contextmanager
def held(root: Path, resume: bool = False, break_lock: bool = False) -> Iterator[Lease]:
    """Hold the lock for the duration of the block."""
    lease = acquire(root, resume, break_lock)
    try:
        yield lease
    finally:
        release(lease)
