"""``average``: the mean of the branch embeddings (the paper's ablation), ``[B, H]``."""

from __future__ import annotations

import torch

from emimimic.models.fusion.base import Fusion, FusionInput, FusionOutput


class AverageFusion(Fusion):
    """Averages the branch embeddings (absent ones count with their learned embedding)."""

    def forward(self, inputs: FusionInput) -> FusionOutput:
        """Returns ``[B, H]``."""
        stacked = torch.stack([inputs.embeddings[m] for m in self.modalities])
        return FusionOutput(stacked.mean(dim=0))


FUSION = AverageFusion
