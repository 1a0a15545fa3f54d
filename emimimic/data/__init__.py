"""Data: the feature store, pooling, batch types, the DataModule, pack and synth.

Build stores with :func:`emimimic.data.pack.pack` and :func:`emimimic.data.synth.synth` (the
submodules keep those names, so they are not re-exported here).
"""

from emimimic.data.batches import BatchPlan, FeatureBatch
from emimimic.data.datamodule import EMIDataModule
from emimimic.data.dataset import FeatureDataset
from emimimic.data.samplers import EvalShardSampler
from emimimic.data.store import FeatureStore, SplitView, StoreError
from emimimic.pooling import expand_rows, pool_reference, windows

__all__ = [
    "BatchPlan",
    "EMIDataModule",
    "EvalShardSampler",
    "FeatureBatch",
    "FeatureDataset",
    "FeatureStore",
    "SplitView",
    "StoreError",
    "expand_rows",
    "pool_reference",
    "windows",
]
