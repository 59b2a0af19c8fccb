"""Gene panels: read from a file, checked against a checkpoint's, selected from a table."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.files import (
    PathLike,
    duplicated,
    existing_file,
    name_list,
    read_user_file,
)
from tera_pipeline.inputs.synthetic import CellTable


def gene_index(available: Sequence[str], genes: Sequence[str] | None, source: str) -> list[int]:
    """Indices into ``available`` of the requested genes (all when None), in request order."""
    if genes is None:
        dup = duplicated(available)
        if dup:
            raise InputError(f"{source}: duplicated gene names {name_list(dup)}")
        return list(range(len(available)))
    genes = requested_genes(genes)
    dup = set(duplicated(available)) & set(genes)
    if dup:
        raise InputError(f"{source}: duplicated gene names {name_list(sorted(dup))}")
    where = {name: i for i, name in enumerate(available)}
    missing = [g for g in genes if g not in where]
    if missing:
        raise InputError(
            f"{source}: {len(missing)} requested genes missing: {name_list(missing)} "
            f"(the input has {len(available)} genes){naming_hint(available, genes)}"
        )
    return [where[g] for g in genes]


def requested_genes(genes: Sequence[str]) -> tuple[str, ...]:
    genes = tuple(str(g) for g in genes)
    if not genes:
        raise InputError("empty gene request: name at least one gene")
    dup = duplicated(genes)
    if dup:
        raise InputError(f"duplicated gene names in the request: {name_list(dup)}")
    return genes


_ENSEMBL = re.compile(r"ENS[A-Z]*G\d{6,}(\.\d+)?")


def naming_hint(names: Sequence[str], expected: Sequence[str]) -> str:
    """ "; ..." when one side names genes by Ensembl id and the other by symbol, else ""."""

    def ensembl(ns: Sequence[str]) -> bool:
        ns = list(ns)
        return bool(ns) and sum(bool(_ENSEMBL.fullmatch(str(n))) for n in ns) > len(ns) / 2

    if ensembl(names) and not ensembl(expected):
        return (
            "; these are Ensembl gene ids and the checkpoint's panel is gene symbols: give "
            "the symbols (an AnnData's var column such as gene_symbol, or a panel file of them)"
        )
    if ensembl(expected) and not ensembl(names):
        return "; the checkpoint's panel is Ensembl gene ids: give the genes by Ensembl id"
    return ""


def panel_difference(
    genes: Sequence[str], expected: Sequence[str], what: str = "checkpoint"
) -> str | None:
    """The one gene-panel check: None when ``genes`` is exactly ``expected`` (the ``what``'s
    panel) in the same order; otherwise what differs, in words."""
    genes, ckpt = [str(g) for g in genes], [str(g) for g in expected]
    if genes == ckpt:
        return None
    have, known = set(genes), set(ckpt)
    missing = [g for g in ckpt if g not in have]
    extra = [g for g in genes if g not in known]
    if missing or extra:
        return (
            f"{len(genes)} vs {len(ckpt)} genes: missing {name_list(missing) or 'none'}; "
            f"not in {what} {name_list(extra) or 'none'}"
        )
    dup = duplicated(genes)
    if dup:
        return f"duplicated gene names {name_list(dup)}"
    first = next(i for i, (a, b) in enumerate(zip(genes, ckpt)) if a != b)
    return (
        f"order differs from the {what} at position {first} ({genes[first]!r} vs {ckpt[first]!r})"
    )


def check_panel(genes: Sequence[str], checkpoint_genes: Sequence[str]) -> None:
    """Raise unless ``genes`` is exactly the checkpoint's panel, in the same order."""
    difference = panel_difference(genes, checkpoint_genes)
    if difference:
        raise InputError(
            f"gene panel does not match the checkpoint: {difference}"
            + (
                naming_hint(genes, checkpoint_genes)
                or "; select and order the genes as the checkpoint's"
            )
        )


def read_gene_panel(path: PathLike) -> tuple[str, ...]:
    """Gene names, one per line; blank lines and ``#`` comments are ignored."""
    path = existing_file(path)
    raw = read_user_file(path, "a gene panel", path.read_bytes)
    if b"\0" in raw:
        raise InputError(f"{path}: binary data (NUL bytes), not a gene panel text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text; save the gene panel as UTF-8") from None
    genes: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if len(name.split()) > 1:
            raise InputError(f"{path}:{number}: one gene name per line, got {name!r}")
        genes.append(name)
    if not genes:
        raise InputError(f"{path}: empty gene panel")
    dup = duplicated(genes)
    if dup:
        raise InputError(f"{path}: duplicated gene names {name_list(dup)}")
    return tuple(genes)


def select_genes(table: CellTable, genes: Sequence[str]) -> CellTable:
    """The table with count columns for ``genes`` in that order; missing genes are named."""
    index = gene_index(table.genes, genes, "cells")
    return replace(table, counts=np.ascontiguousarray(table.counts[:, index]), genes=tuple(genes))
