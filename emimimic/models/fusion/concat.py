"""``concat``: the branch embeddings side by side (the paper's choice), ``[B, H * M]``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emimimic.models.fusion.base import Fusion, FusionInput, FusionOutput


class ConcatFusion(Fusion):
    """Concatenates the branch embeddings in the network's modality order."""

    def __init__(self, modalities: Sequence[str], hidden: int, num_targets: int,
                 dropout: float) -> None:
        super().__init__(modalities, hidden, num_targets, dropout)
        self.out_dim = hidden * len(self.modalities)

    def forward(self, inputs: FusionInput) -> FusionOutput:
        """Returns ``[B, H * M]``."""
        return FusionOutput(torch.cat([inputs.embeddings[m] for m in self.modalities], dim=-1))


FUSION = ConcatFusion
