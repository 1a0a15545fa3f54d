"""The network contract: what a network is built from, what it gets and what it returns.

Any ``nn.Module`` can be the network that :class:`~emimimic.training.EMIModule` trains, if it

1. is built as ``Network(dims, targets, **options)``: ``dims`` maps each served modality to its
   feature size D (``{"visual": 768, "audio": 1024, "text": 4096}``), ``targets`` lists the
   target names (their number K is the output width); both come from the data module, and the
   options come from the YAML (``model.network.init_args``) as plain values (numbers, strings,
   lists, dicts) so that a checkpoint can rebuild the network from its file alone;
2. takes a :class:`FeatureBatch` and returns an :class:`EMIOutput`.

A YAML names it by class path::

    model:
      network:
        class_path: my_package.MyNetwork
        init_args: {hidden: 128}

This module needs torch only (no Lightning, no data pipeline), so a network and its tests need
nothing else either. The batch's rows are each clip's *stored* rows back to back; ``batch.dense(m)``
gives the ``[B, 128, D]`` pooled sequence a simple network wants, and ``batch.window(m)`` the
distinct pooling windows a fast one projects once each (:mod:`emimimic.pooling`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from emimimic.pooling import Windows, expand_rows, windows


def _move(value: Any, device: torch.device, non_blocking: bool) -> Any:
    """Returns ``value`` with every tensor in it (dicts, dataclasses) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: _move(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, Windows):
        return Windows(**{f.name: _move(getattr(value, f.name), device, non_blocking)
                          for f in fields(value)})
    return value


@dataclass
class FeatureBatch:
    """A batch of clips as a network consumes it: each modality's stored rows back to back.

    Attributes:
        rows: modality -> float16 [R_m, D_m], the clips' stored rows back to back (0 rows for an
            absent clip, 128 pooled rows for a clip with T > 128, its T raw rows otherwise).
        lengths: modality -> int64 [B] stored rows per clip, summing to R_m.
        target: float32 [B, K] labels, or None for an unlabelled split.
        ids: the B clip ids.
        weight: float32 [B] per-clip sample weights for the loss (from the store), or None.
        windows: modality -> the distinct pooling windows of its clips
            (:func:`emimimic.pooling.windows`). For a GPU the loader computes them on the host,
            where the lengths are, so the device never waits on index arithmetic; None computes
            them when first asked for (on the CPU).
    """

    rows: dict[str, Tensor]
    lengths: dict[str, Tensor]
    target: Tensor | None
    ids: list[str]
    weight: Tensor | None = None
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
        return FeatureBatch(**{f.name: _move(getattr(self, f.name), device, non_blocking)
                               for f in fields(self) if f.name != "ids"}, ids=list(self.ids))


@dataclass
class EMIOutput:
    """What a network returns for a batch; only ``pred`` is required.

    Attributes:
        pred: predictions ``[B, K]``, in ``[0, 1]`` for the challenge's targets.
        aux: per-modality auxiliary predictions ``[B, K]`` (trained against the targets on the
            clips that have the modality), keyed by modality; empty for none.
        vad: latent valence/arousal/dominance ``[B, 3]`` of the audio branch, or None; rows of
            clips without audio carry no meaning (the loss masks them).
        embeddings: per-modality branch embeddings ``[B, H]``, keyed by modality.
        present: the presence masks the network used, modality -> bool ``[B]`` (a modality
            dropped in training counts as absent); None means the batch's own.
        weights: how much each modality contributed, modality -> ``[B, K]`` (per clip and
            target, summing to 1 over the modalities a clip has), from fusions that weigh
            them (``gated``); None otherwise.
    """

    pred: Tensor
    aux: dict[str, Tensor]
    vad: Tensor | None = None
    embeddings: dict[str, Tensor] | None = None
    present: dict[str, Tensor] | None = None
    weights: dict[str, Tensor] | None = None


__all__ = ["EMIOutput", "FeatureBatch"]
