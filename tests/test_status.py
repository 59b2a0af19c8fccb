"""``tera status`` on a half-finished job: blocks done per phase, times, holder, last error."""

from __future__ import annotations

import math
import re

from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core import frames
from tera_pipeline.evaluation.figures import markdown, run_figures
from tera_pipeline.generation import lifecycle
from tera_pipeline.storage import ledger
from tera_pipeline.storage.status import record_error

runner = CliRunner()


def test_status_of_a_half_finished_job(small_job, client):
    """Conditioning and step 1 done, step 2 stopped after 5 of 27 blocks."""
    job = small_job
    with lifecycle.writing(job):  # holds the lock, as a running job does
        checkpoint = lifecycle.prepare_store(job)
        lifecycle.conditioning_pass(job, client)
        lifecycle.denoise_step(job, checkpoint, 0, client)
        first_five = list(ledger.pending(job.out, 2))[:5]
        lifecycle.denoise_step(job, checkpoint, 1, client, indices=first_five)
        running = runner.invoke(app, ["status", str(job.out)])
    assert running.exit_code == 0, running.output
    print(running.output)
    assert f"{job.out}: running (started " in running.output
    assert re.search(r"held by host \S+, pid \d+", running.output)
    assert re.search(r"last block done \d+ s ago", running.output)
    counts = {"conditioning": 27, "step 1/3": 27, "step 2/3": 5, "step 3/3": 0}
    for phase, done in counts.items():
        line = next(ln for ln in running.output.splitlines() if ln.strip().startswith(phase))
        assert f"{phase}  {done:>7}/27" in line
        has_time = re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$", line) is not None
        assert has_time == (done > 0), line  # when its last block was recorded
    assert "last error" not in running.output

    record_error(job.out, RuntimeError("step 2/3: block (0, 1, 2) failed: disk full"))
    failed = runner.invoke(app, ["status", str(job.out)])
    print(failed.output)
    assert f"{job.out}: failed" in failed.output and "held by" not in failed.output
    assert re.search(r"last error \(.+\): step 2/3: block \(0, 1, 2\) failed: disk full",
                     failed.output)  # fmt: skip
    assert "step 2/3        5/27" in failed.output


def test_status_of_a_finished_job_shows_phase_times(small_job, client):
    lifecycle.generate(small_job, client)
    result = runner.invoke(app, ["status", str(small_job.out)])
    print(result.output)
    assert f"{small_job.out}: complete" in result.output
    phases = 1 + small_job.diffusion.steps + frames.unrolls(small_job)  # and the image phase
    assert len(re.findall(r"27/27 +#{20}  took \d+\.\d s", result.output)) == phases
    e = small_job.evaluations_per_voxel()  # over the lattices of the steps
    steps = small_job.diffusion.steps
    assert f"cost: E = {round(e, 3):g} patch evaluations per voxel and step" in result.output
    assert f"{round(e * steps, 2):g} model evaluations per voxel" in result.output
    figures = run_figures(small_job.out)
    assert figures["E"] == round(e, 3)
    # measured from what the blocks evaluated: at least the lattice's (a seam a neighbour had not
    # published yet is computed again)
    steps_run = [p for p in figures["phases"] if p["phase"].startswith("step ")]
    evaluated = sum(p["patches"] for p in steps_run) / len(steps_run)
    voxels = small_job.volume.shape[0] * small_job.volume.shape[1] * small_job.volume.shape[2]
    patch_voxels = math.prod(small_job.lattice.patch)
    assert figures["E_measured"] == round(evaluated * patch_voxels / voxels, 3) >= figures["E"]
    assert "E: patch evaluations per voxel and step" in markdown(figures)
