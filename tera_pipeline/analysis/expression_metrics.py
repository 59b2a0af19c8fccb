"""Predicted against true expression per bin: PCC, MSE and MAE at several bin resolutions.

Both sides are (gene, zbin, ybin, xbin) counts, as xarray DataArrays (lazy, dask-backed, for a
store: reductions then run on the Dask cluster) or numpy arrays. Coarser resolutions sum the
counts of 2 x 2 and 4 x 4 bins in-plane. Metrics are taken on log1p counts: PCC per bin across
genes (mean over bins whose truth is not constant), PCC per gene across bins (mean over genes),
MSE and MAE.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

DIMS = ("gene", "zbin", "ybin", "xbin")


def _as_array(a) -> xr.DataArray:
    return a if isinstance(a, xr.DataArray) else xr.DataArray(np.asarray(a), dims=DIMS)


def _pcc(p: xr.DataArray, t: xr.DataArray, dim) -> xr.DataArray:
    pc, tc = p - p.mean(dim), t - t.mean(dim)
    cov = (pc * tc).sum(dim)
    den = np.sqrt((pc**2).sum(dim) * (tc**2).sum(dim))
    return cov / den.where(den > 0)  # NaN, silently, where a side is constant


def expression_metrics(pred, truth, factors: tuple[int, ...] = (1, 2, 4)) -> dict[str, dict]:
    """{"1x1": {pcc_bin, pcc_gene, mse, mae, bins}, "2x2": ..., ...}; a resolution coarser than
    the volume in-plane is left out."""
    pred, truth = _as_array(pred), _as_array(truth)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
    pred = pred.drop_vars(list(pred.coords), errors="ignore")
    truth = truth.drop_vars(list(truth.coords), errors="ignore")
    results = {}
    for f in factors:
        if min(pred.sizes["ybin"], pred.sizes["xbin"]) < f:
            continue  # the volume is smaller than one group of f x f bins
        p, t = pred, truth
        if f > 1:
            window = {"ybin": f, "xbin": f}
            p = p.coarsen(window, boundary="trim").sum()
            t = t.coarsen(window, boundary="trim").sum()
        lp, lt = np.log1p(p.clip(min=0)), np.log1p(t.clip(min=0))
        spatial = ["zbin", "ybin", "xbin"]
        stacked_p = lp.stack(bin=spatial)
        stacked_t = lt.stack(bin=spatial)
        figures = xr.Dataset(
            {
                "pcc_bin": _pcc(stacked_p, stacked_t, "gene").mean(),
                "pcc_gene": _pcc(stacked_p, stacked_t, "bin").mean(),
                "mse": ((lp - lt) ** 2).mean(),
                "mae": abs(lp - lt).mean(),
            }
        ).compute()
        results[f"{f}x{f}"] = {k: float(v) for k, v in figures.items()} | {
            "bins": int(np.prod(p.shape[1:]))
        }
    return results
