"""Running block tasks on Dask: cluster recipes, the one BlockTask runner with retries, per-worker
model caches, progress.
"""
