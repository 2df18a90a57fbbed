"""Serving: mixed-adapter batches over preallocated adapter slots (see ``pool.py``, docs/inference/)."""
from .pool import BASE, AdapterPool, PoolFullError, generate, get_pool, mixed_adapters

__all__ = ["BASE", "AdapterPool", "PoolFullError", "generate", "get_pool", "mixed_adapters"]
