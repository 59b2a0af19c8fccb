"""``tera evaluate`` is safe: it measures only finished stores, never deletes or overwrites what
it did not write, writes one report per store, and works for any valid block size."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.generation import lifecycle

from .conftest import tiny_job

runner = CliRunner()

# Blocks that are not a whole number of patches (4, 32, 32): the naive run (stride = patch)
# must still work. "a": 48 along y and x; "b": 2 along z.
BLOCKS = {"a": (4, 48, 48), "b": (2, 48, 48)}


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_checkpoint, client) -> dict[str, Path]:
    """Two finished 4 x 48 x 48 stores, generated once; each test copies what it needs."""
    folder = tmp_path_factory.mktemp("evaluate-safety")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(folder))
        mp.chdir(folder)
        for name, block in BLOCKS.items():
            job = tiny_job(
                folder / f"{name}.zarr", (4, 48, 48), block, 2, 3, tiny_checkpoint,
                lattice={"stride": (2, 16, 16)},  # overlapped, so that 2 along z is whole strides
            )  # fmt: skip
            lifecycle.generate(job, client)
    return {name: folder / f"{name}.zarr" for name in BLOCKS}


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """The folder the stores are copied to (HOME and caches are kept out of it)."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    return folder


def _copy(src: Path, folder: Path, name: str) -> Path:
    dst = folder / name
    shutil.copytree(src, dst)
    return dst


def _evaluate(store: Path, *extra: str):
    return runner.invoke(app, ["evaluate", str(store), "--workers", "1", *extra])


def _snapshot(folder: Path, skip: str) -> dict[str, bytes]:
    """Every file under ``folder`` but the store ``skip``, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and p.relative_to(folder).parts[0] != skip
    }


def _set_status(store: Path, status: str) -> None:
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["tera_pipeline"]["status"] = status
    meta_path.write_text(json.dumps(meta))


def _one_line(result) -> str:
    text = result.output.strip()
    assert text and "\n" not in text, result.output
    return text


@pytest.mark.parametrize("state", ["running", "failed", "ledger"])
def test_unfinished_store_is_refused_in_one_line(stores, here, state):
    store = _copy(stores["a"], here, "demo.zarr")
    if state == "ledger":  # says complete, but one step's done-flags are gone
        chunks = sorted(p for p in (store / "_ledger" / "c" / "2").rglob("*") if p.is_file())
        assert chunks
        for chunk in chunks:
            chunk.unlink()
    else:
        _set_status(store, state)
    before = sorted(p.name for p in here.iterdir())
    result = _evaluate(store)
    assert result.exit_code == 2, result.output
    line = _one_line(result)
    assert str(store) in line
    assert ("step 2" if state == "ledger" else repr(state)) in line
    if state == "running":
        assert "--resume" in line  # no live run holds it: the run was killed
    assert sorted(p.name for p in here.iterdir()) == before  # no report, no scratch


def test_files_beside_the_store_are_never_touched(stores, here):
    store = _copy(stores["a"], here, "demo.zarr")
    (here / "demo.naive-tiling.zarr").mkdir()  # the name of the old naive-tiling output
    (here / "demo.naive-tiling.zarr" / "notes.txt").write_text("my notes\n")
    (here / "evaluation.json").write_text('{"mine": true}\n')  # the old shared report name
    (here / "evaluation.png").write_bytes(b"not a png of tera's")
    before = _snapshot(here, store.name)

    result = _evaluate(store)
    assert result.exit_code == 0, result.output
    after = _snapshot(here, store.name)
    assert {k: after[k] for k in before} == before  # byte-identical
    assert set(after) - set(before) == {"demo.evaluation.json", "demo.evaluation.png"}
    assert sorted(p.name for p in here.iterdir() if p.name.startswith(".")) == []  # no scratch
    report = json.loads((here / "demo.evaluation.json").read_text())
    assert report["store"] == str(store.resolve())
    assert report["seams"]["naive_tiling"]["face_period"] == [32, 32]
    assert "demo.evaluation.json" in result.output


def test_a_report_it_did_not_write_is_refused(stores, here):
    store = _copy(stores["a"], here, "demo.zarr")
    theirs = here / "demo.evaluation.json"
    theirs.write_text('{"written by": "someone else"}\n')
    result = _evaluate(store)
    assert result.exit_code == 2, result.output
    assert str(theirs) in _one_line(result)
    assert theirs.read_text() == '{"written by": "someone else"}\n'
    assert not (here / "demo.evaluation.png").exists()


@pytest.mark.slow  # ~30 s: three evaluations; one evaluation beside other files: above
def test_two_stores_in_one_folder_get_their_own_reports(stores, here):
    """Blocks (4, 48, 48) and (2, 48, 48) are not whole patches (4, 32, 32): both evaluate."""
    a = _copy(stores["a"], here, "a.zarr")
    b = _copy(stores["b"], here, "b.zarr")
    for store in (a, b):
        result = _evaluate(store)
        assert result.exit_code == 0, result.output
    reports = {s: json.loads((here / f"{s}.evaluation.json").read_text()) for s in "ab"}
    assert reports["a"]["store"] == str(a.resolve())
    assert reports["b"]["store"] == str(b.resolve())
    for s in "ab":
        assert (here / f"{s}.evaluation.png").stat().st_size > 10_000
        assert reports[s]["seams"]["engine"]["face_period"] == [16, 16]
    assert not (here / "evaluation.json").exists()

    first = (here / "a.evaluation.json").read_bytes()
    b_report = (here / "b.evaluation.json").read_bytes()
    result = _evaluate(a)  # its own earlier report may be replaced
    assert result.exit_code == 0, result.output
    assert json.loads((here / "a.evaluation.json").read_bytes()) == json.loads(first)
    assert (here / "b.evaluation.json").read_bytes() == b_report
