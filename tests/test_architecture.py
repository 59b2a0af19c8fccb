"""The house rules, checked: dependencies point one way, and modules stay small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("tera_pipeline", "flows", "models")
MAX_MODULE_LINES = 400


def test_import_contracts_hold():
    """flows -> tera_pipeline -> models; tera_pipeline's stages import only the stages below them;
    models import nothing of storage, Dask or Prefect; no cycles between siblings (the contracts
    are in pyproject.toml). In a child process: import-linter configures logging."""
    pytest.importorskip("importlinter")
    check = (
        "from importlinter.cli import lint_imports; "
        f"raise SystemExit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, "
        "no_cache=True))"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_no_library_module_is_over_400_lines():
    sizes = {
        str(p.relative_to(ROOT)): len(p.read_text().splitlines())
        for package in LIBRARY
        for p in (ROOT / package).rglob("*.py")
    }
    assert sizes, "no modules found"
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}
