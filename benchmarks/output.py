"""How a benchmark reports: its result as indented JSON on stdout, and in a file if asked."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, path: Path | None = None) -> None:
    """Print ``result`` as JSON (values JSON lacks as text); also write it to ``path``."""
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
