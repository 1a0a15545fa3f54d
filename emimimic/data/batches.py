"""The two batch types: what the DataLoader yields, and what the model consumes.

A batch is built in two steps:

1. The DataLoader (in its workers, if any) yields a :class:`BatchPlan`: which clips, and what is
   known about them without reading features (small numpy arrays, a few bytes per clip). Making
   it, the dataset asks the kernel to bring the clips' bytes into the page cache, so workers run
   ahead of the reads when the store does not fit in RAM.
2. In the main process, ``FeatureDataset.read`` (Lightning's ``on_before_batch_transfer``) reads
   the plan's stored rows into a :class:`FeatureBatch`, the model's input. Lightning moves it to
   the device as it is (a dataclass of tensors).

A clip's rows are stored compactly (:mod:`emimimic.pooling`): its T raw rows when T <= 128,
else its 128 pooled rows. The model works on these rows directly; :meth:`FeatureBatch.dense`
gives the ``[B, 128, D]`` pooled sequence for code that wants it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emimimic.contract import FeatureBatch


@dataclass
class BatchPlan:
    """Which clips a batch holds: what the DataLoader yields (no feature bytes).

    Attributes:
        split: the split the indices refer to.
        indices: int64 [B], clip positions in the split.
        lengths: modality -> int64 [B] stored rows per clip (0: absent).
        target: float32 [B, K] labels, or None for an unlabelled split.
        ids: the B clip ids.
        weight: float32 [B] sample weights, or None when the store (or the data module) has none.
    """

    split: str
    indices: np.ndarray
    lengths: dict[str, np.ndarray]
    target: np.ndarray | None
    ids: list[str]
    weight: np.ndarray | None = None


__all__ = ["BatchPlan", "FeatureBatch"]
