"""The feature store: its format (``format``), reader (``reader``) and writer (``writer``)."""

from emimimic.data.store.format import (
    FORMAT_VERSION,
    StoreError,
    check_weights,
    human_bytes,
    normalise_id,
)
from emimimic.data.store.reader import FeatureStore, SplitView
from emimimic.data.store.writer import SplitSpec, StoredClip, StoreWriter, prepare_clip

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "SplitSpec",
    "SplitView",
    "StoreError",
    "StoreWriter",
    "StoredClip",
    "check_weights",
    "human_bytes",
    "normalise_id",
    "prepare_clip",
]
