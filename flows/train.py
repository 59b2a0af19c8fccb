"""Prefect flow: train a model; thin, it runs ``tera train`` (under ``torchrun`` for several
processes) and publishes the loss curve, the log and the sample images as artifacts."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact
from prefect.cache_policies import NONE

from flows.artifacts import artifact_key, png_data_uri
from tera_pipeline.training.figures import LOG_JSONL, LOSS_PNG, SAMPLES_PNG
from tera_pipeline.training.resume import figures_dir

Model = Literal["denoiser", "magnet", "spatia"]


def training_command(model: Model, out: str, processes: int, args: list[str]) -> list[str]:
    """``tera train <model> --out <out> <args>``: one process, or ``processes`` under torchrun
    on this machine (``--standalone``: a free rendezvous port)."""
    tera = ["-m", "flows.cli", "train", model, "--out", out, *args]
    if processes <= 1:
        return [sys.executable, *tera]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    return [sys.executable, *launcher, *tera]


@task(cache_policy=NONE, persist_result=False)
def run_training(command: list[str]) -> None:
    """Run the training command, its output lines into the run's log; fails on a non-zero exit
    with the last lines."""
    logger = get_run_logger()
    logger.info("running: %s", " ".join(command))
    tail: deque[str] = deque(maxlen=30)
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip())
            logger.info("%s", line.rstrip())
    if proc.returncode != 0:
        raise RuntimeError(f"training exited with {proc.returncode}: " + "\n".join(tail))


def log_table(entries: list[dict], rows: int = 12) -> str:
    """The last ``rows`` log entries as a markdown table."""
    shown = entries[-rows:]
    keys = [k for k in dict.fromkeys(k for e in shown for k in e)]
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    for e in shown:
        cells = [f"{e[k]:.5g}" if isinstance(e.get(k), float) else str(e.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, persist_result=False)
def publish_training_artifacts(out: str) -> dict:
    """The loss curve (and the latest samples) as image artifacts, the log as a table."""
    folder = figures_dir(Path(out))
    entries = [json.loads(line) for line in (folder / LOG_JSONL).read_text().splitlines()]
    made = {
        "log": str(
            create_markdown_artifact(
                f"Training log of {out} ({len(entries)} entries)\n\n{log_table(entries)}",
                key=artifact_key(Path(out), "training-log"),
                description=f"Training log of {out}",
            )
        )
    }
    for name, png in (("loss", LOSS_PNG), ("samples", SAMPLES_PNG)):
        if (folder / png).is_file():
            made[name] = str(
                create_image_artifact(
                    png_data_uri(folder / png),
                    key=artifact_key(Path(out), f"training-{name}"),
                    description=f"{name} of {out} ({folder / png})",
                )
            )
    return made


@flow(name="train")
def train_flow(
    model: Model = "denoiser", out: str = "model.safetensors", processes: int = 1,
    args: list[str] | None = None,
) -> dict:  # fmt: skip
    """Train ``model`` into ``out`` with ``tera train``'s ``args`` (e.g. ["--size", "base",
    "--steps", "20000"]), on ``processes`` data-parallel processes (one per GPU), resumable
    from ``<out stem>.resume.pt``; publishes the loss curve, samples and log as artifacts."""
    run_training(training_command(model, out, processes, list(args or [])))
    return {"out": out, "artifacts": publish_training_artifacts(out)}
