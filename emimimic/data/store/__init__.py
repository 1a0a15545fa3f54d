"""The feature store: its format (``format``), reader (``reader``) and writer (``writer``).

The writer (which needs torch to pool) is imported on first use, so reading a store's manifest
needs numpy only.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from emimimic.data.store.format import (
    FORMAT_VERSION,
    StoreError,
    check_weights,
    human_bytes,
    normalise_id,
)
from emimimic.data.store.reader import FeatureStore, SplitView

_WRITER = ("SplitSpec", "StoredClip", "StoreWriter", "prepare_clip")

__all__ = ["FORMAT_VERSION", "FeatureStore", "SplitView", "StoreError", "check_weights",
           "human_bytes", "normalise_id", *_WRITER]


def __getattr__(name: str) -> Any:
    if name in _WRITER:
        return getattr(import_module("emimimic.data.store.writer"), name)
    raise AttributeError(f"module 'emimimic.data.store' has no attribute {name!r}")
