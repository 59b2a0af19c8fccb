"""The networks and their checkpoints; nothing of storage, Dask or Prefect."""
