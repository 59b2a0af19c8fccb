"""``tera analyze attention|labels|tables|magnet|spatia`` and ``tera perturb``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import (
    GeneratedStore,
    ModelCheckpoint,
    Workers,
    analyze_app,
    app,
    refusing,
    running_flows,
    triple,
)

# Prefect's analytics only log a harmless "database is locked" error in ephemeral mode.


@analyze_app.command("attention")
def analyze_attention(
    store_path: GeneratedStore,
    pairs: Annotated[
        str | None, typer.Option(help="Gene pairs A/B,C/D (default: Tera-MIND's pathways).")
    ] = None,
    workers: Workers = None,
) -> None:
    """Gene-gene self-attention maps over the chunk grid, written into the store, plus a PNG."""
    from flows.analyze import attention_flow
    from tera_pipeline.analysis.attention import parse_pairs
    from tera_pipeline.storage.store import StoreError, group_attrs

    with refusing():
        genes = group_attrs(store_path).get("tera_pipeline", {}).get("genes")
        if not genes:
            raise StoreError(f"{store_path} is not a tera-pipeline store")
        parse_pairs(pairs, genes)
    with running_flows():
        png = attention_flow(str(store_path), pairs, workers)
    typer.echo(f"attention arrays written to {store_path}; heat map: {png}")


@analyze_app.command("labels")
def analyze_labels_cmd(
    store_path: GeneratedStore,
    block: Annotated[
        str | None,
        typer.Option(help="Labels block Z,Y,X (default: the job's; any gives the same labels)."),
    ] = None,
    workers: Workers = None,
) -> None:
    """Nuclei instance labels of the DAPI stain, block-wise with a halo: the OME-Zarr label image
    labels/nuclei in STORE (napari, neuroglancer and ome-zarr readers show it over the image)."""
    from flows.analyze import labels_flow
    from tera_pipeline.analysis import labels

    blk = triple(block, "--block")
    with refusing():
        labels.check(store_path, blk)
    with running_flows():
        echo_labels(labels_flow(str(store_path), workers, list(blk) if blk else None))


def echo_labels(result: dict) -> None:
    typer.echo(
        f"{result['nuclei']} nuclei labelled in {result['store']}/{result['labels']} "
        f"(DAPI threshold {result['threshold']}, {len(result['levels'])} levels, "
        f"{result['wall_s']:.1f} s)"
    )
    if result["unassigned_voxels"]:
        reach = result["radius_um"] + result["margin_um"]
        typer.echo(
            f"  {result['unassigned_voxels']} foreground voxels left unlabelled: farther than "
            f"{reach:g} µm from every nucleus seed (tissue, bright bridges)"
        )


@analyze_app.command("tables")
def analyze_tables_cmd(store_path: GeneratedStore) -> None:
    """SpatialData elements of STORE's outputs (rewritten; `analyze magnet` and `analyze spatia`
    write them too): labels/bins with a table per bin array, points/cells with tables/spatia."""
    from tera_pipeline.analysis import spatia, spatial_elements

    with refusing():
        bins = spatial_elements.write_bins(store_path)
        h5ad = spatia.h5ad_path(store_path)
        cells = spatial_elements.write_cells(store_path, h5ad) if h5ad.is_file() else {}
    if not bins and not cells:
        typer.echo(f"{store_path} has no bin arrays and no SPATIA cells: nothing written")
    for what in (bins, cells):
        if what:
            region = what.get("labels") or what.get("points")
            tables = ", ".join(f"tables/{t}" for t in what["tables"])
            typer.echo(f"{store_path}: {region} with {tables}")


@analyze_app.command("magnet")
def analyze_magnet_cmd(
    store_path: GeneratedStore,
    checkpoint: ModelCheckpoint = None,
    metrics: Annotated[
        bool, typer.Option(help="Compare with the conditioning (cycle consistency).")
    ] = True,
    workers: Workers = None,
) -> None:
    """Gene expression predicted back from the image (MagNet), on the conditioning's bin grid."""
    from flows.magnet import analyze_magnet
    from tera_pipeline.analysis import magnet

    with refusing():
        magnet.check(store_path, checkpoint, metrics)
    checkpoint_text = str(checkpoint) if checkpoint else None
    with running_flows():
        echo_magnet(analyze_magnet(str(store_path), workers, checkpoint_text, metrics))


def echo_magnet(result: dict) -> None:
    typer.echo(f"predicted expression written to {result['store']}/magnet_expression")
    for resolution, m in result.get("cycle_consistency", {}).items():
        typer.echo(
            f"  {resolution} bins vs conditioning: PCC per bin {m['pcc_bin']:.3f}, per gene "
            f"{m['pcc_gene']:.3f}, MSE {m['mse']:.3f}, MAE {m['mae']:.3f} (log1p counts)"
        )
    if "report" in result:
        typer.echo(f"report: {result['report']}")


def _genes_list(text: str | None) -> list[str]:
    return [g.strip() for g in (text or "").split(",") if g.strip()]


@analyze_app.command("spatia")
def analyze_spatia_cmd(
    store_path: GeneratedStore,
    checkpoint: ModelCheckpoint = None,
    impute: Annotated[
        str | None, typer.Option(help="Genes hidden from the input and imputed: A,B.")
    ] = None,
    block: Annotated[
        str | None, typer.Option(help="Analysis block Z,Y,X (default: the job's, whole niches).")
    ] = None,
    workers: Workers = None,
) -> None:
    """SPATIA cell embeddings, types and imputed genes (.h5ad beside STORE) and niche / tissue
    embeddings (arrays in STORE)."""
    from flows.spatia import analyze_spatia
    from tera_pipeline.analysis import spatia_plan

    masked, blk = _genes_list(impute), triple(block, "--block")
    with refusing():
        spatia_plan.plan(store_path, checkpoint, masked, blk)
    blk_list = list(blk) if blk else None
    with running_flows():
        result = analyze_spatia(str(store_path), workers, _str(checkpoint), masked, blk_list)
    echo_spatia(result)


def _str(path: Path | None) -> str | None:
    return str(path) if path else None


def demo_spatia(store_path: Path, out: Path, workers: int | None) -> None:
    """The demo's SPATIA step: embed the cells of the generated volume, score the predicted
    types against the synthetic truth, and perturb the nucleus-size driver of 8 cells."""
    import anndata

    from flows.spatia import analyze_spatia
    from tera_pipeline.analysis.perturb import perturb_store

    typer.echo("SPATIA: cell embeddings, types and niches from the generated image")
    result = analyze_spatia(str(store_path), workers)
    echo_spatia(result)
    obs = anndata.read_h5ad(result["h5ad"], backed="r").obs
    if "cell_type" in obs and "predicted_type" in obs:
        agree = (obs["cell_type"].astype(str) == obs["predicted_type"].astype(str)).mean()
        typer.echo(f"  predicted cell types agree with the synthetic truth for {agree:.1%}")
    report = perturb_store(store_path, "Ccnd1=+20", 8, out_dir=out)
    typer.echo(
        f"  perturbation Ccnd1=+20: generated nucleus area "
        f"{report['nucleus_area_before_mean_px']:.0f} -> "
        f"{report['nucleus_area_after_mean_px']:.0f} px, larger in "
        f"{100 * report['nucleus_area_increased']:.0f}% of cells; panel: {report['png']}"
    )


def echo_spatia(result: dict) -> None:
    typer.echo(
        f"SPATIA: {result['cells']} cells embedded in {result['blocks']} blocks -> "
        f"{result['h5ad']}; niche embeddings ({'x'.join(map(str, result['niches']))} niches) "
        f"in {result['store']}/spatia_niche"
    )


@app.command()
def perturb(
    store_path: GeneratedStore,
    genes: Annotated[
        str, typer.Option(help="Changes GENE=VALUE, GENE=xF or GENE=+N, comma-separated.")
    ] = "Ccnd1=+20",
    cells: Annotated[int, typer.Option(help="Random cells of the central block.")] = 8,
    cell_id: Annotated[
        list[str] | None,
        typer.Option(
            help="Specific cells (repeatable) instead: the input's cell labels, or ids, as "
            "the SPATIA .h5ad's obs_names give them."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Cell choice and generation noise.")] = 0,
    checkpoint: ModelCheckpoint = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNG and JSON.")] = None,
) -> None:
    """Change named genes of chosen cells, generate each cell before and after (SPATIA's
    generator, same noise), report the morphology change and write a PNG panel."""
    from tera_pipeline.analysis.perturb import perturb_store

    with refusing():
        report = perturb_store(store_path, genes, cells, cell_id or (), checkpoint, seed, out)
    typer.echo(
        f"{', '.join(report['changes'])} on {report['cells_changed']} cells: nucleus area "
        f"{report['nucleus_area_before_mean_px']:.1f} -> "
        f"{report['nucleus_area_after_mean_px']:.1f} px (mean), increased in "
        f"{100 * report['nucleus_area_increased']:.0f}% of cells"
    )
    typer.echo(f"panel: {report['png']}  report: {report['json']}")
