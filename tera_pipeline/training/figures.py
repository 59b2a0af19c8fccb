"""What a person watches while a model trains: the loss curves and sample images as PNGs, and
the log as JSON lines, in the folder beside the checkpoint (``resume.figures_dir``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tera_pipeline.storage.atomic import write_bytes, write_with

LOSS_PNG = "loss.png"
SAMPLES_PNG = "samples.png"
LOG_JSONL = "log.jsonl"


def write_log(folder: Path, entries: Sequence[dict]) -> Path:
    """The log entries as JSON lines (``log.jsonl``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOG_JSONL
    write_bytes(path, "".join(json.dumps(e) + "\n" for e in entries).encode())
    return path


def _series(entries: Sequence[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Per stage, each loss term's (step, value) points (keys with "loss", "flow" or "mse")."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for e in entries:
        stage = out.setdefault(str(e.get("stage", "")), {})
        for k, v in e.items():
            wanted = any(w in k for w in ("loss", "flow", "mse", "expression", "image"))
            if wanted and isinstance(v, int | float):
                stage.setdefault(k, []).append((int(e["step"]), float(v)))
    return out


def loss_png(folder: Path, entries: Sequence[dict], title: str = "") -> Path | None:
    """Loss curves (log scale), one panel per stage, train and validation terms together."""
    stages = {k: v for k, v in _series(entries).items() if v}
    if not stages:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.6), squeeze=False)
    for ax, (stage, terms) in zip(axes[0], stages.items(), strict=True):
        for name, points in terms.items():
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=name)
        if all(v > 0 for pts in terms.values() for _, v in pts):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{title} {stage}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, folder / LOSS_PNG)


def samples_png(folder: Path, rows: dict[str, np.ndarray], step: int) -> Path:
    """Images in rows (each (N, H, W) in [-1, 1]), labelled; written as ``samples.png`` and as
    ``samples_<step>.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.6 * len(rows)), squeeze=False)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(images):
                ax.imshow(np.asarray(images[c]), cmap="gray", vmin=-1, vmax=1)
        axes[r, 0].set_ylabel(label, fontsize=8)
    fig.suptitle(f"step {step}", fontsize=9)
    fig.tight_layout()
    path = _save(fig, folder / f"samples_{step:07d}.png")
    write_bytes(folder / SAMPLES_PNG, path.read_bytes())
    return path


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
    return path
