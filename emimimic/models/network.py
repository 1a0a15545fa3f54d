"""The multimodal EMI network: per-modality branches, fusion and the shared regression head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from emimimic.constants import MODALITIES
from emimimic.models.branches import (
    POOLINGS,
    AudioVADBranch,
    ModalityBranch,
    regression_head,
)

#: Allowed values of the ``fusion`` argument.
FUSIONS: tuple[str, ...] = ("concat", "average")


@dataclass
class EMIOutput:
    """What :class:`EMINetwork` returns for a batch.

    Attributes:
        pred: Fused prediction ``[B, K]`` in ``[0, 1]``.
        aux: Per-modality auxiliary predictions ``[B, K]`` in ``[0, 1]``, keyed by modality.
        vad: Latent VAD vector ``[B, 3]`` in ``[0, 1]`` from the audio branch, or ``None``
            when the VAD pathway is off. Rows of clips without audio carry no meaning.
        embeddings: Per-modality branch embeddings ``z_m`` ``[B, hidden]``, keyed by modality.
    """

    pred: Tensor
    aux: dict[str, Tensor]
    vad: Tensor | None
    embeddings: dict[str, Tensor]


class EMINetwork(nn.Module):
    """Multimodal EMI regressor (plain ``nn.Module``, usable without Lightning).

    One branch per modality in ``dims`` (in the fixed :data:`~emimimic.constants.MODALITIES`
    order); branch embeddings are fused by concatenation (``hidden * M``) or averaging
    (``hidden``) and mapped by the shared head LayerNorm -> Linear(in, hidden) -> GELU ->
    Dropout -> Linear(hidden, K) -> Sigmoid.

    Args:
        dims: Feature dimension per modality; its keys choose the modalities (any non-empty
            subset of ``MODALITIES``).
        num_targets: Number of regression targets ``K``.
        fusion: ``"concat"`` or ``"average"``.
        pooling: ``"mean"`` or ``"attention"`` pooling over time, for every branch.
        temporal: Whether every branch gets the Conv1d + BiGRU temporal enhancement.
        vad: Whether the audio branch gets the VAD-aware pathway (needs ``"audio"`` in ``dims``).
        hidden: Width of branches, embeddings and head.
        dropout: Dropout probability used throughout.

    Raises:
        ValueError: On an unknown modality, fusion or pooling, or ``vad=True`` without audio.
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        num_targets: int = 6,
        fusion: str = "concat",
        pooling: str = "mean",
        temporal: bool = False,
        vad: bool = True,
        hidden: int = 256,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown or not dims:
            raise ValueError(
                f"dims must map a non-empty subset of {MODALITIES} to feature sizes, "
                f"got keys {sorted(dims)}"
            )
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if vad and "audio" not in dims:
            raise ValueError(
                f"vad=True needs the 'audio' modality, but dims has only {sorted(dims)}; "
                "set vad=False or serve audio features"
            )
        self.modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in dims)
        self.fusion = fusion
        self.num_targets = num_targets
        self.hidden = hidden
        self.branches = nn.ModuleDict()
        for m in self.modalities:
            branch_cls = AudioVADBranch if (vad and m == "audio") else ModalityBranch
            self.branches[m] = branch_cls(
                int(dims[m]),
                num_targets,
                hidden=hidden,
                pooling=pooling,
                temporal=temporal,
                dropout=dropout,
            )
        fused = hidden * len(self.modalities) if fusion == "concat" else hidden
        self.head = regression_head(fused, hidden, num_targets, dropout)

    def forward(
        self, features: Mapping[str, Tensor], present: Mapping[str, Tensor] | None = None
    ) -> EMIOutput:
        """Predicts the targets for a batch.

        Args:
            features: Modality -> ``[B, T, D_m]`` (float16 from the store, or any float dtype);
                must hold every modality of the network.
            present: Modality -> bool ``[B]`` (False = the clip has no data for that modality);
                ``None`` means every clip has every modality.

        Returns:
            An :class:`EMIOutput` with ``pred`` ``[B, K]``, per-branch ``aux`` and
            ``embeddings``, and ``vad`` (or ``None``).
        """
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(
                f"features lack modalities {missing}; the network needs {list(self.modalities)}, "
                f"got {sorted(features)}"
            )
        if present is not None:
            lacking = [m for m in self.modalities if m not in present]
            if lacking:
                raise ValueError(
                    f"present lacks modalities {lacking}; pass a mask for each of "
                    f"{list(self.modalities)} or present=None"
                )
        outputs = {}
        for m in self.modalities:
            try:
                outputs[m] = self.branches[m](features[m], None if present is None else present[m])
            except ValueError as err:
                raise ValueError(f"modality {m!r}: {err}") from err
        embeddings = {m: o.embedding for m, o in outputs.items()}
        stacked = [embeddings[m] for m in self.modalities]
        fused = (
            torch.cat(stacked, dim=-1)
            if self.fusion == "concat"
            else torch.stack(stacked).mean(dim=0)
        )
        vad = outputs["audio"].vad if "audio" in outputs else None
        return EMIOutput(
            pred=self.head(fused),
            aux={m: o.aux for m, o in outputs.items()},
            vad=vad,
            embeddings=embeddings,
        )
