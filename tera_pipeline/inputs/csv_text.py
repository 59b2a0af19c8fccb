"""Strict, streamed CSV reading with Arrow: every malformed file refused in one line naming the
file and line."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.files import COORDS, GENE_COLUMN, PathLike, duplicated, name_list

HEADER_LIMIT = 8 << 20
"""Longest first line read as a CSV header (bytes)."""


_SEPARATORS = {";": "';'", "\t": "tabs", "|": "'|'"}


COORD_HINT = "coordinates are numbers in µm"


GENE_HINT = "every column but x, y, z and metadata is a gene; list it in metadata= to skip it"


GENE_TYPE = pa.dictionary(pa.int32(), pa.string())


_PARSE_ERROR = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+)")


_CONVERSION_ERROR = re.compile(
    r"In CSV column #(\d+): Row #(\d+): CSV conversion error to \w+: (.*)"
)


def csv_header(path: PathLike) -> list[str]:
    """The column names of a comma-separated UTF-8 file (a BOM is skipped; CRLF is fine).

    Binary or non-UTF-8 data, an empty first line and ';'- or tab-separated fields are an
    ``InputError`` naming the file and line 1.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.readline(HEADER_LIMIT)
    except OSError as err:
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from err
    if not raw:
        raise InputError(f"{path}: empty file (no header line)")
    if b"\0" in raw:
        raise InputError(f"{path}: line 1: binary data (NUL bytes), not a CSV text file")
    if len(raw) >= HEADER_LIMIT and not raw.endswith(b"\n"):
        raise InputError(f"{path}: line 1 is over {HEADER_LIMIT >> 20} MiB: not a CSV text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(
            f"{path}: line 1: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "save the file as UTF-8 CSV"
        ) from None
    line = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    if not line.strip():
        raise InputError(f"{path}: line 1 is blank; the first line must name the columns")
    try:
        header = [h.strip() for h in next(csv.reader([line]))]
    except csv.Error as err:
        raise InputError(f"{path}: line 1: not a CSV header: {err}") from None
    for sep, name in _SEPARATORS.items():
        if len(header) == 1 and sep in line:
            raise InputError(
                f"{path}: line 1: fields separated by {name}; need comma-separated values, "
                "with '.' as the decimal point"
            )
    return header


def _line_of_row(path: Path, row: int) -> int:
    """The line of CSV record ``row`` as Arrow numbers them (from 1, the header included, blank
    lines skipped); streams the file (called on errors only). Falls back to ``row``."""
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            seen = 0
            for record in reader:
                seen += bool(record)
                if seen == row:
                    return reader.line_num
    except (csv.Error, OSError):
        pass
    return row


def csv_stream(
    path: Path,
    header: Sequence[str],
    types: dict[int, pa.DataType],
    hints: dict[int, str],
    block_size: int = 64 << 20,
) -> Iterator[pa.RecordBatch]:
    """Record batches of the columns ``types`` (by position, named ``str(position)``) of a CSV,
    strictly: each row has one field per header column and each value converts, else an
    ``InputError`` naming the file and line. Memory stays at one block of ``block_size`` bytes."""
    import pyarrow.csv as pcsv

    names = [str(i) for i in range(len(header))]  # by position: duplicated names stay distinct
    read = pcsv.ReadOptions(
        use_threads=False,  # serial parsing: Arrow's errors then carry the row number
        block_size=block_size,
        column_names=names,
        skip_rows=1,
    )
    convert = pcsv.ConvertOptions(
        column_types={str(i): t for i, t in types.items()},
        include_columns=[str(i) for i in types],
    )
    try:
        yield from pcsv.open_csv(path, read_options=read, convert_options=convert)
    except (pa.ArrowException, OSError) as err:
        raise csv_error(path, header, hints, err) from err


def csv_error(path: Path, header: Sequence[str], hints: dict[int, str], err: Exception):
    text = " ".join(str(err).split())
    if m := _PARSE_ERROR.search(text):
        row, want, got = (int(g) for g in m.groups())
        hint = (
            "; quote values that contain ',' and use '.' as the decimal point"
            if got > want
            else "; every row needs a field for every column"
        )
        return InputError(
            f"{path}: line {_line_of_row(path, row)}: {got} fields, the header has {want}{hint}"
        )
    if m := _CONVERSION_ERROR.search(text):
        column, row, detail = int(m[1]), int(m[2]), m[3]
        where = f"{path}: line {_line_of_row(path, row)}"
        name = header[column] if column < len(header) else f"#{column + 1}"
        value = re.fullmatch(r"invalid value '(.*)'", detail)
        if "UTF8" in detail or (value and "\ufffd" in value[1]):
            return InputError(f"{where}: not UTF-8 text (column {name!r}); save the file as UTF-8")
        if value is None:
            return InputError(f"{where}: column {name!r}: {detail}")
        hints_here = [hints[column]] if column in hints else []
        if "," in value[1]:
            hints_here.insert(0, "use '.' as the decimal point")
        shown = value[1] if len(value[1]) <= 40 else value[1][:40] + "..."
        return InputError(
            f"{where}: column {name!r} is not numeric: {shown!r}"
            + "".join(f"; {h}" for h in hints_here)
        )
    return InputError(f"{path}: cannot read as CSV: {text[:300]}")


def transcript_csv_batches(
    path: PathLike,
    block_size: int = 64 << 20,
    *,
    coords: Sequence[str] = COORDS,
    gene: str = GENE_COLUMN,
    numeric: Sequence[str] = (),
    text: Sequence[str] = (),
) -> Iterator[pa.RecordBatch]:
    """A transcript CSV in record batches of ``coords`` and ``numeric`` columns (float64), the
    ``gene`` column (dictionary) and ``text`` columns (strings), checked as it streams (header,
    field counts, numbers, UTF-8, a gene on every row); memory stays at one block whatever the
    file's size."""
    path = Path(path)
    header = csv_header(path)
    needed = [*coords, gene, *numeric, *text]
    require_columns(header, needed, str(path))
    dup = [c for c in duplicated(header) if c in needed]
    if dup:
        raise InputError(f"{path}: duplicated columns {name_list(dup)}")
    cols = [header.index(c) for c in needed]
    n = len(coords)
    types = {c: pa.float64() for c in cols[:n]} | {cols[n]: GENE_TYPE}
    types |= {c: pa.float64() for c in cols[n + 1 : n + 1 + len(numeric)]}
    types |= {c: pa.string() for c in cols[n + 1 + len(numeric) :]}
    rows = 0
    for batch in csv_stream(path, header, types, dict.fromkeys(cols[:n], COORD_HINT), block_size):
        batch = pa.RecordBatch.from_arrays([batch.column(str(c)) for c in cols], names=needed)
        gene_column = batch.column(gene)
        names = gene_column.dictionary.to_pylist()
        bad = [i for i, n in enumerate(names) if n is None or not n.strip()]
        if bad or gene_column.null_count:
            index = gene_column.indices.to_numpy(zero_copy_only=False)
            missing = np.isin(index, bad) | ~np.asarray(gene_column.is_valid())
            first = int(np.argmax(missing))
            raise InputError(
                f"{path}: {int(missing.sum())} transcripts have no gene "
                f"(first at line {_line_of_row(path, rows + first + 2)})"
            )
        rows += len(batch)
        yield batch


def require_columns(columns: Sequence[str], needed: Sequence[str], source: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(
            f"{source}: missing columns {name_list(missing)}; need {name_list(needed)}"
        )
