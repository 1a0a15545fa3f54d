"""The multimodal EMI network: per-modality branches, fusion and the shared regression head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from emimimic.constants import MODALITIES
from emimimic.data.batches import FeatureBatch
from emimimic.models.branches import (
    AudioVADBranch,
    BranchOutput,
    ModalityBranch,
    Pooling,
    regression_head,
)


@dataclass
class NetworkOptions:
    """The network's architecture options (``model.network.*`` in the configs).

    Attributes:
        fusion: ``"concat"`` (the paper's choice) or ``"average"`` of the branch embeddings.
        pooling: ``"mean"`` (the authors' final run) or ``"attention"`` pooling over time.
        temporal: add the Conv1d + BiGRU temporal enhancement to every branch (the ablation
            row that hurts).
        vad: give the audio branch the VAD-aware latent pathway (needs audio).
        hidden: width of branches, embeddings and head.
        dropout: dropout probability everywhere.
    """

    fusion: Literal["concat", "average"] = "concat"
    pooling: Pooling = "mean"
    temporal: bool = False
    vad: bool = True
    hidden: int = 256
    dropout: float = 0.2


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
        options: Architecture options (default: the paper's final model).

    Raises:
        ValueError: On an unknown modality, fusion or pooling, or ``vad=True`` without audio.
    """

    def __init__(self, dims: Mapping[str, int], num_targets: int = 6,
                 options: NetworkOptions | None = None) -> None:
        super().__init__()
        opts = options or NetworkOptions()
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown or not dims:
            raise ValueError(
                f"dims must map a non-empty subset of {MODALITIES} to feature sizes, "
                f"got keys {sorted(dims)}"
            )
        if opts.fusion not in ("concat", "average"):
            raise ValueError(f"fusion must be one of ('concat', 'average'), got {opts.fusion!r}")
        if opts.vad and "audio" not in dims:
            raise ValueError(
                f"vad=True needs the 'audio' modality, but dims has only {sorted(dims)}; "
                "set vad=False or serve audio features"
            )
        self.options = opts
        self.modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in dims)
        self.num_targets = num_targets
        self.branches = nn.ModuleDict()
        for m in self.modalities:
            branch_cls = AudioVADBranch if (opts.vad and m == "audio") else ModalityBranch
            self.branches[m] = branch_cls(int(dims[m]), num_targets, hidden=opts.hidden,
                                          pooling=opts.pooling, temporal=opts.temporal,
                                          dropout=opts.dropout)
        fused = opts.hidden * len(self.modalities) if opts.fusion == "concat" else opts.hidden
        self.head = regression_head(fused, opts.hidden, num_targets, opts.dropout)

    def forward(self, batch: FeatureBatch) -> EMIOutput:
        """Predicts the targets for a batch of stored rows (what the DataModule serves)."""
        self._check(batch.rows)
        outputs = {}
        for m in self.modalities:
            try:
                outputs[m] = self.branches[m](batch.rows[m], batch.window(m), batch.present(m))
            except ValueError as err:
                raise ValueError(f"modality {m!r}: {err}") from err
        return self._fuse(outputs)

    def forward_dense(self, features: Mapping[str, Tensor],
                      present: Mapping[str, Tensor] | None = None) -> EMIOutput:
        """Predicts the targets from sequences ``[B, T, D_m]`` per modality.

        Args:
            features: Modality -> ``[B, T, D_m]`` (any float dtype); must hold every modality.
            present: Modality -> bool ``[B]`` (False = the clip has no data for that modality);
                ``None`` means every clip has every modality.
        """
        self._check(features)
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
                mask = None if present is None else present[m]
                outputs[m] = self.branches[m].forward_dense(features[m], mask)
            except ValueError as err:
                raise ValueError(f"modality {m!r}: {err}") from err
        return self._fuse(outputs)

    def _check(self, features: Mapping[str, Tensor]) -> None:
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(
                f"features lack modalities {missing}; the network needs {list(self.modalities)}, "
                f"got {sorted(features)}"
            )

    def _fuse(self, outputs: dict[str, BranchOutput]) -> EMIOutput:
        stacked = [outputs[m].embedding for m in self.modalities]
        if self.options.fusion == "concat":
            fused = torch.cat(stacked, dim=-1)
        else:
            fused = torch.stack(stacked).mean(dim=0)
        return EMIOutput(
            pred=self.head(fused),
            aux={m: o.aux for m, o in outputs.items()},
            vad=outputs["audio"].vad if "audio" in outputs else None,
            embeddings={m: o.embedding for m, o in outputs.items()},
        )
