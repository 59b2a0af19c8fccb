"""What the project may replace or delete: only what it can prove it wrote.

- A **store of ours** is a directory whose root ``zarr.json`` carries the ``tera_pipeline``
  attributes and which holds the ``_ledger`` array (or, while being created, only the lock and
  the ledger). ``--overwrite`` replaces such a store by removing the entries of
  ``STORE_ENTRIES`` one by one; a store holding any other entry is refused, naming it.
- Some paths are never a target, whatever they hold: ``/``, the home directory, the working
  directory and its parents, a regular file, a symbolic link.
- A **side file** (a report, PNG or .h5ad written beside a store) may be replaced only when its
  bytes are those the project recorded when it wrote them (``_outputs.json`` in the store);
  any other existing file is refused.

Every refusal is an ``OwnershipError`` with one line naming the path and the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.checkpoint_files import file_digest
from tera_pipeline.core.errors import TeraError
from tera_pipeline.storage.atomic import write_json

OUTPUTS = "_outputs.json"
LOCK_NAMES = ("_lock.json",)
STORE_ENTRIES = frozenset(
    {
        "zarr.json",
        "_ledger",
        "_digests",
        "_scratch",
        "_cells",
        "_pyramid_new",
        "_pyramid_old",
        OUTPUTS,
        "image",
        "conditioning",
        "cell_count",
        "pyramid",
        "labels",
        "tables",
        "points",
        "c",
        "gene",
        "x",
        "y",
        "z",
        "xbin",
        "ybin",
        "zbin",
        "attention_pairs",
        "attention_matrix",
        "pair",
        "magnet_expression",
        "spatia_niche",
        "spatia_niche_cells",
        "spatia_tissue",
        "gene_to",
        "spatia_feature",
        "xniche",
        "yniche",
        "zniche",
        "xtissue",
        "ytissue",
        "ztissue",
        "zpatch",
        "ypatch",
        "xpatch",
        "zblock",
        "yblock",
        "xblock",
    }
)
"""Every top-level entry a store of ours may hold (arrays, groups and files it writes)."""
LABEL_IMAGES = frozenset({"nuclei", "bins"})
"""The label images the project writes in ``labels/``; any other there is someone else's."""
SPATIAL_GROUPS = frozenset({"tables", "points"})
"""SpatialData element groups (``analysis.spatial_elements``): an element in one is ours when its
``zarr.json`` carries the ``tera_pipeline`` attributes."""
PARQUET = {"ngff:points": "points.parquet", "ngff:shapes": "shapes.parquet"}
"""The parquet folder a SpatialData points or shapes group holds."""


class OwnershipError(TeraError):
    """A path the project cannot prove it wrote: it is refused, and nothing is touched."""


def _protected(path: Path) -> str | None:
    """Why ``path`` can never be replaced or deleted (None when it may be, if ours)."""
    if path.is_symlink():
        return "it is a symbolic link"
    real = path.resolve()
    if real == Path(real.anchor):
        return "it is the filesystem root"
    home = Path(os.path.expanduser("~")).resolve()
    if real == home:
        return "it is the home directory"
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        return "it is the working directory or one of its parents"
    if path.exists() and not path.is_dir():
        return "it is a file, not a store"
    return None


def is_our_store(path: Path) -> bool:
    """A store this project wrote: our root attributes, or our ledger (the first array of a new
    store, so a creation cut short is recognised too)."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        return False
    for meta_path, key in ((path / "zarr.json", "tera_pipeline"),
                           (path / "_ledger" / "zarr.json", "identity")):  # fmt: skip
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        attrs = meta.get("attributes") if isinstance(meta, dict) else None
        if isinstance(attrs, dict) and isinstance(attrs.get(key), dict):
            return True
    return False


def foreign_entries(path: Path) -> list[str]:
    """Entries of a store that the project does not write (sorted): unknown top-level names,
    and inside its zarr nodes anything but metadata, chunks and child nodes."""
    out = []
    for p in Path(path).iterdir():
        if p.name in LOCK_NAMES or p.name.startswith(tuple(f"{n}." for n in LOCK_NAMES)):
            continue
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            continue
        if p.name not in STORE_ENTRIES:
            out.append(p.name)
        elif not p.name.startswith("_") and p.is_dir():
            out += [f"{p.name}/{q}" for q in _foreign_in_node(p)]
            if p.name == "labels":
                out += [f"labels/{q.name}" for q in p.iterdir() if q.is_dir()
                        and q.name not in LABEL_IMAGES and not _temporary(q.name)]  # fmt: skip
            if p.name in SPATIAL_GROUPS:
                out += [f"{p.name}/{q.name}" for q in p.iterdir()
                        if q.is_dir() and not _temporary(q.name) and not _marked(q)]  # fmt: skip
    return sorted(out)


def _temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def _marked(node: Path) -> bool:
    """Whether a zarr node carries the ``tera_pipeline`` attributes (not through a link)."""
    try:
        attrs = json.loads((node / "zarr.json").read_text()).get("attributes")
    except (OSError, ValueError, AttributeError):
        return False
    return not node.is_symlink() and isinstance(attrs, dict) and "tera_pipeline" in attrs


def _foreign_in_node(node: Path) -> list[str]:
    """What a zarr node of ours holds besides ``zarr.json``, its chunk folder ``c`` (arrays)
    and its child nodes (groups)."""
    meta = node / "zarr.json"
    if node.is_symlink() or not meta.is_file():
        return [""] if node.is_symlink() else []
    try:
        node_meta = json.loads(meta.read_text())
        kind = node_meta.get("node_type")
        encoding = node_meta.get("attributes", {}).get("encoding-type")
    except (OSError, ValueError, AttributeError):
        kind = encoding = None
    out = []
    for child in node.iterdir():
        temporary = child.name.startswith(".") and child.name.endswith(".tmp")
        if child.name == "zarr.json" or temporary:
            continue
        if kind == "array" and child.name == "c" and not child.is_symlink():
            continue  # its chunks (a file for a 0-d array)
        if kind == "group" and child.name == PARQUET.get(encoding) and not child.is_symlink():
            continue  # a SpatialData points or shapes element's table
        if kind == "group" and child.is_dir() and (child / "zarr.json").is_file():
            out += [f"{child.name}/{q}" for q in _foreign_in_node(child)]
            continue
        out.append(child.name)
    return out


def has_content(path: Path) -> bool:
    """Whether ``path`` exists with anything but a lock in it (a file or link counts)."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    if not path.exists():
        return False
    return any(p.name not in LOCK_NAMES and not p.name.startswith(f"{LOCK_NAMES[0]}.")
               for p in path.iterdir())  # fmt: skip


def check_replaceable(path: Path) -> None:
    """Raise ``OwnershipError`` unless ``path`` is absent, empty, or a store of ours with no
    foreign entry. Reads only."""
    path = Path(path)
    why = _protected(path)
    if why:
        raise OwnershipError(f"refusing to replace {path}: {why}")
    if not has_content(path):
        return
    if not is_our_store(path):
        raise OwnershipError(
            f"refusing to replace {path}: it is not a tera-pipeline store "
            "(no tera_pipeline attributes and _ledger); choose another --out"
        )
    foreign = foreign_entries(path)
    if foreign:
        raise OwnershipError(
            f"refusing to replace {path}: it holds entries tera-pipeline did not write "
            f"({', '.join(foreign[:5])}); move them away first"
        )


def clear_store(path: Path, keep: tuple[str, ...] = LOCK_NAMES) -> None:
    """Remove the entries of a store of ours one by one (never the store directory itself, and
    never an entry not in ``STORE_ENTRIES``), keeping ``keep`` (the lock)."""
    check_replaceable(path)
    for entry in Path(path).iterdir():
        if entry.name in keep or entry.name not in STORE_ENTRIES:
            continue
        remove_entry(path, entry.name)


def remove_entry(root: Path, name: str) -> None:
    """Remove one entry ``name`` the project writes inside a store of ours."""
    if name.split("/")[0] not in STORE_ENTRIES or ".." in Path(name).parts:
        raise OwnershipError(f"refusing to remove {Path(root) / name}: not an entry of ours")
    if not is_our_store(root):
        raise OwnershipError(f"refusing to remove {Path(root) / name}: not a tera-pipeline store")
    target = Path(root) / name
    if target.is_symlink() or target.is_file():
        target.unlink(missing_ok=True)
    elif target.is_dir():
        shutil.rmtree(target)


# -- side files (reports, figures, tables written beside a store) -------------------------------
def _manifest(root: Path) -> dict:
    try:
        data = json.loads((Path(root) / OUTPUTS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_side_file(root: Path, path: Path) -> None:
    """Raise unless ``path`` is absent or holds exactly the bytes the project recorded when it
    last wrote it for the store ``root``."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink() or not path.is_file():
        raise OwnershipError(f"refusing to overwrite {path}: it is not a file tera-pipeline wrote")
    recorded = _manifest(root).get(str(path.resolve()))
    if recorded != file_digest(path):
        raise OwnershipError(
            f"refusing to overwrite {path}: tera-pipeline did not write it (or it was changed "
            "since); move it away first"
        )


def record_side_file(root: Path, path: Path) -> None:
    """Record that the project wrote ``path`` (its digest), so a later run may replace it."""
    if not (Path(root) / "zarr.json").is_file():
        return
    data = _manifest(root)
    data[str(Path(path).resolve())] = file_digest(Path(path))
    write_json(Path(root) / OUTPUTS, data)


def remove_side_dir(path: Path, marker: str) -> None:
    """Remove a working folder the project made (it holds ``marker``); anything else is left."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_symlink() or not (path / marker).is_file():
        raise OwnershipError(
            f"refusing to delete {path}: it is not a working folder tera-pipeline made"
        )
    shutil.rmtree(path)


def make_side_dir(path: Path, marker: str) -> Path:
    """Create a working folder beside a store (fresh, with ``marker``); an existing folder is
    reused only if the project made it."""
    path = Path(path)
    if path.exists():
        remove_side_dir(path, marker)
    path.mkdir(parents=True)
    (path / marker).write_text("made by tera-pipeline; removed when its step finishes\n")
    return path


@contextmanager
def side_file(root: Path, path: Path) -> Iterator[Path]:
    """Write ``path`` beside the store ``root``: refused unless absent or our own earlier file;
    recorded once written."""
    check_side_file(root, path)
    yield Path(path)
    if Path(path).is_file():
        record_side_file(root, path)
