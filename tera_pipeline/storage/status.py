"""What a job's store says of its run: progress per phase, holder, state, last error, cost."""

from __future__ import annotations

import time
from pathlib import Path

from tera_pipeline.storage import ledger, lock, store


def job_status(root: Path) -> dict:
    """Status of a running, finished, failed or dead job from its store alone: blocks done per
    phase, when each phase last finished a block, the time since the start and since the last
    block, the holder and the last error."""
    root = Path(root)
    if (root / ledger.LEDGER / "zarr.json").is_file() and not ledger.created(root):
        return _cut_short(root)
    if root.is_dir() and not (root / "zarr.json").exists() and (root / lock.LOCK).exists():
        return _cut_short(root)  # only the lock: stopped before anything was written
    attrs = store.group_attrs(root).get("tera_pipeline")
    if not isinstance(attrs, dict):
        raise store.StoreError(f"{root} is not a tera-pipeline store")
    steps = attrs["config"]["diffusion"]["steps"]
    progress = ledger.progress(root)
    names = [ledger.phase_name(row, steps) for row in range(len(progress))]
    last = _last_block_times(root, len(names))
    walls = {p["phase"]: p["wall_s"] for p in attrs.get("run", {}).get("phases", [])}
    phases = [
        {"phase": n, "done": d, "total": t, "last_block": last[i], "wall_s": walls.get(n)}
        for i, (n, (d, t)) in enumerate(zip(names, progress, strict=True))
    ]
    holder, lock_problem = _holder(root)
    state = attrs.get("status", "unknown")
    if state == "running" and holder is None:
        state = "stopped (resume with --resume)"
    elif state == "running" and not lock.alive(holder):
        state = "dead (resume with --resume)"
    elif state in ("stopped", "failed"):
        state += " (resume with --resume)"
    if lock_problem:
        state = f"{state}; {lock_problem}"
    now = time.time()
    started = _epoch(attrs.get("resumed") or attrs.get("started"))
    latest = max((t for t in last if t is not None), default=None)
    return {
        "store": str(root),
        "state": state,
        "phases": phases,
        "holder": lock.describe(holder) if holder else None,
        "started": attrs.get("started"),
        "resumed": attrs.get("resumed"),
        "elapsed_s": None if started is None else now - started,
        "since_last_block_s": None if latest is None else now - latest,
        "last_error": attrs.get("last_error"),
        "cost": sampling_cost(attrs["config"]),
    }


def sampling_cost(config: dict) -> dict:
    """What a job pays per output voxel: E, patch evaluations per voxel and step, and model
    evaluations per voxel (E x one model call per step x steps)."""
    from tera_pipeline.core.config import JobConfig

    job = JobConfig.from_record(config)
    e = job.evaluations_per_voxel()
    return {"E": round(e, 3), "model_evaluations_per_voxel": round(e * job.diffusion.steps, 2)}


def _holder(root: Path) -> tuple[dict | None, str | None]:
    try:
        return lock.read(root), None
    except lock.LockError as err:
        return None, str(err)


def _cut_short(root: Path) -> dict:
    holder, problem = _holder(root)
    state = "creation cut short (start it again with --resume)"
    if holder and lock.alive(holder):
        state = "being created"
    return {
        "store": str(root),
        "state": state if not problem else f"{state}; {problem}",
        "phases": [],
        "holder": lock.describe(holder) if holder else None,
        "started": None,
        "resumed": None,
        "elapsed_s": None,
        "since_last_block_s": None,
        "last_error": None,
    }


def _last_block_times(root: Path, phases: int) -> list[float | None]:
    """Per phase, when its last block was recorded: the newest ledger chunk of that phase
    (chunks are (1, blocks...) so phase p's files are ``_ledger/c/<p>/...``)."""
    out: list[float | None] = []
    for p in range(phases):
        times = [f.stat().st_mtime for f in (root / ledger.LEDGER / "c" / str(p)).rglob("*")
                 if f.is_file()]  # fmt: skip
        out.append(max(times) if times else None)
    return out


def _epoch(stamp: str | None) -> float | None:
    if not stamp:
        return None
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S"))


def duration(seconds: float | None) -> str:
    """12 s, 3 min 04 s, 2 h 05 min."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def clock(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def format_status(info: dict) -> list[str]:
    """The lines ``tera status`` prints."""
    head = f"{info['store']}: {info['state']}"
    if info["started"]:
        head += f" (started {info['started']}"
        if info.get("resumed"):
            head += f", resumed {info['resumed']}"
        head += f", {duration(info['elapsed_s'])} ago)"
    lines = [head]
    if info["since_last_block_s"] is not None:
        lines.append(f"last block done {duration(info['since_last_block_s'])} ago")
    if info["holder"]:
        lines.append(f"held by {info['holder']}")
    for p in info["phases"]:
        bar = "#" * round(20 * p["done"] / max(p["total"], 1))
        when = f"took {p['wall_s']:.1f} s" if p["wall_s"] is not None else clock(p["last_block"])
        when = when if p["done"] else ""
        lines.append(
            f"  {p['phase']:>14}  {p['done']:>7}/{p['total']:<7} {bar:<20}  {when}".rstrip()
        )
    if info.get("cost"):
        c = info["cost"]
        lines.append(
            f"cost: E = {c['E']:g} patch evaluations per voxel and step, "
            f"{c['model_evaluations_per_voxel']:g} model evaluations per voxel"
        )
    if info["last_error"]:
        err = info["last_error"]
        lines.append(f"last error ({err['time']}): {err['message']}")
    return lines


def record_error(root: Path, err: BaseException | None) -> None:
    """Keep what stopped a run in the store's attributes: an error (status ``failed``) or, for
    ``None``, an interruption (status ``stopped``)."""
    try:
        attrs = store.group_attrs(root).get("tera_pipeline", {})
    except store.StoreError:
        return  # the store was never created: nothing to record
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    if err is None:
        attrs["status"] = "stopped"
        attrs["last_error"] = {"time": stamp, "message": "interrupted; continue with --resume"}
    else:
        attrs["status"] = "failed"
        attrs["last_error"] = {"time": stamp, "message": str(err)}
    store.update_attrs(root, {"tera_pipeline": attrs})
