"""``gated``: per clip and target, softmax weights over the modalities the clip has.

The weights come back with the output (``EMIOutput.weights``), so a plot can show which modality
the model relied on for each clip and target (:func:`emimimic.plots.modality_weights`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from emimimic.models.fusion.base import Fusion, FusionInput, FusionOutput


class GatedFusion(Fusion):
    """Weighs the branch embeddings per clip and target: ``fused_k = sum_m w_km z_m``.

    The gate is LayerNorm -> Linear(H * M, K * M) over all embeddings; its logits of modalities a
    clip lacks (absent, or dropped in training) are masked before the softmax, so their weight is
    exactly 0 and the others sum to 1. A clip that has none of the network's modalities (a silent
    clip of a text-only model) weighs their learned missing embeddings instead. The output is one
    ``[H]`` input per target, ``[B, K, H]``.
    """

    def __init__(self, modalities: Sequence[str], hidden: int, num_targets: int,
                 dropout: float) -> None:
        super().__init__(modalities, hidden, num_targets, dropout)
        width = hidden * len(self.modalities)
        self.gate = nn.Sequential(nn.LayerNorm(width),
                                  nn.Linear(width, num_targets * len(self.modalities)))

    def forward(self, inputs: FusionInput) -> FusionOutput:
        """Returns ``[B, K, H]`` and the weights, modality -> ``[B, K]``."""
        z = torch.stack([inputs.embeddings[m] for m in self.modalities], dim=1)  # [B, M, H]
        batch, count = z.shape[0], len(self.modalities)
        logits = self.gate(z.flatten(1)).view(batch, self.num_targets, count).float()
        present = torch.stack([inputs.present[m].to(device=z.device, dtype=torch.bool)
                               for m in self.modalities], dim=1)
        usable = present | ~present.any(dim=1, keepdim=True)
        weights = torch.softmax(logits.masked_fill(~usable[:, None, :], float("-inf")), dim=-1)
        fused = torch.einsum("bkm,bmh->bkh", weights.to(z.dtype), z)
        return FusionOutput(fused, {m: weights[..., i] for i, m in enumerate(self.modalities)})


FUSION = GatedFusion
