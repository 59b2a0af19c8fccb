"""The house rules, checked: dependencies point one way, and modules stay small."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("tera_pipeline", "flows", "models")
MAX_MODULE_LINES = 400


def test_import_contracts_hold(monkeypatch):
    """flows -> tera_pipeline -> models; tera_pipeline's stages import only the stages below them;
    models import nothing of storage, Dask or Prefect; no cycles between siblings (the contracts
    are in pyproject.toml)."""
    pytest.importorskip("importlinter")
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)  # the contracts are read from ./pyproject.toml
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_no_library_module_is_over_400_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for package in LIBRARY
        for p in (ROOT / package).rglob("*.py")
    }
    assert sizes, "no modules found"
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
