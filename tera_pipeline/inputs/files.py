"""A user's files: the column conventions of its tables, existence and readability checked
with one-line errors, and the short lists those errors name."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from tera_pipeline.core.errors import InputError

PathLike = str | Path

COORDS: tuple[str, str, str] = ("x", "y", "z")
"""Coordinate columns of the tables, in the atlas order (x, y, z)."""
GENE_COLUMN = "gene"
PARQUET_SUFFIXES = (".parquet", ".pq")
METADATA_COLUMNS: frozenset[str] = frozenset(
    {"cell_id", "cell_type", "fov", "sample", "section", "slice", "region", "cluster", "volume"}
)
"""Columns of a cell CSV that are not genes (besides x, y, z)."""


def name_list(names: Iterable[object], limit: int = 5) -> str:
    """'A', 'B', 'C' (+2 more): the first few names for a message."""
    names = list(names)
    shown = ", ".join(repr(str(n)) for n in names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def duplicated(names: Sequence[str]) -> list[str]:
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for n in names:
        if n in seen:
            dup[n] = None
        seen.add(n)
    return list(dup)


def existing_file(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def read_user_file(path: Path, what: str, reader: Callable[[], object]) -> object:
    """Run a library reader, turning its I/O or format errors into a one-line ``InputError``."""
    try:
        return reader()
    except InputError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: cannot read as {what}: {first}") from err
