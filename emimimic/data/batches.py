"""The two batch types: what the DataLoader yields, and what the model consumes.

A batch is built in two steps:

1. The DataLoader (in its workers, if any) yields a :class:`BatchPlan`: which clips, and what is
   known about them without reading features (small numpy arrays, a few bytes per clip). Making
   it, the dataset asks the kernel to bring the clips' bytes into the page cache, so workers run
   ahead of the reads when the store does not fit in RAM.
2. In the main process, ``FeatureDataset.read`` (Lightning's ``on_before_batch_transfer``) reads
   the plan's stored rows into a :class:`FeatureBatch`, the model's input. Lightning moves it to
   the device as it is (a dataclass of tensors).

A clip's rows are stored compactly (:mod:`emimimic.data.pooling`): its T raw rows when T <= 128,
else its 128 pooled rows. The model works on these rows directly; :meth:`FeatureBatch.dense`
gives the ``[B, 128, D]`` pooled sequence for code that wants it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities import move_data_to_device
from torch import Tensor

from emimimic.data.pooling import Windows, expand_rows, windows


@dataclass
class BatchPlan:
    """Which clips a batch holds: what the DataLoader yields (no feature bytes).

    Attributes:
        split: the split the indices refer to.
        indices: int64 [B], clip positions in the split.
        lengths: modality -> int64 [B] stored rows per clip (0: absent).
        target: float32 [B, K] labels, or None for an unlabelled split.
        ids: the B clip ids.
    """

    split: str
    indices: np.ndarray
    lengths: dict[str, np.ndarray]
    target: np.ndarray | None
    ids: list[str]


@dataclass
class FeatureBatch:
    """A batch of clips as the model consumes it: each modality's stored rows back to back.

    Attributes:
        rows: modality -> float16 [R_m, D_m], the clips' stored rows back to back (0 rows for an
            absent clip, 128 pooled rows for a clip with T > 128, its T raw rows otherwise).
        lengths: modality -> int64 [B] stored rows per clip, summing to R_m.
        target: float32 [B, K] labels, or None for an unlabelled split.
        ids: the B clip ids.
        windows: modality -> the distinct pooling windows of its clips
            (:func:`emimimic.data.pooling.windows`). For a GPU the loader computes them on the
            host, where the lengths are, so the device never waits on index arithmetic; None
            computes them when first asked for (on the CPU).
    """

    rows: dict[str, Tensor]
    lengths: dict[str, Tensor]
    target: Tensor | None
    ids: list[str]
    windows: dict[str, Windows] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def modalities(self) -> list[str]:
        """Returns the modalities the batch holds, in its order."""
        return list(self.rows)

    def present(self, m: str) -> Tensor:
        """Returns bool [B]: True where the clip has data for modality ``m``."""
        return self.lengths[m] > 0

    def window(self, m: str) -> Windows:
        """Returns the distinct pooling windows of modality ``m`` (computed once if not given)."""
        if self.windows is None:
            self.windows = {}
        if m not in self.windows:
            self.windows[m] = windows(self.lengths[m])
        return self.windows[m]

    def dense(self, m: str) -> Tensor:
        """Returns modality ``m`` pooled to float16 [B, 128, D] (zeros for absent clips)."""
        return expand_rows(self.rows[m], self.lengths[m])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FeatureBatch:
        """Returns the batch with its tensors on ``device`` (Lightning's transfer calls this)."""
        device = torch.device(device)

        def move(x: Any) -> Any:
            return move_data_to_device(x, device)

        return FeatureBatch(rows=move(self.rows), lengths=move(self.lengths),
                            target=None if self.target is None else move(self.target),
                            ids=list(self.ids),
                            windows=None if self.windows is None else move(self.windows))
