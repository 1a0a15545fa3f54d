"""Modality dropout: in training, clips lose whole modalities, as if the data were absent."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def drop_modalities(present: Mapping[str, Tensor], rates: Mapping[str, float],
                    generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Returns the presence masks after dropping each present modality of each clip at its rate.

    A dropped modality takes the same path as a truly absent one (the branch's learned
    missing-modality embedding, the fusion's missing token, no auxiliary loss). A clip never
    loses all of its modalities: when every modality it has was drawn for dropping, one of them,
    chosen uniformly, is kept. With one rate p for all M modalities of a clip, a modality is
    therefore dropped with probability ``p - p**M / M`` (0.0997 for p = 0.1, M = 3).

    Args:
        present: modality -> bool ``[B]``, the clips that have the modality.
        rates: modality -> drop probability in [0, 1) (missing modalities: 0).
        generator: random generator (default: torch's global one).
    """
    names = list(present)
    mask = torch.stack([present[m].to(torch.bool) for m in names], dim=1)  # [B, M]
    p = torch.tensor([float(rates.get(m, 0.0)) for m in names], device=mask.device)
    draw = torch.rand(mask.shape, generator=generator, device=mask.device)
    drop = (draw < p) & mask
    lost = mask.any(dim=1) & ~(mask & ~drop).any(dim=1)
    # the modality a clip that lost everything keeps, uniformly among those it has (drawn for
    # every clip, so the random stream does not depend on the draw above)
    score = torch.rand(mask.shape, generator=generator, device=mask.device)
    keep = torch.nn.functional.one_hot(score.masked_fill(~mask, -1.0).argmax(dim=1),
                                       len(names)).to(torch.bool)
    kept = mask & (~drop | (keep & lost[:, None]))
    return {m: kept[:, i] for i, m in enumerate(names)}
