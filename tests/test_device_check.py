"""The prepared GPU check runs end to end on CPUs in its dry mode (CI runs it so)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_check.py"


def test_device_check_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    out = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry", "--steps", "2", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry"] and result["workers"] == 1 and result["job"]["steps"] == 2
    assert result["bitwise_equal_across_block_sizes"] and result["image_std"] > 0
    assert len(result["generation"]) == 2
    real = next(iter(result["generation"].values()))
    assert real["output_voxels_per_s"] > 0 and real["model_s"] > 0
    assert result["engine_ceiling"]["model_s"] < real["model_s"]
    assert result["against_tera_mind"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json"]  # nothing else written
