"""Done-block records and the one-writer lock of a job, kept in its store.

The ledger is a chunked uint8 array ``_ledger`` of shape (phases, *block grid): phase 0 is the
conditioning pass, phase k + 1 is DDIM step k; 1 marks a block whose output is fully written. Its
attributes hold a hash of everything that decides the output bytes, so a resume under another
layout or config is refused with the fields that differ. The lock ``_lock.json`` names the run
that holds the store (host, pid, start time).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tera_pipeline import store
from tera_pipeline.config import JobConfig

LEDGER = "_ledger"
LOCK = "_lock.json"
# Fields that do not change the output bytes: where it goes and how it is scheduled.
_IGNORED = {"out", "cluster", "blocks_in_flight", "retries", "share_seams"}


class ResumeError(RuntimeError):
    """A resume that cannot continue this store (other layout or config, no ledger, ...)."""


class LockError(RuntimeError):
    """The store is held by another run."""


def output_identity(config: JobConfig, checkpoint_sha: str) -> dict:
    """Everything that decides the output bytes."""
    data = {k: v for k, v in config.model_dump(mode="json").items() if k not in _IGNORED}
    data["checkpoint_sha256"] = checkpoint_sha
    data.pop("checkpoint", None)
    return data


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def create(root: Path, config: JobConfig, identity: dict) -> None:
    shape = (config.diffusion.steps + 1, *config.grid().shape)
    chunk = (1, *(min(n, 64) for n in config.grid().shape))
    store.create_array(
        root,
        store.ArraySpec(
            LEDGER,
            shape,
            "uint8",
            ("phase", "zblock", "yblock", "xblock"),
            chunk,
            chunk,
            attributes={"identity": identity, "hash": identity_hash(identity)},
        ),
    )


def check_identity(root: Path, identity: dict) -> None:
    """Raise ``ResumeError`` naming the fields that differ from the stored job."""
    meta_path = Path(root) / LEDGER / "zarr.json"
    if not meta_path.is_file():
        raise ResumeError(f"{root} has no ledger to resume from")
    stored = json.loads(meta_path.read_text())["attributes"]["identity"]
    if identity_hash(stored) == identity_hash(identity):
        return
    a, b = _flat(stored), _flat(identity)
    diff = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    raise ResumeError(f"cannot resume {root}: the job differs ({'; '.join(diff[:5])})")


def mark(root: Path, phase: int, index: tuple[int, ...]) -> None:
    store.open_array(root, LEDGER)[(phase, *index)].write(np.uint8(1)).result()


def done(root: Path, phase: int) -> np.ndarray:
    """The done flags of one phase over the block grid (bool)."""
    return store.open_array(root, LEDGER)[phase].read().result().astype(bool)


def pending(root: Path, phase: int) -> Iterator[tuple[int, ...]]:
    """Blocks of ``phase`` not yet done, in C order, read one slab of the block grid (one block
    row along z) at a time: memory grows with a slab, not with the number of blocks."""
    arr = store.open_array(root, LEDGER)
    for z in range(arr.shape[1]):
        flags = arr[phase, z].read().result()
        for y, x in zip(*np.nonzero(flags == 0)):
            yield (z, int(y), int(x))


def progress(root: Path) -> list[tuple[int, int]]:
    """(done, total) per phase."""
    flags = store.open_array(root, LEDGER).read().result()
    return [(int(p.sum()), int(p.size)) for p in flags]


# -- the one-writer lock --------------------------------------------------------------------------
def holder(root: Path) -> dict | None:
    path = Path(root) / LOCK
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def alive(owner: dict) -> bool:
    """A holder on this host is alive while its pid runs; one on another host counts as alive."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return f"host {owner.get('host')}, pid {owner.get('pid')}, started {started}"


def check_lock(root: Path, resume: bool) -> None:
    """Raise unless this run may hold the store: no lock, or a stale one taken over by resume."""
    owner = holder(root)
    if owner is None:
        return
    if alive(owner):
        raise LockError(f"{root} is being written by another run ({describe(owner)})")
    if not resume:
        raise LockError(
            f"{root} was left by a run that died ({describe(owner)}); continue it with --resume"
        )


def acquire(root: Path, resume: bool = False) -> None:
    """Take the lock (replacing a stale one only when resuming)."""
    check_lock(root, resume)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    tmp = Path(root) / f"{LOCK}.{os.getpid()}"
    tmp.write_text(json.dumps(me))
    tmp.replace(Path(root) / LOCK)


def release(root: Path) -> None:
    owner = holder(root)
    if owner and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        (Path(root) / LOCK).unlink(missing_ok=True)
