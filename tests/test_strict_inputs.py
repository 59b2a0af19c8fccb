"""Bad input files and bad configs are refused quickly, in one line naming the file (and line),
before anything is written: binary or non-UTF-8 CSVs, decimal commas, rows with a wrong number
of fields, non-numeric values, counts that are not whole numbers, malformed or non-mapping YAML
and out-of-range config fields. A BOM and CRLF line endings are read like the clean file."""

from __future__ import annotations

import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from pydantic import ValidationError
from typer.testing import CliRunner

from flows.cli import app
from tera_pipeline.core.config import ConfigError, JobConfig
from tera_pipeline.core.errors import InputError
from tera_pipeline.inputs.cells import load_cells
from tera_pipeline.inputs.csv_text import transcript_csv_batches
from tera_pipeline.inputs.panel import read_gene_panel
from tera_pipeline.inputs.partition import partition
from tera_pipeline.inputs.synthetic import GENE_PANEL
from tera_pipeline.inputs.vendors import is_transcript_table

pytestmark = pytest.mark.filterwarnings("ignore:Variable names are not unique")
runner = CliRunner()
N = 12
SHAPE = (4, 64, 64)  # spacing (4, 1, 1): z in [0, 16) µm, y and x in [0, 64) µm


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test: HOME and the working directory inside its own tmp_path."""
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


# -- clean files and their one-line variations ---------------------------------------------------
def cell_lines() -> list[str]:
    """A clean cell CSV (x, y, z, one column per panel gene) as lines; row i is at line i + 2."""
    lines = [",".join(["x", "y", "z", *GENE_PANEL])]
    for i in range(N):
        counts = [str((i + g) % 4) for g in range(len(GENE_PANEL))]
        lines.append(
            ",".join([f"{0.5 + 5 * i}", f"{60.5 - 4 * i}", f"{1.5 + 4 * (i % 4)}", *counts])
        )
    return lines


def transcript_lines() -> list[str]:
    """A clean transcript CSV (x, y, z, gene) with every panel gene; row i at line i + 2."""
    lines = ["x,y,z,gene"]
    for i, gene in enumerate(GENE_PANEL * 2):
        lines.append(f"{0.5 + i % 64},{63.5 - i % 64},{1.5 + 4 * (i % 4)},{gene}")
    return lines


def write(path: Path, lines: list[str], newline: str = "\n", bom: bool = False) -> Path:
    data = newline.join(lines) + newline
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode())
    return path


def replaced(lines: list[str], line: int, text: str) -> list[str]:
    """``lines`` with line number ``line`` (from 1) replaced by ``text``."""
    out = list(lines)
    out[line - 1] = text
    return out


def field(lines: list[str], line: int, column: int, value: str) -> list[str]:
    """``lines`` with one field (column from 0) of line ``line`` set to ``value``."""
    fields = lines[line - 1].split(",")
    fields[column] = value
    return replaced(lines, line, ",".join(fields))


def job(tmp: Path, source: Path, **extra) -> JobConfig:
    return JobConfig.model_validate(
        {
            "out": str(tmp / "out.zarr"),
            "volume": {"shape": SHAPE},
            "storage": {"block": (4, 32, 32)},
            "conditioning": {"source": str(source)},
            **extra,
        }
    )


def refused(call, *words: str) -> str:
    """The one-line InputError of ``call()``, holding every one of ``words``."""
    with pytest.raises(InputError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text and text == text.strip(), text
    for w in words:
        assert w in text, text
    return text


# -- encodings: binary, non-UTF-8, BOM, CRLF ------------------------------------------------------
BINARY = bytes(range(256)) * 64  # NUL bytes and invalid UTF-8 from the first line on


@pytest.mark.parametrize(
    "data, words",
    [
        (BINARY, ["line 1: binary data (NUL bytes)"]),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(1, 256)), ["line 1: not UTF-8 text (byte 0x89"]),
        ("x,y,z,gène\n1,2,3,4\n".encode("latin-1"), ["line 1: not UTF-8 text (byte 0xe8"]),
        (b"", ["empty file"]),
        (b"\n1,2,3\n", ["line 1 is blank"]),
    ],
    ids=["binary", "png", "latin-1 header", "empty", "blank header"],
)
def test_binary_or_non_utf8_csv_is_an_input_error_naming_the_file(tmp_path, data, words):
    path = tmp_path / "cells.csv"
    path.write_bytes(data)
    refused(lambda: is_transcript_table(path), str(path), *words)  # was UnicodeDecodeError
    refused(lambda: load_cells(path), str(path), *words)


def test_non_utf8_values_are_refused_naming_the_line(tmp_path):
    cells = write(tmp_path / "c.csv", cell_lines()).read_bytes().replace(b"\n5.5,", b"\n5\xe9,", 1)
    (tmp_path / "c.csv").write_bytes(cells)
    t = tmp_path / "t.csv"
    t.write_bytes(write(t, transcript_lines()).read_bytes().replace(b",Gad1\n", b",Gad\xe91\n", 1))
    line = transcript_lines().index(next(x for x in transcript_lines() if x.endswith(",Gad1"))) + 1
    refused(lambda: load_cells(tmp_path / "c.csv"), "c.csv: line 3: not UTF-8 text (column 'x')")
    refused(lambda: load_cells(t), f"t.csv: line {line}: not UTF-8 text (column 'gene')")
    refused(lambda: partition(job(tmp_path, t), GENE_PANEL, tmp_path / "staging"), f"line {line}")
    assert not (tmp_path / "staging").exists()


@pytest.mark.parametrize("newline, bom", [("\r\n", False), ("\n", True), ("\r\n", True)])
def test_bom_and_crlf_read_like_the_clean_file(tmp_path, newline, bom):
    clean_cells = load_cells(write(tmp_path / "clean.csv", cell_lines()))
    cells = load_cells(write(tmp_path / "cells.csv", cell_lines(), newline, bom))
    assert cells.genes == clean_cells.genes == GENE_PANEL
    np.testing.assert_array_equal(cells.position_um, clean_cells.position_um)
    np.testing.assert_array_equal(cells.counts, clean_cells.counts)
    clean_t = load_cells(write(tmp_path / "clean_t.csv", transcript_lines()))
    path = write(tmp_path / "t.csv", transcript_lines(), newline, bom)
    assert is_transcript_table(path)
    t = load_cells(path)
    assert t.genes == clean_t.genes and len(t) == len(clean_t) == 2 * len(GENE_PANEL)
    np.testing.assert_array_equal(t.position_um, clean_t.position_um)
    np.testing.assert_array_equal(t.counts, clean_t.counts)
    got = partition(job(tmp_path, path), GENE_PANEL, tmp_path / "a")
    want = partition(job(tmp_path, tmp_path / "clean_t.csv"), GENE_PANEL, tmp_path / "b")
    assert (got["rows"], got["kept"]) == (want["rows"], want["kept"]) == (64, 64)
    for part in sorted((tmp_path / "b").rglob("*.parquet")):
        other = tmp_path / "a" / part.relative_to(tmp_path / "b")
        assert pd.read_parquet(other).equals(pd.read_parquet(part))


# -- decimal commas, non-numeric values, fields per row ------------------------------------------
# Deliberate repetition (duplicates lists its shape): the cases are data, one entry each.
CELL_CASES = {
    "semicolons": (
        lambda: [line.replace(",", ";").replace(".", ",") for line in cell_lines()],
        ["line 1: fields separated by ';'", "'.' as the decimal point"],
    ),
    "tabs": (lambda: [x.replace(",", "\t") for x in cell_lines()], ["separated by tabs"]),
    "quoted decimal comma": (
        lambda: field(cell_lines(), 4, 1, '"52,5"'),
        ["line 4: column 'y' is not numeric: '52,5'; use '.' as the decimal point"],
    ),
    "unquoted decimal comma": (
        lambda: field(cell_lines(), 5, 0, "20,5"),
        ["line 5: 36 fields, the header has 35", "'.' as the decimal point"],
    ),
    "text coordinate": (
        lambda: field(cell_lines(), 6, 2, "deep"),
        ["line 6: column 'z' is not numeric: 'deep'; coordinates are numbers in µm"],
    ),
    "text count": (
        lambda: field(cell_lines(), 7, 3 + 6, "many"),
        ["line 7: column 'Gad1' is not numeric: 'many'; every column but x, y, z"],
    ),
    "extra field in the middle": (
        lambda: field(cell_lines(), 9, 10, "1,2"),
        ["line 9: 36 fields, the header has 35"],
    ),
    "missing field": (
        lambda: replaced(cell_lines(), 8, cell_lines()[7].rsplit(",", 1)[0]),
        ["line 8: 34 fields, the header has 35", "every row needs a field for every column"],
    ),
    "extra field on every row (pandas' index column)": (
        lambda: [cell_lines()[0], *(f"{i},{x}" for i, x in enumerate(cell_lines()[1:]))],
        ["line 2: 36 fields, the header has 35"],
    ),
    "extra field after blank lines": (
        lambda: [*cell_lines()[:3], "", "", *field(cell_lines(), 4, 4, "7,7")[3:]],
        ["line 6: 36 fields, the header has 35"],
    ),
    "fractional count": (
        lambda: field(cell_lines(), 10, 3 + 19, "2.5"),
        ["line 10: count 2.5 of gene 'Mbp' is not a whole number", "not normalized values"],
    ),
}


@pytest.mark.parametrize("case", list(CELL_CASES))
def test_bad_cell_csv_is_refused_naming_file_and_line(tmp_path, case):
    lines, words = CELL_CASES[case]
    path = write(tmp_path / "cells.csv", lines())
    refused(lambda: load_cells(path), f"{path}: ", *words)


TRANSCRIPT_CASES = {
    "quoted decimal comma": (
        lambda: field(transcript_lines(), 5, 0, '"3,5"'),
        ["line 5: column 'x' is not numeric: '3,5'; use '.' as the decimal point"],
    ),
    "unquoted decimal comma": (
        lambda: field(transcript_lines(), 6, 2, "1,5"),
        ["line 6: 5 fields, the header has 4", "'.' as the decimal point"],
    ),
    "text coordinate": (
        lambda: field(transcript_lines(), 7, 1, "n/a?"),
        ["line 7: column 'y' is not numeric: 'n/a?'"],
    ),
    "missing field": (
        lambda: replaced(transcript_lines(), 9, "1,2,3"),
        ["line 9: 3 fields, the header has 4"],
    ),
    "no gene": (lambda: field(transcript_lines(), 11, 3, ""), ["no gene (first at line 11)"]),
}


@pytest.mark.parametrize("case", list(TRANSCRIPT_CASES))
def test_bad_transcript_csv_is_refused_in_memory_and_streaming(tmp_path, case):
    lines, words = TRANSCRIPT_CASES[case]
    path = write(tmp_path / "t.csv", lines())
    refused(lambda: load_cells(path), f"{path}: ", *words)
    staging = tmp_path / "staging"
    refused(lambda: partition(job(tmp_path, path), GENE_PANEL, staging), f"{path}: ", *words)
    assert not staging.exists()


def test_transcript_checks_stream_block_by_block(tmp_path):
    """Small blocks: many batches, and an error deep in the file names its physical line."""
    rows = [
        f"{i % 64 + 0.5},{i % 61 + 0.5},{i % 16 + 0.5},{GENE_PANEL[i % 32]}" for i in range(6000)
    ]
    path = write(tmp_path / "t.csv", ["x,y,z,gene", *rows[:100], "", *rows[100:]])
    batches = list(transcript_csv_batches(path, block_size=1 << 12))
    assert len(batches) > 20 and sum(len(b) for b in batches) == 6000
    lines = ["x,y,z,gene", *rows[:100], "", *rows[100:5000], "1,2,3,Gad1,4", *rows[5000:]]
    path = write(tmp_path / "bad.csv", lines)
    seen = []
    with pytest.raises(InputError, match=r"bad\.csv: line 5003: 5 fields, the header has 4"):
        for batch in transcript_csv_batches(path, block_size=1 << 12):
            seen.append(len(batch))
    assert 0 < sum(seen) < 5000  # the earlier blocks came through before the bad one


def test_fractional_or_non_numeric_anndata_counts_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    xyz = np.stack([rng.uniform(0, 64, N), rng.uniform(0, 64, N), rng.uniform(0, 16, N)], 1)
    counts = rng.poisson(2.0, (N, len(GENE_PANEL))).astype(np.float32)
    counts[5, 3] = 2.5
    for sparse in (False, True):
        path = tmp_path / f"cells{int(sparse)}.h5ad"
        adata = anndata.AnnData(
            X=scipy.sparse.csr_matrix(counts) if sparse else counts,
            obs=pd.DataFrame(index=[f"c{i}" for i in range(N)]),
            var=pd.DataFrame(index=list(GENE_PANEL)),
        )
        adata.obsm["spatial"] = xyz
        adata.write_h5ad(path)
        refused(
            lambda path=path: load_cells(path),
            f"{path}: X holds counts that are not whole numbers in 1 cells",
            "first 2.5 of gene 'Satb2' in cell 'c5'",
        )
    counts[5, 3] = 2.0
    adata.X = counts
    adata.write_h5ad(tmp_path / "good.h5ad")
    assert load_cells(tmp_path / "good.h5ad").counts[5, 3] == 2.0


# -- config files and fields ---------------------------------------------------------------------
YAML_CASES = {
    "binary": (BINARY, "not a YAML job config: not UTF-8 text (byte 0x80 at offset 128)"),
    "nul bytes": (b"volume:\n  shape: [4, 64, 64]\x00\n", "binary data (NUL bytes)"),
    "malformed": (b"volume:\n  shape: [4, 64, 64\nstorage: {}\n", "malformed YAML at line 3"),
    "bad indentation": (b"volume:\n  shape: [4, 64, 64]\n bad: 1\n", "malformed YAML at line 3"),
    "top-level list": (b"- volume\n- storage\n", "must be a mapping of sections"),
    "top-level scalar": (b"just some words\n", "not a YAML string"),
    "top-level number": (b"42\n", "not a YAML number"),
    "section not a mapping": (b"volume: 5\n", "config section 'volume' must be a mapping"),
}


@pytest.mark.parametrize("case", list(YAML_CASES))
def test_bad_yaml_is_one_config_error_naming_the_file(tmp_path, case):
    data, words = YAML_CASES[case]
    path = tmp_path / "job.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as info:
        JobConfig.from_yaml(path, **{"volume.shape": (4, 64, 64)})
    text = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in text
    assert text.startswith(f"{path}: ") and words in text, text


def test_empty_and_bom_yaml_are_fine(tmp_path):
    (tmp_path / "empty.yaml").write_bytes(b"")
    assert JobConfig.from_yaml(tmp_path / "empty.yaml") == JobConfig()
    (tmp_path / "bom.yaml").write_bytes(b"\xef\xbb\xbfdiffusion:\r\n  seed: 7\r\n")
    assert JobConfig.from_yaml(tmp_path / "bom.yaml").diffusion.seed == 7


FIELD_CASES = {
    "negative seed": ("diffusion.seed", -1),
    "seed 2**63": ("diffusion.seed", 2**63),
    "zero steps": ("diffusion.steps", 0),
    "negative steps": ("diffusion.steps", -3),
    "steps above the schedule": ("diffusion.steps", 1001),
    "negative eta": ("diffusion.eta", -0.5),
    "eta above 1": ("diffusion.eta", 3.0),
    "nan eta": ("diffusion.eta", float("nan")),
    "zero workers": ("cluster.workers", 0),
    "zero threads": ("cluster.threads_per_worker", 0),
    "zero batch": ("batch_size", 0),
    "negative retries": ("retries", -1),
    "negative blocks in flight": ("blocks_in_flight", -1),
    "negative synthetic seed": ("synthetic_seed", -1),
    "zero volume": ("volume.shape", (0, 64, 64)),
    "zero spacing": ("volume.spacing_um", (4.0, 0.0, 1.0)),
    "infinite spacing": ("volume.spacing_um", (4.0, float("inf"), 1.0)),
    "nan origin": ("volume.origin_um", (0.0, float("nan"), 0.0)),
    "no stains": ("volume.stains", ()),
    "zero block": ("storage.block", (0, 32, 32)),
    "negative chunk": ("storage.chunk", (-2, 16, 16)),
    "zero bin": ("conditioning.bin", (0, 16, 16)),
    "zero patch": ("lattice.patch", (0, 32, 32)),
    "compression 99": ("storage.compression_level", 99),
    "affine 3 x 3": ("conditioning.affine", ((1.0, 0.0, 0.0),) * 3),
}


@pytest.mark.parametrize("case", list(FIELD_CASES))
def test_out_of_range_fields_are_validation_errors(case):
    key, value = FIELD_CASES[case]
    with pytest.raises(ValidationError):
        JobConfig().with_overrides(**{key: value})


def test_seed_range_ends():
    assert JobConfig().with_overrides(**{"diffusion.seed": 2**63 - 1}).diffusion.seed == 2**63 - 1
    assert JobConfig().with_overrides(**{"diffusion.seed": 0}).diffusion.seed == 0


# -- through the CLI: exit 2, one line, fast, no store -------------------------------------------
def _generate(
    tmp: Path, checkpoint: Path, *extra: str, config: Path | None = None
) -> tuple[int, list[str], float]:
    """``tera generate`` into tmp/out.zarr: (exit code, non-blank output lines, seconds)."""
    out = tmp / "out.zarr"
    args = ["generate", *([str(config)] if config else []), "--out", str(out)]
    args += ["--shape", "4,64,64", "--block", "4,32,32", "--checkpoint", str(checkpoint), *extra]
    start = time.perf_counter()
    result = runner.invoke(app, args)
    elapsed = time.perf_counter() - start
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert not out.exists(), "the output store was created"
    assert not (tmp / ".out.zarr.cells-staging").exists(), "the staging folder was left behind"
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, lines, elapsed


def _cli_input(tmp: Path, kind: str) -> tuple[Path, str]:
    if kind == "binary":
        (tmp / "b.csv").write_bytes(BINARY)
        return tmp / "b.csv", "line 1: binary data"
    if kind == "latin-1 gene":
        path = write(tmp / "t.csv", transcript_lines())
        path.write_bytes(path.read_bytes().replace(b",Mbp\n", b",Mb\xe9\n"))
        return path, "not UTF-8 text (column 'gene')"
    if kind == "semicolons":
        return write(tmp / "s.csv", [x.replace(",", ";") for x in cell_lines()]), "';'"
    if kind == "decimal comma":
        return write(tmp / "d.csv", field(cell_lines(), 3, 0, '"5,5"')), "line 3: column 'x'"
    if kind == "transcript decimal comma":
        path = write(tmp / "t.csv", field(transcript_lines(), 4, 1, '"5,5"'))
        return path, "line 4: column 'y' is not numeric"
    if kind == "extra field":
        return write(tmp / "e.csv", field(cell_lines(), 6, 12, "1,1")), "line 6: 36 fields"
    if kind == "index column":
        lines = [cell_lines()[0], *(f"{i},{x}" for i, x in enumerate(cell_lines()[1:]))]
        return write(tmp / "i.csv", lines), "line 2: 36 fields"
    if kind == "fractional count":
        return write(tmp / "f.csv", field(cell_lines(), 5, 4, "0.5")), "line 5: count 0.5"
    if kind == "fractional h5ad":
        counts = np.full((N, len(GENE_PANEL)), 1.5, np.float32)
        adata = anndata.AnnData(X=counts, var=pd.DataFrame(index=list(GENE_PANEL)))
        adata.obsm["spatial"] = np.full((N, 3), 2.5)
        adata.write_h5ad(tmp / "f.h5ad")
        return tmp / "f.h5ad", "X holds counts that are not whole numbers"
    raise AssertionError(kind)


CLI_INPUTS = [
    "binary",
    "latin-1 gene",
    "semicolons",
    "decimal comma",
    "transcript decimal comma",
    "extra field",
    "index column",
    "fractional count",
    "fractional h5ad",
]


@pytest.mark.parametrize("kind", CLI_INPUTS)
def test_cli_refuses_bad_input_in_one_line_before_writing(tmp_path, tiny_checkpoint, kind):
    path, words = _cli_input(tmp_path, kind)
    code, lines, elapsed = _generate(tmp_path, tiny_checkpoint, "--cells", str(path))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), lines
    assert words in lines[0], lines[0]
    assert elapsed < 5.0


@pytest.mark.parametrize("case", ["binary", "malformed", "top-level list", "top-level scalar"])
def test_cli_refuses_bad_config_file_in_one_line(tmp_path, tiny_checkpoint, case):
    data, words = YAML_CASES[case]
    (tmp_path / "job.yaml").write_bytes(data)
    code, lines, elapsed = _generate(tmp_path, tiny_checkpoint, config=tmp_path / "job.yaml")
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / 'job.yaml'}: "), lines
    assert words in lines[0] and elapsed < 5.0, lines[0]


@pytest.mark.parametrize(
    "option, value, where",
    [
        ("--seed", "-1", "diffusion.seed"),
        ("--seed", str(2**63), "diffusion.seed"),
        ("--steps", "0", "diffusion.steps"),
        ("--workers", "0", "cluster.workers"),
    ],
)
def test_cli_refuses_out_of_range_options_in_one_line(
    tmp_path, tiny_checkpoint, option, value, where
):
    code, lines, elapsed = _generate(tmp_path, tiny_checkpoint, option, value)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: invalid config {where}: "), lines
    assert elapsed < 5.0


@pytest.mark.parametrize(
    "data, words",
    [(BINARY, "binary data (NUL bytes)"), ("Gad1\nMbp\nÅqp4\n".encode("latin-1"), ":3: not UTF-8")],
    ids=["binary", "latin-1"],
)
def test_binary_or_non_utf8_gene_panel_is_refused(tmp_path, tiny_checkpoint, data, words):
    (tmp_path / "panel.txt").write_bytes(data)
    refused(lambda: read_gene_panel(tmp_path / "panel.txt"), str(tmp_path / "panel.txt"), words)
    cells = write(tmp_path / "cells.csv", cell_lines())
    extra = ["--cells", str(cells), "--gene-panel", str(tmp_path / "panel.txt")]
    code, lines, elapsed = _generate(tmp_path, tiny_checkpoint, *extra)
    assert code == 2 and len(lines) == 1 and words in lines[0] and elapsed < 5.0, lines
