"""Acceptance: the project's deployments on a real Prefect server (loopback), run by a real
process worker; the run's final state and artifacts are read back from the server's API."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pytest
import xarray as xr


def _job(out: Path, checkpoint: Path, **storage) -> dict:
    return {
        "out": str(out),
        "volume": {"shape": [4, 32, 64]},
        "storage": {"block": [4, 32, 32], **storage},
        "diffusion": {"steps": 2, "seed": 4},
        "checkpoint": str(checkpoint),
        "cluster": {"kind": "local", "workers": 1, "dashboard_address": ":0"},
    }


def test_deployments_are_registered(deployed):
    names = set(deployed["ids"])
    assert {"generate/tera", "attention/tera", "pipeline/tera"} <= names
    for optional, module in (("analyze_magnet/tera", "magnet"), ("analyze_spatia/tera", "spatia")):
        if (Path(__file__).parents[1] / "flows" / f"{module}.py").exists():
            assert optional in names


def test_generate_deployment_runs_to_completion_with_artifacts(server, deployed, tmp_path,
                                                               tiny_checkpoint):  # fmt: skip
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "deployed.zarr"
    with temporary_settings({PREFECT_API_URL: server["url"]}):
        t0 = time.time()
        run = run_deployment(
            "generate/tera",
            parameters={"config": _job(out, tiny_checkpoint), "show_progress": False},
            timeout=240,
            poll_interval=1,
        )
        print(f"flow run {run.name}: {run.state.type.value} in {time.time() - t0:.1f} s")
        with get_client(sync_client=True) as client:
            final = client.read_flow_run(run.id)
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
    log = (deployed["work"] / "worker.log").read_text()
    assert final.state.is_completed(), f"{final.state}\n{log[-3000:]}"
    assert final.deployment_id == deployed["ids"]["generate/tera"]
    by_type = {a.type: a for a in artifacts}
    assert set(by_type) == {"markdown", "image", "progress"}, [a.type for a in artifacts]
    table = by_type["markdown"].data
    print(table)
    assert "| voxels | 16,384 |" in table  # 2 stains x 4 x 32 x 64
    assert "| blocks | 2 of 4 × 32 × 32 |" in table
    assert "| DDIM steps | 2 |" in table
    assert "| conditioning fidelity r |" in table and "| seam score (1 = seamless) |" in table
    assert "| step 2/2 | 2 |" in table
    image = by_type["image"].data
    assert image.startswith("data:image/png;base64,")
    assert base64.b64decode(image.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert by_type["progress"].data == pytest.approx(100.0)
    assert by_type["markdown"].key == "deployed-figures"
    ds = xr.open_zarr(out)  # the run wrote the store it was asked for
    assert ds.attrs["tera_pipeline"]["status"] == "complete" and ds["image"].shape == (2, 4, 32, 64)


def test_bad_parameters_fail_at_once_with_the_field_named(server, deployed, tmp_path,
                                                          tiny_checkpoint):  # fmt: skip
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["url"]}):
        # a field out of its range: the server refuses to create the run
        job = _job(tmp_path / "a.zarr", tiny_checkpoint)
        job["diffusion"]["steps"] = 0
        with pytest.raises(PrefectHTTPStatusError, match=r"config\.diffusion\.steps"):
            run_deployment("generate/tera", parameters={"config": job}, timeout=0)
        # a layout the config model refuses: the run fails at its start, before any store
        out = tmp_path / "b.zarr"
        run = run_deployment(
            "generate/tera",
            parameters={"config": _job(out, tiny_checkpoint, block=[3, 32, 32])},
            timeout=120,
            poll_interval=1,
        )
    assert run.state.is_failed()
    assert "config: Value error, block (3, 32, 32) is not a whole number of strides" in (
        run.state.message
    )
    assert not out.exists()


@pytest.mark.slow  # ~50 s; a deployment run to completion: the generate deployment above
def test_pipeline_deployment_generates_then_analyses(server, deployed, tmp_path, tiny_checkpoint):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "piped.zarr"
    with temporary_settings({PREFECT_API_URL: server["url"]}):
        # an analysis that does not exist fails the run before anything is generated
        bad = run_deployment(
            "pipeline/tera",
            parameters={"config": _job(out, tiny_checkpoint), "analyses": ["nope"]},
            timeout=120,
            poll_interval=1,
        )
        assert bad.state.is_failed() and "unknown analyses ['nope']" in bad.state.message
        assert not out.exists()
        run = run_deployment(
            "pipeline/tera",
            parameters={"config": _job(out, tiny_checkpoint), "analyses": ["attention"]},
            timeout=240,
            poll_interval=1,
        )
        with get_client(sync_client=True) as client:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])
                )
            )
            flows = {client.read_flow(c.flow_id).name: c.state.type.value for c in children}
    assert run.state.is_completed(), run.state
    assert flows == {"generate": "COMPLETED", "attention": "COMPLETED"}
    ds = xr.open_zarr(out)
    assert ds.attrs["tera_pipeline"]["status"] == "complete"
    assert "attention_pairs" in ds
