"""Data: the feature store, batch plans, the DataModule, pack and synth.

Build stores with :func:`emimimic.data.pack.pack` and :func:`emimimic.data.synth.synth` (the
submodules keep those names, so they are not re-exported here). Names are imported on first
use, so ``emimimic info`` (the store package) needs neither torch nor Lightning.
"""

from __future__ import annotations

from emimimic.lazy import lazy_names

_LAZY = {
    "BatchPlan": "emimimic.data.batches",
    "FeatureBatch": "emimimic.contract",
    "EMIDataModule": "emimimic.data.datamodule",
    "FeatureDataset": "emimimic.data.dataset",
    "EvalShardSampler": "emimimic.data.samplers",
    "FeatureStore": "emimimic.data.store",
    "SplitView": "emimimic.data.store",
    "StoreError": "emimimic.data.store",
    "expand_rows": "emimimic.pooling",
    "pool_reference": "emimimic.pooling",
    "windows": "emimimic.pooling",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_names(__name__, _LAZY)
