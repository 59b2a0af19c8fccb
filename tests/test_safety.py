"""Nothing a user owns is ever lost: ``--overwrite`` replaces only a store of ours, one writer
holds a store, damaged blocks are named and repaired bitwise. Every test runs with HOME and the
working directory set to temporary folders."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core.geometry import Box
from tera_pipeline.storage import layout, lock, store

runner = CliRunner()
SHAPE, BLOCK = "8,64,64", "4,32,32"


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def _args(out: Path, checkpoint: Path, *extra: str, steps: int = 2) -> list[str]:
    return ["generate", "--out", str(out), "--shape", SHAPE, "--block", BLOCK, "--seed", "5",
            "--steps", str(steps), "--workers", "1", "--checkpoint", str(checkpoint),
            *extra]  # fmt: skip


def _digests(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (or the file itself) with its sha256."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _relative(folder: Path) -> dict[str, str]:
    return {str(Path(k).relative_to(folder)): v for k, v in _digests(folder).items()}


def _one_line_refusal(result) -> str:
    """The refusal: exit 2 and one ``error:`` line (in-process runs can also carry log lines of
    earlier runs, written by handlers that outlive CliRunner's streams)."""
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1, result.output
    return lines[0]


def _image(root: Path) -> np.ndarray:
    store.forget_handles()
    arr = store.open_array(root, layout.IMAGE)
    return store.read_box(arr, Box((0, 0, 0), tuple(arr.shape[1:])))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_checkpoint) -> Path:
    """A finished store of ours (the uninterrupted reference)."""
    out = tmp_path_factory.mktemp("finished") / "ref.zarr"
    result = runner.invoke(app, _args(out, tiny_checkpoint))
    assert result.exit_code == 0, result.output
    return out


# -- 1. --overwrite replaces only a store of ours ------------------------------------------
def _foreign_dir(tmp: Path) -> Path:
    d = tmp / "mine"
    d.mkdir()
    (d / "thesis.tex").write_text("years of work\n")
    return d


def _zarr_python_store(tmp: Path) -> Path:
    import zarr

    d = tmp / "other.zarr"
    zarr.open_array(str(d), mode="w", shape=(4, 4), dtype="u1", zarr_format=3)[:] = 7
    return d


def _folder_with_store(tmp: Path, finished: Path) -> Path:
    d = tmp / "project"
    d.mkdir()
    shutil.copytree(finished, d / "ref.zarr")
    return d


def _regular_file(tmp: Path) -> Path:
    f = tmp / "notes.zarr"
    f.write_text("not a directory\n")
    return f


def _cwd(tmp: Path) -> Path:
    (tmp / "results.csv").write_text("a,b\n1,2\n")
    return Path(".")


@pytest.mark.parametrize(
    "make", [_foreign_dir, _zarr_python_store, _folder_with_store, _regular_file, _cwd, "home"]
)
def test_overwrite_refuses_what_is_not_ours(make, tmp_path, private_home, tiny_checkpoint,
                                            finished):  # fmt: skip
    if make == "home":
        (private_home / ".bashrc").write_text("export PATH\n")
        target = private_home
    elif make is _folder_with_store:
        target = make(tmp_path, finished)
    else:
        target = make(tmp_path)
    watched = tmp_path if make is not _folder_with_store else target
    before = _digests(watched)
    t0 = time.perf_counter()
    result = runner.invoke(app, _args(target, tiny_checkpoint, "--overwrite"))
    line = _one_line_refusal(result)
    print(f"{make if isinstance(make, str) else make.__name__}: {line}")
    assert "refusing to replace" in line or "already exists" in line
    assert time.perf_counter() - t0 < 5
    assert _digests(watched) == before  # every byte still there


def test_overwrite_replaces_a_store_of_ours(tmp_path, tiny_checkpoint, finished):
    out = tmp_path / "again.zarr"
    shutil.copytree(finished, out)
    (out / layout.IMAGE / "c").rename(out / layout.IMAGE / "old-chunks")  # now foreign inside
    refused = runner.invoke(app, _args(out, tiny_checkpoint, "--overwrite"))
    assert "refusing to replace" in _one_line_refusal(refused)
    (out / layout.IMAGE / "old-chunks").rename(out / layout.IMAGE / "c")
    result = runner.invoke(app, _args(out, tiny_checkpoint, "--overwrite", steps=3))
    assert result.exit_code == 0, result.output
    attrs = store.group_attrs(out)["tera_pipeline"]
    assert attrs["status"] == "complete" and attrs["config"]["diffusion"]["steps"] == 3


# -- 2. one writer ---------------------------------------------------------------------------------
def _race(root: str, barrier, results) -> None:
    barrier.wait()
    try:
        lease = lock.acquire(Path(root))
        results.put(("won", os.getpid()))
        time.sleep(1.0)
        lock.release(lease)
    except lock.LockError as err:
        results.put(("refused", str(err)))


def test_exactly_one_of_eight_simultaneous_takers_gets_the_lock(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(8)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    won = [o for o in outcomes if o[0] == "won"]
    refused = [o for o in outcomes if o[0] == "refused"]
    print(f"won {len(won)}, refused {len(refused)}: {refused[0][1]}")
    assert len(won) == 1 and len(refused) == 7
    assert all(f"pid {won[0][1]}" in msg for _, msg in refused)
    assert not (tmp_path / lock.LOCK).exists()


@pytest.mark.slow  # 8 runs on 2 cores, ~75 s; the lock race itself: the test above
def test_eight_generate_processes_on_one_output(tmp_path, tiny_checkpoint):
    out = tmp_path / "race.zarr"
    cmd = [sys.executable, "-m", "flows.cli", *_args(out, tiny_checkpoint, steps=6)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(8)]  # fmt: skip
    outputs = [(p.wait(timeout=400), *p.communicate()) for p in procs]
    winners = [i for i, (rc, _, _) in enumerate(outputs) if rc == 0]
    refusals = [err.strip() for rc, _, err in outputs if rc == 2]
    print(f"ran: {len(winners)}, refused: {len(refusals)}; e.g. {refusals[:1]}")
    assert len(winners) == 1 and len(refusals) == 7, outputs
    holder = f"pid {procs[winners[0]].pid}"
    named = sum(holder in r for r in refusals)
    assert named == 7, refusals  # each names the run that holds the store
    assert all(len(r.splitlines()) == 1 for r in refusals)


@pytest.mark.parametrize("content", ["", '{"host": "a", "pi', "\x00\x01binary"])
def test_a_corrupt_lock_refuses_naming_the_file(content, tmp_path, tiny_checkpoint, finished):
    out = tmp_path / "held.zarr"
    shutil.copytree(finished, out)
    (out / lock.LOCK).write_text(content)
    for extra in ("--resume", "--overwrite"):
        line = _one_line_refusal(runner.invoke(app, _args(out, tiny_checkpoint, extra)))
        assert str(out / lock.LOCK) in line and "corrupt" in line
    status = runner.invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "corrupt" in status.output, status.output


def test_another_hosts_lock_is_taken_over_only_when_stale(tmp_path, tiny_checkpoint, finished):
    out = tmp_path / "shared.zarr"
    shutil.copytree(finished, out)
    now = time.time()
    other = {"host": f"not-{socket.gethostname()}", "pid": 1, "started": now - 3600,
             "heartbeat": now - 5, "token": "t"}  # fmt: skip
    (out / lock.LOCK).write_text(json.dumps(other))
    live = _one_line_refusal(runner.invoke(app, _args(out, tiny_checkpoint, "--resume")))
    assert "being written by another run" in live and other["host"] in live
    other["heartbeat"] = now - lock.STALE_AFTER_S - 60
    (out / lock.LOCK).write_text(json.dumps(other))
    overwrite = _one_line_refusal(runner.invoke(app, _args(out, tiny_checkpoint, "--overwrite")))
    assert "--resume" in overwrite
    resumed = runner.invoke(app, _args(out, tiny_checkpoint, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert not (out / lock.LOCK).exists()
    np.testing.assert_array_equal(_image(out), _image(finished))


# -- 7. integrity: verify names damage, resume refuses, repair restores bytes -------------
def _shard(root: Path, name: str, index: tuple[int, int, int]) -> Path:
    return root / name / "c" / "0" / "/".join(map(str, index))


def _delete_shard(root: Path) -> str:
    _shard(root, layout.IMAGE, (1, 0, 1)).unlink()
    return "(1, 0, 1)"


def _truncate_shard(root: Path) -> str:
    path = _shard(root, layout.IMAGE, (0, 1, 0))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "(0, 1, 0)"


def _truncate_metadata(root: Path) -> str:
    path = root / layout.IMAGE / "zarr.json"
    path.write_text(path.read_text()[:100])
    return "image metadata unreadable"


@pytest.mark.parametrize("damage", [_delete_shard, _truncate_shard, _truncate_metadata])
def test_damaged_store_is_named_refused_and_repaired(damage, tmp_path, tiny_checkpoint,
                                                     finished):  # fmt: skip
    out = tmp_path / "damaged.zarr"
    shutil.copytree(finished, out)
    pyramid_before = _digests(out / "pyramid")
    named = damage(out)
    verify = runner.invoke(app, ["verify", str(out)])
    print(verify.output.strip())
    assert verify.exit_code == 1 and named in verify.output
    refused = _one_line_refusal(runner.invoke(app, _args(out, tiny_checkpoint, "--resume")))
    assert named in refused and "--repair" in refused
    assert _digests(out / "pyramid") == pyramid_before  # nothing derived was touched
    repaired = runner.invoke(app, _args(out, tiny_checkpoint, "--resume", "--repair"))
    assert repaired.exit_code == 0, repaired.output
    np.testing.assert_array_equal(_image(out), _image(finished))
    assert _relative(out / "pyramid") == _relative(finished / "pyramid")  # rebuilt, same bytes
    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and "all intact" in ok.output, ok.output


# -- 6. damaged metadata and impossible jobs: one line, before anything is written ----------------
def test_garbage_ledger_and_truncated_root_metadata_are_one_line(tmp_path, tiny_checkpoint,
                                                                 finished):  # fmt: skip
    out = tmp_path / "garbled.zarr"
    shutil.copytree(finished, out)
    chunk = next(p for p in (out / "_ledger" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage" * 3)
    for args in (["status", str(out)], _args(out, tiny_checkpoint, "--resume")):
        line = _one_line_refusal(runner.invoke(app, args))
        assert "_ledger" in line, line
    shutil.rmtree(out)
    shutil.copytree(finished, out)
    meta = out / "zarr.json"
    meta.write_text(meta.read_text()[: meta.stat().st_size // 2])
    status = _one_line_refusal(runner.invoke(app, ["status", str(out)]))
    assert "zarr.json" in status and "truncated" in status, status
    resume = _one_line_refusal(runner.invoke(app, _args(out, tiny_checkpoint, "--resume")))
    print(f"garbage ledger / half root metadata: {status} | {resume}")


def test_a_job_larger_than_the_disk_is_refused_before_any_work(tmp_path, tiny_checkpoint):
    out = tmp_path / "huge.zarr"
    t0 = time.perf_counter()
    args = _args(out, tiny_checkpoint)
    args[args.index("--shape") + 1] = "100000,100000,100000"
    args[args.index("--block") + 1] = "64,512,512"
    line = _one_line_refusal(runner.invoke(app, args))
    print(line)
    assert "GiB" in line and "--ignore-disk-space" in line
    assert time.perf_counter() - t0 < 5
    assert not out.exists()


# -- 3. a kill during creation leaves a store that status explains and --resume completes --------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("written", ["lock only", "lock and ledger"])
def test_a_creation_cut_short_is_explained_and_started_again(written, tmp_path, tiny_checkpoint,
                                                             finished):  # fmt: skip
    from tera_pipeline.storage import ledger
    from tera_pipeline.storage.layout import job_of

    out = tmp_path / "cut.zarr"
    out.mkdir()
    stale = {"host": socket.gethostname(), "pid": _dead_pid(), "started": time.time() - 5,
             "heartbeat": time.time() - 5, "token": "dead"}  # fmt: skip
    (out / lock.LOCK).write_text(json.dumps(stale))
    if written == "lock and ledger":
        job = job_of(finished).model_copy(update={"out": out})
        digest = store.group_attrs(finished)["tera_pipeline"]["checkpoint"]["sha256"]
        ledger.create(out, job, ledger.output_identity(job, digest))
    status = runner.invoke(app, ["status", str(out)])
    print(status.output.strip())
    assert status.exit_code == 0 and "creation cut short" in status.output, status.output
    resumed = runner.invoke(app, _args(out, tiny_checkpoint, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(_image(out), _image(finished))


def _kill_when(out: Path, checkpoint: Path, appears: str) -> None:
    """Start a run and SIGKILL its process group as soon as ``out / appears`` exists."""
    cmd = [sys.executable, "-m", "flows.cli", *_args(out, checkpoint)]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "ERROR"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while not (out / appears).exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    "appears",
    [  # the root metadata by default (~35 s each); the ledger's and the pyramid's: -m slow
        pytest.param("_ledger/zarr.json", marks=pytest.mark.slow),
        "zarr.json",
        pytest.param("_pyramid_new", marks=pytest.mark.slow),
    ],
)
def test_sigkill_at_creation_and_in_the_pyramid(appears, tmp_path, tiny_checkpoint, finished):
    """Kills aimed at the instants a spread of kills can miss: the store's creation (the
    ledger, then the root metadata) and the pyramid's build."""
    out = tmp_path / "aimed.zarr"
    _kill_when(out, tiny_checkpoint, appears)
    status = runner.invoke(app, ["status", str(out)])
    print(f"killed when {appears} appeared: {status.output.splitlines()[0]}")
    assert status.exit_code == 0, status.output
    resumed = runner.invoke(app, _args(out, tiny_checkpoint, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    np.testing.assert_array_equal(_image(out), _image(finished))
    assert _relative(out / "pyramid") == _relative(finished / "pyramid")


def test_a_store_written_before_newer_fields_still_resumes_and_a_changed_one_does_not(tmp_path):
    """Fields added later (lattice shift unit and final stride, the sampler, ...) are left out
    of a job's identity at their default, so older stores resume; a set one is named."""
    from tera_pipeline.core.config import JobConfig
    from tera_pipeline.storage import ledger

    out = tmp_path / "old.zarr"
    out.mkdir()
    job = JobConfig(out=out).with_overrides(**{"lattice.shift_unit": "bin"})
    identity = ledger.output_identity(job, "sha")
    assert "sampler" not in identity["diffusion"] and "shift_unit" not in identity["lattice"]
    older = json.loads(json.dumps(identity))
    older["lattice"]["overlapped_final_steps"] = 0  # how stores of the previous version read
    ledger.create(out, job, older)
    ledger.check_identity(out, identity)
    dpm = job.with_overrides(**{"diffusion.sampler": "dpmpp_2m"})
    with pytest.raises(ledger.ResumeError, match="diffusion.sampler: None -> 'dpmpp_2m'"):
        ledger.check_identity(out, ledger.output_identity(dpm, "sha"))
    shifted = {"lattice.mode": "shifted", "lattice.stride": (4, 32, 32)}
    by_bins = ledger.output_identity(job.with_overrides(**shifted), "s")
    assert "shift_unit" not in by_bins["lattice"]  # stores shifted by bins, as before the field
    by_voxels = ledger.output_identity(
        job.with_overrides(**shifted, **{"lattice.shift_unit": "voxel"}), "s"
    )
    assert by_voxels["lattice"]["shift_unit"] == "voxel"
