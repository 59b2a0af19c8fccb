"""The output store: array layout and coordinates, TensorStore I/O, the ledger of finished blocks,
the lock, status, ownership.
"""
