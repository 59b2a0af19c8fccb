"""A long run survives faults: killed workers, a killed flow process, a second writer, and a
failing disk; outputs stay bitwise identical to an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core import errors, frames
from tera_pipeline.core.cluster_spec import ClusterSpec
from tera_pipeline.core.config import JobConfig
from tera_pipeline.core.geometry import Box
from tera_pipeline.generation import lifecycle, predictor
from tera_pipeline.runtime.cluster import cluster_client
from tera_pipeline.storage import layout, ledger, lock, store

from .conftest import tiny_job

runner = CliRunner()
SHAPE, BLOCK = "12,96,96", "4,32,32"


def _image(root: Path) -> np.ndarray:
    arr = store.open_array(root, layout.IMAGE)
    return store.read_box(arr, Box((0, 0, 0), tuple(arr.shape[1:])))


def _job(out: Path, checkpoint: Path, **fields) -> JobConfig:
    """The job of ``_args`` (default steps) as the library takes it."""
    return tiny_job(out, (12, 96, 96), (4, 32, 32), 4, 3, checkpoint, **fields)


def _args(out: Path, checkpoint: Path, steps: int = 4) -> list[str]:
    return [
        "generate",
        "--out",
        str(out),
        "--shape",
        SHAPE,
        "--block",
        BLOCK,
        "--seed",
        "3",
        "--steps",
        str(steps),
        "--workers",
        "2",
        "--checkpoint",
        str(checkpoint),
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoint, client):
    """The uninterrupted run every faulty run must reproduce bit for bit: the job of ``_args``
    run by the library on the session's cluster (the faulty runs go through ``tera generate``,
    so each comparison also checks that the command computes what the library does)."""
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    lifecycle.generate(_job(out, tiny_checkpoint), client)
    return _image(out)


def test_workers_killed_three_times(tmp_path, tiny_checkpoint, reference):
    job = _job(tmp_path / "k.zarr", tiny_checkpoint)
    kills = []
    with cluster_client(ClusterSpec(kind="local", workers=2, dashboard_address=":0")) as client:

        def killer() -> None:
            for _ in range(3):
                time.sleep(2.5)
                pids = client.run(os.getpid)
                victim = sorted(pids.values())[len(kills) % len(pids)]
                os.kill(victim, signal.SIGKILL)
                kills.append(victim)

        thread = threading.Thread(target=killer)
        thread.start()
        lifecycle.generate(job, client)
        thread.join()
    print(f"workers killed: {len(kills)}")
    assert len(kills) == 3
    np.testing.assert_array_equal(_image(job.out), reference)


def _phase_counts(root: Path) -> list[int]:
    return [done for done, _ in ledger.progress(root)]


def test_flow_killed_then_resumed_and_locks(tmp_path, tiny_checkpoint, reference):
    out = tmp_path / "r.zarr"
    cmd = [sys.executable, "-m", "flows.cli", *_args(out, tiny_checkpoint)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until step 2 has begun and step 3 is not done
            if (out / ledger.LEDGER / "zarr.json").is_file():
                counts = _phase_counts(out)
                if counts[2] > 0 and counts[3] < 27:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("the run never reached step 2")
        # a second writer is refused while the first one runs
        second = runner.invoke(app, [*_args(out, tiny_checkpoint), "--overwrite"])
        assert second.exit_code == 2 and "being written by another run" in second.output
        assert f"pid {proc.pid}" in second.output
        os.killpg(proc.pid, signal.SIGKILL)  # the flow process and its Dask workers
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    at_kill = _phase_counts(out)
    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 0, status.output
    assert "dead (resume with --resume)" in status.output
    for name, done in zip(["conditioning", "step 1/4", "step 2/4", "step 3/4"], at_kill):
        assert f"{name}  {done:>7}/27" in status.output, status.output
    # the stale lock of the dead run is taken over only by --resume
    stale = runner.invoke(app, [*_args(out, tiny_checkpoint), "--overwrite"])
    assert stale.exit_code == 2 and "--resume" in stale.output
    other = runner.invoke(app, [*_args(out, tiny_checkpoint, steps=5), "--resume"])
    assert other.exit_code == 2 and "diffusion.steps: 4 -> 5" in other.output
    resumed = runner.invoke(app, [*_args(out, tiny_checkpoint), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    phases = store.group_attrs(out)["tera_pipeline"]["run"]["phases"]
    recomputed = [p["blocks"] for p in phases]
    expected = [27 - done for done in at_kill]
    print(
        f"blocks done per phase at the kill: {at_kill}; computed by the resume: {recomputed}; "
        f"in flight at most: {4 * 2}"
    )
    assert recomputed == expected
    assert recomputed[2] <= 27 - at_kill[2] and sum(recomputed[:2]) == 0
    np.testing.assert_array_equal(_image(out), reference)
    assert not (out / lock.LOCK).exists()


def test_write_failure_stops_then_resume_completes(tmp_path, tiny_checkpoint, reference):
    out = tmp_path / "w.zarr"
    job_args = _args(out, tiny_checkpoint)
    config = JobConfig().with_overrides(
        **{
            "out": str(out),
            "volume.shape": (12, 96, 96),
            "storage.block": (4, 32, 32),
            "diffusion.seed": 3,
            "diffusion.steps": 4,
            "checkpoint": str(tiny_checkpoint),
            "cluster.workers": 2,
            "retries": 1,
        }
    )
    lifecycle.prepare_store(config)
    assert frames.unrolls(config)  # the image is written by the image phase after step 4
    blocker = out / layout.IMAGE / "c"
    blocker.write_text("not a directory")  # every write of the final image fails (ENOTDIR)
    from tera_pipeline.runtime.cluster import cluster_client as make

    with make(ClusterSpec(kind="local", workers=2, dashboard_address=":0")) as client:
        ckpt = predictor.resolve_checkpoint(config)
        lifecycle.conditioning_pass(config, client)
        for step in range(4):
            lifecycle.denoise_step(config, ckpt, step, client)
        with pytest.raises(errors.GenerationError, match=r"image: block \(\d+, \d+, \d+\) failed"):
            lifecycle.image_pass(config, client)
    assert _phase_counts(out)[:5] == [27] * 5 and _phase_counts(out)[5] == 0
    blocker.unlink()  # the cause is gone
    result = runner.invoke(app, [*job_args, "--resume"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(_image(out), reference)


# -- signals: Ctrl-C to the process group, SIGTERM, SIGKILL of the driver --------------------
def _start_and_wait_for_step(out: Path, checkpoint: Path, step: int = 2):
    """A ``tera generate`` process (its own process group) stopped part-way through ``step``;
    returns it with every process it had started."""
    import psutil

    cmd = [sys.executable, "-m", "flows.cli", *_args(out, checkpoint)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline:
        ready = (out / ledger.LEDGER / "zarr.json").is_file() and ledger.created(out)
        if ready and 0 < _phase_counts(out)[step] < 27:
            break
        time.sleep(0.05)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run never reached the step")
    family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True)
                          if "resource_tracker" not in " ".join(c.cmdline()))]  # fmt: skip
    return proc, family


def _cmdline(pid: int) -> list[str]:
    import psutil

    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


# Deliberately also in benchmarks/fault_injection.py (tests do not import benchmarks).
def _left_running(pids: list[int], within_s: float = 20.0) -> list[int]:
    import psutil

    deadline = time.time() + within_s
    while time.time() < deadline:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive:
            return []
        time.sleep(0.2)
    return alive


@pytest.fixture
def started(request):
    """Runs started by a test, SIGKILLed with their process group if the test fails."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize(
    "how",  # a terminal's Ctrl-C by default; SIGTERM (a batch system's stop): -m slow
    ["SIGINT to the process group", pytest.param("SIGTERM to the driver", marks=pytest.mark.slow)],
)
def test_interrupted_run_stops_cleanly_and_resumes_identically(how, tmp_path, tiny_checkpoint,
                                                               reference, started):  # fmt: skip
    out = tmp_path / "i.zarr"
    proc, family = _start_and_wait_for_step(out, tiny_checkpoint)
    started.append(proc)
    assert (out / lock.LOCK).exists() and len(family) >= 3  # driver, Prefect server, workers
    workers = [pid for pid in family[1:] if "uvicorn" not in " ".join(_cmdline(pid))]
    t0 = time.time()
    if how.startswith("SIGINT"):
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGTERM)
    while proc.poll() is None and time.time() - t0 < 60:
        if not (out / lock.LOCK).exists():  # the lock goes only after the workers have stopped
            assert proc.poll() is not None or _left_running(workers, 0.1) == []
        time.sleep(0.02)
    stopped_s = time.time() - t0
    stderr = proc.stderr.read().decode()
    print(f"{how}: stopped in {stopped_s:.1f} s, exit {proc.returncode}; {len(family)} processes")
    assert proc.returncode == 130, stderr[-2000:]
    assert stopped_s < 30
    assert "continue it with --resume" in stderr
    assert _left_running(family) == [], "processes of the run left behind"
    assert not (out / lock.LOCK).exists()
    status = runner.invoke(app, ["status", str(out)])
    assert "stopped (resume with --resume)" in status.output, status.output
    resumed = runner.invoke(app, [*_args(out, tiny_checkpoint), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(_image(out), reference)


@pytest.mark.slow  # ~45 s; a SIGKILLed run resumed identically: test_flow_killed_then_resumed
def test_killed_driver_leaves_no_process_behind(tmp_path, tiny_checkpoint, reference, started):
    out = tmp_path / "k9.zarr"
    proc, family = _start_and_wait_for_step(out, tiny_checkpoint)
    started.append(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = _left_running(family)
    print(f"SIGKILL of the driver: {len(family)} processes, left running: {left}")
    assert left == []
    resumed = runner.invoke(app, [*_args(out, tiny_checkpoint), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(_image(out), reference)


def test_losing_every_worker_fails_within_the_bound(tmp_path, tiny_checkpoint):
    """Workers SIGKILLed again and again: the run fails with a message naming --resume, within
    the bound, and no worker process is left."""
    import psutil

    job = _job(tmp_path / "lost.zarr", tiny_checkpoint, workers_lost_s=20)
    stop = threading.Event()
    seen: set[int] = set()

    def children() -> set[int]:
        pids = set()
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "resource_tracker" not in " ".join(child.cmdline()):  # multiprocessing's
                    pids.add(child.pid)
        return pids

    def killer() -> None:
        while not stop.is_set():
            for pid in children() & seen:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)

    t0 = time.time()
    before = children()  # e.g. a Prefect server of another test: not the cluster's
    with cluster_client(ClusterSpec(kind="local", workers=2, dashboard_address=":0")) as client:
        seen.update(client.run(os.getpid).values())
        seen.update(children() - before)
        thread = threading.Thread(target=killer, daemon=True)
        thread.start()

        def keep_adding() -> None:  # restarted workers are new processes: kill them too
            while not stop.is_set():
                seen.update(children() - before)
                time.sleep(0.2)

        adder = threading.Thread(target=keep_adding, daemon=True)
        adder.start()
        with pytest.raises(errors.GenerationError) as err:
            lifecycle.generate(job, client)
        stop.set()
    failed_s = time.time() - t0
    print(f"every worker lost: failed after {failed_s:.1f} s: {err.value}")
    assert "--resume" in str(err.value)
    assert failed_s < 20 + 90
    assert _left_running(sorted(seen)) == []
