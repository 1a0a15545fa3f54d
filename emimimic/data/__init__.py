"""Feature store (format, reader, writer), packing, synthetic stores and the DataModule.

Build stores with :func:`emimimic.data.pack.pack` and :func:`emimimic.data.synth.synth` (the
submodules keep those names, so they are not re-exported here).
"""

from emimimic.data.datamodule import (
    EMIDataModule,
    EvalShardSampler,
    FeatureDataset,
    expand_batch,
)
from emimimic.data.store import FeatureStore, SplitView, StoreError, pool_reference

__all__ = [
    "EMIDataModule",
    "EvalShardSampler",
    "FeatureDataset",
    "FeatureStore",
    "SplitView",
    "StoreError",
    "expand_batch",
    "pool_reference",
]
