"""What a job's store says of its run: progress per phase, holder, state, last error."""

from __future__ import annotations

import time
from pathlib import Path

from tera_pipeline import ledger, store


def job_status(root: Path) -> dict:
    """Status of a running, finished, failed or dead job from its store alone."""
    root = Path(root)
    attrs = store.group_attrs(root).get("tera_pipeline")
    if attrs is None:
        raise store.StoreError(f"{root} is not a tera-pipeline store")
    steps = attrs["config"]["diffusion"]["steps"]
    names = ["conditioning", *(f"step {k + 1}/{steps}" for k in range(steps))]
    phases = [
        {"phase": n, "done": d, "total": t} for n, (d, t) in zip(names, ledger.progress(root))
    ]
    holder = ledger.holder(root)
    state = attrs.get("status", "unknown")
    if state == "running" and holder is None:
        state = "stopped (resume with --resume)"
    elif state == "running" and not ledger.alive(holder):
        state = "dead (resume with --resume)"
    return {
        "store": str(root),
        "state": state,
        "phases": phases,
        "holder": ledger.describe(holder) if holder else None,
        "started": attrs.get("started"),
        "last_error": attrs.get("last_error"),
    }


def record_error(root: Path, err: BaseException) -> None:
    """Keep the error that stopped a run in the store's attributes."""
    attrs = store.group_attrs(root).get("tera_pipeline", {})
    attrs["status"] = "failed"
    attrs["last_error"] = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "message": str(err)}
    store.update_attrs(root, {"tera_pipeline": attrs})
