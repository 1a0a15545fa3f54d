"""The fusion contract: every fusion takes the branches' outputs and gives the head's input."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn


@dataclass
class FusionInput:
    """What the network hands a fusion for a batch.

    Attributes:
        embeddings: modality -> branch embedding ``[B, H]`` (the branch's learned
            missing-modality embedding where the clip lacks the modality).
        present: modality -> bool ``[B]``, the clips that have the modality (after modality
            dropout: a dropped modality is absent).
        steps: modality -> the branch's projected steps ``[B, 128, H]`` (rows of absent clips
            carry no meaning), only for fusions with ``needs_steps``; else None.
    """

    embeddings: dict[str, Tensor]
    present: dict[str, Tensor]
    steps: dict[str, Tensor] | None = None


@dataclass
class FusionOutput:
    """What a fusion gives the shared head.

    Attributes:
        fused: ``[B, F]`` (one input for all targets) or ``[B, K, F]`` (one per target, the
            head's output k taken from input k).
        weights: modality -> ``[B, K]`` weights the fusion gave each modality, or None.
    """

    fused: Tensor
    weights: dict[str, Tensor] | None = None


class Fusion(nn.Module):
    """Base class of fusions.

    Subclasses are built as ``Cls(modalities, hidden, num_targets, dropout, **own_options)``, set
    :attr:`out_dim` (F), and implement ``forward(FusionInput) -> FusionOutput``.

    Args:
        modalities: the network's modalities, in fusion order.
        hidden: width H of the branch embeddings and steps.
        num_targets: number of targets K.
        dropout: the network's dropout probability.
    """

    #: Whether :meth:`forward` needs the branches' projected steps (``FusionInput.steps``); a
    #: fusion that does keeps the branches off their fastest path (see the README).
    needs_steps: ClassVar[bool] = False

    def __init__(self, modalities: Sequence[str], hidden: int, num_targets: int,
                 dropout: float) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.hidden = hidden
        self.num_targets = num_targets
        self.out_dim = hidden

    def forward(self, inputs: FusionInput) -> FusionOutput:  # pragma: no cover - abstract
        """Returns the head's input for a batch."""
        raise NotImplementedError
