"""Fault injection (prints JSON): every way a run can be cut, raced or pointed at the wrong place.

Against an uninterrupted reference run (``tera generate`` as a user runs it), each scenario
checks that nothing is lost, nothing hangs, and the bytes come out the same:

- ``sigkill``: the driver's process group SIGKILLed at N instants spread over a whole run
  (store creation, conditioning, every step, the pyramid, the final metadata); after each,
  ``tera status`` must open the store and ``--resume`` must end bitwise equal to the reference,
  with no process of the killed run left;
- ``simultaneous``: 8 runs started at once on one output: exactly one runs;
- ``corrupt``: an empty lock and a truncated ``image/zarr.json`` on a finished store: resume
  refuses; ``--resume --repair`` restores the bytes;
- ``sigint``: Ctrl-C to the process group mid-step: stop time, exit code, identical resume;
- ``workers_lost``: every Dask worker SIGKILLed again and again: time to a clear failure;
- ``overwrite``: ``--overwrite`` aimed at a user's folder, another tool's zarr store, a folder
  holding a store, a regular file, the working directory: refused, bytes compared.

``hangs`` (runs that needed the timeout) and ``bytes_lost`` must be 0.

    python benchmarks/fault_injection.py [--shape 8,128,128] [--block 4,64,64] [--steps 3]
        [--kills 20]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from tera_pipeline.core import errors
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import lifecycle
from tera_pipeline.storage import layout, ledger, store

TIMEOUT_S = 300


def _image(root: Path) -> np.ndarray:
    store.forget_handles()
    arr = store.open_array(root, layout.IMAGE)
    return store.read_box(arr, Box((0, 0, 0), tuple(arr.shape[1:])))


def _digests(folder: Path) -> dict[str, tuple[str, int]]:
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in files}


def _family(pid: int) -> list[int]:
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []
    return [pid] + [k.pid for k in kids if "resource_tracker" not in " ".join(_cmd(k))]


def _cmd(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


# Deliberately also in tests/test_faults.py: a benchmark is a standalone script, and tests
# do not import benchmarks.
def _alive(pids: list[int], within_s: float = 20.0) -> list[int]:
    deadline = time.time() + within_s
    while True:
        left = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.Error:
                pass
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


class Runner:
    """``tera generate`` subprocesses of one job, counted."""

    def __init__(self, args, work: Path) -> None:
        self.args, self.work = args, work
        self.attempts = self.refusals = self.hangs = 0
        self.env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}

    def cmd(self, out: Path, *extra: str) -> list[str]:
        a = self.args
        return [sys.executable, "-m", "flows.cli", "generate", "--out", str(out),
                "--shape", a.shape, "--block", a.block, "--steps", str(a.steps), "--seed", "1",
                "--workers", "2", *extra]  # fmt: skip

    def start(self, out: Path, *extra: str) -> subprocess.Popen:
        self.attempts += 1
        return subprocess.Popen(self.cmd(out, *extra), env=self.env, cwd=self.work,
                                start_new_session=True, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip

    def run(self, out: Path, *extra: str) -> tuple[int, str]:
        proc = self.start(out, *extra)
        try:
            _, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.hangs += 1
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
        if proc.returncode == 2:
            self.refusals += 1
        return proc.returncode, err.strip().splitlines()[-1] if err.strip() else ""


def sigkill(r: Runner, reference: np.ndarray, ref_s: float, kills: int) -> dict:
    mismatches, orphans, status_failures, rows = 0, 0, 0, []
    for i in range(kills):
        out = r.work / f"kill{i}.zarr"
        at = ref_s * (i + 0.5) / kills
        proc = r.start(out)
        family: list[int] = []
        deadline = time.time() + at
        while time.time() < deadline and proc.poll() is None:
            family = sorted(set(family) | set(_family(proc.pid)))
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        orphans += len(_alive(family))
        phase = "-"
        if (out / ledger.LEDGER / "zarr.json").is_file():
            done = [d for d, _ in ledger.progress(out)]
            phase = f"{sum(done)} blocks done"
        status = subprocess.run([sys.executable, "-m", "flows.cli", "status", str(out)],
                                capture_output=True, text=True, env=r.env, timeout=60)  # fmt: skip
        exists = out.exists() and any(out.iterdir())
        if exists and status.returncode != 0:
            status_failures += 1
        rc, last = r.run(out, "--resume") if exists else r.run(out)
        same = rc == 0 and np.array_equal(_image(out), reference)
        mismatches += not same
        rows.append({"kill_at_s": round(at, 2), "state_at_kill": phase,
                     "status": status.stdout.splitlines()[0] if status.stdout else status.stderr,
                     "resume_rc": rc, "identical": bool(same)})  # fmt: skip
        shutil.rmtree(out)  # a store this benchmark made, in its own temporary folder
    return {"kills": kills, "mismatches": mismatches, "orphaned_processes": orphans,
            "status_failures": status_failures, "runs": rows}  # fmt: skip


def simultaneous(r: Runner, n: int = 8) -> dict:
    out = r.work / "race.zarr"
    procs = [r.start(out) for _ in range(n)]
    results = [(p.communicate(timeout=TIMEOUT_S)[1], p.returncode) for p in procs]
    ran = sum(rc == 0 for _, rc in results)
    refused = [err.strip().splitlines()[-1] for err, rc in results if rc == 2]
    r.refusals += len(refused)
    winner = [p.pid for p, (_, rc) in zip(procs, results) if rc == 0]
    named = sum(bool(winner) and f"pid {winner[0]}" in msg for msg in refused)
    return {"started": n, "ran": ran, "refused": len(refused), "refusals_naming_holder": named,
            "example": refused[0] if refused else None}  # fmt: skip


def corrupt(r: Runner, finished: Path, reference: np.ndarray) -> dict:
    out = r.work / "corrupt.zarr"
    shutil.copytree(finished, out)
    (out / "_lock.json").write_text("")
    rc_lock, msg_lock = r.run(out, "--resume")
    (out / "_lock.json").unlink()
    meta = out / layout.IMAGE / "zarr.json"
    meta.write_text(meta.read_text()[:120])
    rc_meta, msg_meta = r.run(out, "--resume")
    rc_repair, _ = r.run(out, "--resume", "--repair")
    same = rc_repair == 0 and np.array_equal(_image(out), reference)
    return {"empty_lock_resume_rc": rc_lock, "empty_lock_message": msg_lock,
            "truncated_metadata_resume_rc": rc_meta, "truncated_metadata_message": msg_meta,
            "repair_rc": rc_repair, "repaired_identical": bool(same)}  # fmt: skip


def sigint(r: Runner, reference: np.ndarray) -> dict:
    out = r.work / "sigint.zarr"
    proc = r.start(out)
    family: list[int] = []
    while proc.poll() is None:
        family = sorted(set(family) | set(_family(proc.pid)))
        ready = (out / ledger.LEDGER / "zarr.json").is_file() and ledger.created(out)
        if ready and ledger.progress(out)[2][0] > 0:
            break
        time.sleep(0.05)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.communicate(timeout=60)
        hung = False
    except subprocess.TimeoutExpired:
        r.hangs += 1
        hung = True
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    stop_s = time.time() - t0
    left = _alive(family)
    rc, _ = r.run(out, "--resume")
    same = rc == 0 and np.array_equal(_image(out), reference)
    return {"stop_s": round(stop_s, 2), "exit_code": proc.returncode, "hung": hung,
            "processes_left": len(left), "resumed_identical": bool(same)}  # fmt: skip


def workers_lost(args, work: Path) -> dict:
    from tera_pipeline.core.cluster_spec import ClusterSpec
    from tera_pipeline.core.config import JobConfig
    from tera_pipeline.runtime.cluster import cluster_client

    shape, block = ([int(v) for v in text.split(",")] for text in (args.shape, args.block))
    job = JobConfig.model_validate(
        {"out": str(work / "lost.zarr"), "volume": {"shape": shape}, "storage": {"block": block},
         "diffusion": {"steps": args.steps, "seed": 1}, "workers_lost_s": args.workers_lost_s}
    )  # fmt: skip
    stop, before = threading.Event(), set(_family(os.getpid())[1:])
    seen: set[int] = set()

    def killer() -> None:
        while not stop.is_set():
            for pid in set(_family(os.getpid())[1:]) - before:
                seen.add(pid)
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)

    t0 = time.time()
    message = None
    with cluster_client(ClusterSpec(kind="local", workers=2, dashboard_address=":0")) as client:
        threading.Thread(target=killer, daemon=True).start()
        try:
            lifecycle.generate(job, client)
        except errors.GenerationError as err:
            message = str(err)
        stop.set()
    return {"bound_s": args.workers_lost_s, "failed_after_s": round(time.time() - t0, 1),
            "failed": message is not None, "message": message,
            "processes_left": len(_alive(sorted(seen)))}  # fmt: skip


def overwrite(r: Runner, finished: Path) -> dict:
    import zarr

    targets = {}
    mine = r.work / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work\n")
    targets["user folder"] = mine
    other = r.work / "other.zarr"
    zarr.open_array(str(other), mode="w", shape=(8, 8), dtype="u1", zarr_format=3)[:] = 3
    targets["zarr-python store"] = other
    project = r.work / "project"
    project.mkdir()
    shutil.copytree(finished, project / "ref.zarr")
    targets["folder holding a store"] = project
    note = r.work / "notes.zarr"
    note.write_text("a file\n")
    targets["regular file"] = note
    targets["working directory"] = Path(".")
    lost, rows = 0, {}
    for name, target in targets.items():
        watched = r.work if target == Path(".") else target
        before = _digests(watched)
        rc, msg = r.run(target, "--overwrite")
        after = _digests(watched)
        lost += sum(size for path, (digest, size) in before.items()
                    if after.get(path, (None, 0))[0] != digest)  # fmt: skip
        rows[name] = {"rc": rc, "message": msg}
    return {"targets": rows, "bytes_lost": lost}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="8,128,128")
    p.add_argument("--block", default="4,64,64")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--workers-lost-s", type=float, default=20.0)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tera-faults-"))
    r = Runner(args, work)
    t0 = time.time()
    ref = work / "ref.zarr"
    rc, msg = r.run(ref)
    if rc != 0:
        raise SystemExit(f"reference run failed: {msg}")
    ref_s = time.time() - t0
    reference = _image(ref)
    report = {"benchmark": "fault_injection", "shape": args.shape, "block": args.block,
              "steps": args.steps, "reference_run_s": round(ref_s, 1)}  # fmt: skip
    report["sigkill"] = sigkill(r, reference, ref_s, args.kills)
    report["simultaneous"] = simultaneous(r)
    report["corrupt"] = corrupt(r, ref, reference)
    report["sigint"] = sigint(r, reference)
    report["overwrite"] = overwrite(r, ref)
    report["workers_lost"] = workers_lost(args, work)
    report["totals"] = {
        "attempts": r.attempts,
        "refusals": r.refusals,
        "hangs": r.hangs,
        "bytes_lost": report["overwrite"]["bytes_lost"],
        "mismatches": report["sigkill"]["mismatches"]
        + (not report["sigint"]["resumed_identical"])
        + (not report["corrupt"]["repaired_identical"]),
        "orphaned_processes": report["sigkill"]["orphaned_processes"]
        + report["sigint"]["processes_left"]
        + report["workers_lost"]["processes_left"],
    }
    report["wall_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    shutil.rmtree(work)  # the benchmark's own temporary folder


if __name__ == "__main__":
    main()
