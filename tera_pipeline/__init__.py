"""The library: inputs -> generation -> storage, run on Dask, evaluated and analysed (flows/
orchestrates it; models/ holds the networks).
"""
