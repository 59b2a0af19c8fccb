"""Training where users train: data-parallel processes that equal one process, runs that stop
and resume on the uninterrupted curve, the GPU size ``base``, and the training deployment.

Tolerances (stated here, measured figures in the report):
- two gloo processes with half the batch each against one process with the whole batch, 30
  steps of the tiny denoiser: every step's loss within ``LOSS_RTOL`` (float summation order:
  a batch of 4 convolves in another order than a batch of 8); the weights within ``WEIGHT_ATOL``
  wherever the gradient is not identically zero. The exceptions are parameters whose gradient
  is zero in exact arithmetic (a convolution's bias just before a GroupNorm, an attention key's
  bias): Adam turns their rounding noise (~1e-10) into steps of ±lr in both runs alike, so they
  are compared by where the optimiser saw a gradient at all.
- a stopped or killed run resumed: exact (the same bits) on the CPU's deterministic kernels.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tera_pipeline.training.denoiser import train_denoiser
from tera_pipeline.training.loop import Recipe
from tera_pipeline.training.trainer import TrainingStopped, TrainOptions

from .conftest import TINY, free_port

LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
NOISE_ONLY = 1e-16
"""Adam's second moment below which a weight's gradient was rounding noise alone."""
RUN_S = 150
TINY_RUN = ["train", "denoiser", "--size", "tiny", "--batch", "8", "--volume", "4,96,96",
            "--log-every", "1", "--validate-every", "10", "--figures-every", "0", "--threads", "1",
            "--no-progress"]  # fmt: skip


@pytest.fixture(autouse=True)
def _home(tmp_path, monkeypatch):
    """A tmp HOME and cwd; one torch thread (what the subprocesses use: a shared machine)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _launch(args: list[str], processes: int = 1) -> subprocess.Popen:
    """``tera`` with ``args``, alone or under torchrun (gloo, a free port), one thread each."""
    # TMPDIR: torchrun's agent leaves a torchelastic_* folder there; the test's own (the cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": os.getcwd()}
    tera = ["-m", "flows.cli", *args]
    if processes > 1:
        port = str(free_port())
        launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={processes}",
                    "--master-addr=127.0.0.1", f"--master-port={port}"]  # fmt: skip
        tera = [*launcher, *tera]
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    return subprocess.Popen([sys.executable, *tera], env=env, start_new_session=True, **out)


def _finish(proc: subprocess.Popen, timeout: float = RUN_S) -> str:
    """The output of a run that must end within ``timeout`` (its process group killed if not)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"training did not end in {timeout} s: {out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def _log(out: Path) -> list[dict]:
    folder = out.with_name(f"{out.stem}_training")
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def _state(out: Path) -> dict:
    return torch.load(out.with_name(f"{out.stem}.resume.pt"), weights_only=True)


def _noise_free(state: dict) -> dict[str, torch.Tensor]:
    """Per weight of the model: where the optimiser saw more than rounding noise."""
    moments = state["optimizer"]["state"]
    return {k: moments[i]["exp_avg_sq"] > NOISE_ONLY for i, k in enumerate(state["model"])}


def _worst(diffs: dict[str, torch.Tensor], mask: dict[str, torch.Tensor]) -> float:
    return max(float(d[mask[k]].max()) if mask[k].any() else 0.0 for k, d in diffs.items())


def test_two_processes_with_half_the_batch_each_follow_the_one_process_run(tmp_path):
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    common = [*TINY_RUN, "--steps", "30", "--checkpoint-every", "30"]
    t0 = time.perf_counter()
    _finish(_launch([*common, "--out", str(one)]))
    t1 = time.perf_counter()
    output = _finish(_launch([*common, "--out", str(two)], processes=2))
    t2 = time.perf_counter()
    assert output.count("wrote ") == 1  # rank 0 alone saves and says so
    a, b = _log(one), _log(two)
    loss_a = np.array([e["train_loss"] for e in a])
    loss_b = np.array([e["train_loss"] for e in b])
    assert len(loss_a) == len(loss_b) == 30
    rel = np.abs(loss_a - loss_b) / loss_a
    sa, sb = _state(one), _state(two)
    mask = _noise_free(sa)
    diffs = {k: (sa["model"][k] - sb["model"][k]).abs() for k in mask}
    worst = _worst(diffs, mask)
    noisy = sorted(k for k, m in mask.items() if not m.all())
    ema_a, ema_b = load_file(one), load_file(two)
    worst_ema = _worst({k: (ema_a[k] - ema_b[k]).abs() for k in mask}, mask)
    print(f"\n1 process {t1 - t0:.1f} s, 2 processes {t2 - t1:.1f} s; loss max rel diff "
          f"{rel.max():.2e} (loss {loss_a[0]:.3f} -> {loss_a[-1]:.3f}); weights max abs diff "
          f"{worst:.2e} (EMA {worst_ema:.2e}) where the gradient is not zero; noise-only in "
          f"{noisy}: up to {max(float(d.max()) for d in diffs.values()):.1e}")  # fmt: skip
    assert rel.max() < LOSS_RTOL
    val_a, val_b = ([e["val_loss"] for e in log if "val_loss" in e] for log in (a, b))
    assert len(val_a) == 3 and val_b == pytest.approx(val_a, rel=1e-4)
    assert worst < WEIGHT_ATOL and worst_ema < WEIGHT_ATOL
    share = 1 - sum(int(m.sum()) for m in mask.values()) / sum(m.numel() for m in mask.values())
    print(f"weights without a gradient: {share:.2%}")
    assert share < 0.05  # biases a GroupNorm cancels, key biases, inputs that are always zero
    assert loss_a[-10:].mean() < loss_a[:10].mean()


def test_accumulated_micro_batches_follow_the_whole_batch(tmp_path):
    kw = {"volume": (4, 96, 96), "model_config": TINY, "log_every": 1, "validate_every": 10}
    whole = train_denoiser(tmp_path / "a.safetensors", 10, Recipe(8, 3e-3), **kw)
    parts = train_denoiser(tmp_path / "b.safetensors", 10, Recipe(8, 3e-3),
                           options=TrainOptions(accumulate=4, ema_decay=0.999), **kw)  # fmt: skip
    a = np.array([e["train_loss"] for e in whole])
    b = np.array([e["train_loss"] for e in parts])
    print(f"\naccumulate 4 x 2 against 8: loss max rel diff {(np.abs(a - b) / a).max():.2e}")
    np.testing.assert_allclose(b, a, rtol=LOSS_RTOL)
    assert load_file(tmp_path / "b.safetensors")  # the EMA checkpoint, saved


def test_an_out_of_core_patch_source_plugs_into_the_denoiser_stage(tmp_path):
    """``StorePatches`` (keyed draws from a store) in place of the in-memory volume."""
    from tera_pipeline.core.geometry import Box, bin_box
    from tera_pipeline.training.store_patches import StorePatches

    from .test_store_patches import GENES, write_store

    rng = np.random.default_rng(7)
    shape = (6, 128, 112)
    image = rng.integers(0, 255, (2, *shape), dtype=np.uint8)
    raster = rng.poisson(2.0, (len(GENES), *bin_box(Box((0, 0, 0), shape), (1, 16, 16)).shape))
    write_store(tmp_path / "job.zarr", image, raster.astype(np.float32))
    source = StorePatches(tmp_path / "job.zarr", TINY.patch, TINY.cond_context, TINY.cond_extra)
    out = tmp_path / "store.safetensors"
    history = train_denoiser(out, 3, Recipe(4, 1e-3), model_config=TINY, log_every=1,
                             source=source, val_patches=4)  # fmt: skip
    assert len(history) == 3 and all(np.isfinite(e["train_loss"]) for e in history)
    assert load_file(out) and json.loads(_meta(out)["genes"]) == list(GENES)


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_stopped_run_resumed_continues_exactly_on_the_uninterrupted_curve(tmp_path):
    kw = {"volume": (4, 96, 96), "model_config": TINY, "log_every": 2, "validate_every": 10}
    options = TrainOptions(ema_decay=0.99, checkpoint_every=4, figures_every=0)
    full = train_denoiser(tmp_path / "full.safetensors", 20, Recipe(8, 3e-3), options=options, **kw)
    cut = tmp_path / "cut.safetensors"
    with pytest.raises(TrainingStopped, match="stopped after 10 steps; continue with --resume"):
        train_denoiser(cut, 20, Recipe(8, 3e-3), options=TrainOptions(
            ema_decay=0.99, checkpoint_every=4, figures_every=0, stop_after=10), **kw)  # fmt: skip
    assert not cut.exists() and _state(cut)["step"] == 10
    state = cut.with_name("cut.resume.pt")
    with pytest.raises(Exception, match="another run; resuming it cannot change lr"):
        train_denoiser(cut, 20, Recipe(8, 1e-3), options=TrainOptions(resume=state), **kw)
    resumed = train_denoiser(cut, 20, Recipe(8, 3e-3), options=TrainOptions(
        ema_decay=0.99, checkpoint_every=4, figures_every=0, resume=state), **kw)  # fmt: skip

    def strip(log):
        return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]

    assert strip(resumed) == strip(full)  # every loss, validation and EMA validation, bit for bit
    assert strip(_log(cut)) == strip(full)
    a, b = load_file(tmp_path / "full.safetensors"), load_file(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the EMA weights saved
    sa, sb = _state(tmp_path / "full.safetensors"), _state(cut)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.mark.slow  # ~40 s; resuming exactly on the curve: the stopped run above
def test_a_killed_process_resumed_continues_exactly_on_the_uninterrupted_curve(tmp_path):
    full, cut = tmp_path / "full.safetensors", tmp_path / "cut.safetensors"
    common = [*TINY_RUN, "--steps", "30", "--checkpoint-every", "5", "--ema", "0.99"]
    _finish(_launch([*common, "--out", str(full)]))
    state = cut.with_name("cut.resume.pt")
    proc = _launch([*common, "--out", str(cut), "--resume", str(state)])  # none yet: it starts
    deadline = time.time() + RUN_S
    while not (state.exists() and torch.load(state, weights_only=True)["step"] >= 10):
        assert proc.poll() is None and time.time() < deadline, "no training state at step 10"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: after the state of step 10 or later
    proc.wait(timeout=30)
    killed_at = torch.load(state, weights_only=True)["step"]
    assert killed_at < 30 and not cut.exists()
    _finish(_launch([*common, "--out", str(cut), "--resume", str(state)]))
    print(f"\nkilled after the state of step {killed_at}, resumed to 30")

    def strip(log):
        return [{k: v for k, v in e.items() if k != "elapsed_s"} for e in log]

    assert strip(_log(cut)) == strip(_log(full))
    a, b = load_file(full), load_file(cut)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # ~25 s: a 100 M-parameter model's step on 2 cores
def test_base_size_is_tera_minds_class_and_trains_a_step_on_the_cpu(tmp_path):
    from torch.utils.flop_counter import FlopCounterMode

    from models.checkpoint import load_denoiser
    from models.denoiser import DENOISER_SIZES, ConditionalUNet3D, DenoiserConfig

    cfg = DenoiserConfig(**DENOISER_SIZES["base"], sub_bin_offsets=True)
    torch.manual_seed(0)
    model = ConditionalUNet3D(cfg)
    params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, cfg.channels, *cfg.patch)
    cond = torch.rand(1, cfg.genes, *cfg.cond_input)
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        assert model(x, torch.tensor([500]), cond, torch.tensor([[0, 3, 5]])).shape == x.shape
    gflop = flops.get_total_flops() / 1e9
    del model
    t0 = time.perf_counter()
    history = train_denoiser(tmp_path / "base.safetensors", 1, Recipe(1, 1e-4),
                             volume=(2, 96, 96), model_config=cfg, val_patches=1)  # fmt: skip
    step_s = time.perf_counter() - t0
    print(f"\nbase: {params / 1e6:.1f} M parameters, {gflop:.1f} GFLOP per {cfg.patch} patch "
          f"(forward), one CPU step with validation {step_s:.1f} s: {history[-1]}")  # fmt: skip
    assert 80e6 < params < 250e6 and 20 < gflop < 200
    assert np.isfinite(history[-1]["train_loss"])
    loaded, meta = load_denoiser(tmp_path / "base.safetensors")
    assert loaded.cfg.attention_levels == (2, 3) and meta["training"]["weights"] == "ema"


@pytest.mark.slow  # ~60 s with its own server; deployments run by a worker: test_deployments
def test_training_deployment_publishes_its_loss_curve(server, deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    out = tmp_path / "deployed.safetensors"
    args = ["--size", "tiny", "--steps", "4", "--batch", "4", "--volume", "4,64,64",
            "--log-every", "2", "--figures-every", "2", "--threads", "1"]  # fmt: skip
    with temporary_settings({PREFECT_API_URL: server["url"]}):
        t0 = time.time()
        run = run_deployment(
            "train/tera",
            parameters={"model": "denoiser", "out": str(out), "processes": 2, "args": args},
            timeout=240,
            poll_interval=1,
        )
        print(f"\ntraining flow run {run.name}: {run.state.type.value} in {time.time() - t0:.1f} s")
        with get_client(sync_client=True) as client:
            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
    log = (deployed["work"] / "worker.log").read_text()
    assert run.state.is_completed(), f"{run.state}\n{log[-3000:]}"
    by_key = {a.key: a for a in artifacts}
    assert {"deployed-training-loss", "deployed-training-log"} <= set(by_key), list(by_key)
    assert by_key["deployed-training-loss"].data.startswith("data:image/png;base64,")
    assert "| step |" in by_key["deployed-training-log"].data
    assert out.is_file()
