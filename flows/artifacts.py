"""Prefect artifacts of a run: its figures as a markdown table, its orthogonal slices as an
image, and a progress bar over DDIM steps; thin, the figures come from tera_pipeline.figures."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NONE

from tera_pipeline.evaluation.figures import markdown, run_figures
from tera_pipeline.evaluation.views import orthoslices_png
from tera_pipeline.storage import ownership


def artifact_key(root: Path, what: str) -> str:
    """A key the UI lists (lowercase letters, digits, dashes): store name and kind."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(root).stem.lower()).strip("-") or "store"
    return f"{stem}-{what}"


def png_data_uri(png: Path) -> str:
    """The PNG inline, so the artifact shows without a file server next to the store."""
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()


# Artifacts go to the Prefect API: retry a hiccup of the server, never recompute the volume.
@task(retries=2, retry_delay_seconds=5, cache_policy=NONE, persist_result=False)
def publish_run_artifacts(store: str) -> dict:
    """Figures table and orthogonal-slice image of a finished store, as artifacts of this run."""
    root = Path(store)
    figures = run_figures(root)
    with ownership.side_file(root, root.parent / f"{root.stem}_orthoslices.png") as target:
        png = orthoslices_png(root, target)
    table = create_markdown_artifact(
        markdown(figures),
        key=artifact_key(root, "figures"),
        description=f"Run figures of {root}",
    )
    image = create_image_artifact(
        png_data_uri(png),
        key=artifact_key(root, "orthoslices"),
        description=f"Orthogonal slices through the centre of {root} ({png})",
    )
    measured = {k: figures.get(k) for k in ("time_per_step_s", "fidelity_r", "seam_score")}
    get_run_logger().info(
        "figures: %s voxels; per step %s s; fidelity r %s; seam score %s; slices %s",
        f"{figures['voxels']:,}",
        *("-" if v is None else f"{v:.3g}" for v in measured.values()),
        png,
    )
    return {"figures": str(table), "orthoslices": str(image), "png": str(png)}


class StepProgress:
    """A progress artifact over the DDIM steps of a run (the UI's run page shows it)."""

    def __init__(self, root: Path, steps: int) -> None:
        self.steps = max(steps, 1)
        self.id: UUID = create_progress_artifact(
            0.0, key=artifact_key(root, "progress"), description=f"DDIM steps done, {root}"
        )

    def done(self, steps_done: int) -> None:
        try:
            update_progress_artifact(self.id, 100.0 * steps_done / self.steps)
        except Exception as err:  # a display: an API hiccup must not stop the run
            get_run_logger().warning("progress artifact not updated: %s", err)
