"""The multimodal EMI network: per-modality branches, a fusion and the shared regression head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, get_args

import torch
from torch import Tensor, nn

from emimimic.constants import EMOTIONS, MODALITIES
from emimimic.contract import EMIOutput, FeatureBatch
from emimimic.errors import ConfigError
from emimimic.models.branches import (
    AudioVADBranch,
    BranchOutput,
    ModalityBranch,
    Pooling,
    regression_head,
)
from emimimic.models.dropout import drop_modalities
from emimimic.models.fusion import FusionInput, build_fusion


class EMINetwork(nn.Module):
    """The paper's multimodal EMI regressor, and the parts that other teams won with.

    One branch per modality in ``dims`` (in the fixed :data:`~emimimic.constants.MODALITIES`
    order): projector, optional temporal block, pooling over time, embedding and auxiliary
    regressor, and for audio the VAD-aware pathway. A fusion (:mod:`emimimic.models.fusion`)
    turns the branches' outputs into the input of the shared head
    LayerNorm -> Linear(F, hidden) -> GELU -> Dropout -> Linear(hidden, K) -> Sigmoid. A plain
    ``nn.Module`` that follows :mod:`emimimic.contract`; usable without Lightning.

    Args:
        dims: feature dimension per modality; its keys choose the modalities (any non-empty
            subset of ``MODALITIES``).
        targets: the target names; their number K is the output width.
        fusion: ``concat`` (the paper's choice), ``average``, ``gated`` (per-clip, per-target
            weights over the modalities, returned in ``EMIOutput.weights``), ``text_query``
            (text steps attend to the other modalities' steps), or a class path of your own
            :class:`~emimimic.models.fusion.Fusion`.
        fusion_args: the fusion's own options, e.g. ``{heads: 8}`` for ``text_query``.
        pooling: ``mean`` (the authors' final run), ``attention`` or ``lstm`` (two-layer LSTM,
            last state) over each modality's 128 steps.
        temporal: add the Conv1d + BiGRU temporal enhancement to every branch (the ablation row
            that hurts).
        vad: give the audio branch the VAD-aware latent pathway (needs audio).
        hidden: width of branches, embeddings and head.
        dropout: dropout probability everywhere.
        modality_dropout: in training, the probability that a clip loses a modality (one rate
            for all, or modality -> rate), through the same learned-missing path as absent data;
            a clip never loses all its modalities (see
            :func:`~emimimic.models.dropout.drop_modalities`).
        compile_windows: on the CPU, gather each branch's windows and compute their LayerNorm
            statistics in one ``torch.compile``-d kernel (the same results to float32
            rounding; about 1.2x the clips per second end to end on two cores, training and
            evaluation, and 2.2x for the model's evaluation under bf16-mixed; the first batch
            compiles, tens of seconds, cached on disk after). Needs the
            C++ compiler torch's Inductor uses; without one it warns and runs eagerly.

    Raises:
        ConfigError: an unknown modality, fusion or pooling, ``vad`` without audio, a rate
            outside [0, 1).
    """

    def __init__(self, dims: Mapping[str, int], targets: Sequence[str] = EMOTIONS,
                 fusion: str = "concat", fusion_args: dict[str, Any] | None = None,
                 pooling: Pooling = "mean", temporal: bool = False, vad: bool = True,
                 hidden: int = 256, dropout: float = 0.2,
                 modality_dropout: float | dict[str, float] = 0.0,
                 compile_windows: bool = False) -> None:
        super().__init__()
        unknown = sorted(set(dims) - set(MODALITIES))
        if unknown or not dims:
            raise ConfigError(f"dims must map a non-empty subset of {MODALITIES} to feature "
                              f"sizes, got keys {sorted(dims)}")
        if pooling not in get_args(Pooling):
            raise ConfigError(f"pooling must be one of {get_args(Pooling)}, got {pooling!r}")
        if vad and "audio" not in dims:
            raise ConfigError(f"vad=True needs the 'audio' modality, but dims has only "
                              f"{sorted(dims)}; set vad=False or serve audio features")
        if not targets:
            raise ConfigError("the network needs at least one target")
        self.modalities: tuple[str, ...] = tuple(m for m in MODALITIES if m in dims)
        self.targets = list(targets)
        self.num_targets = len(self.targets)
        self.dropout_rates = self._rates(modality_dropout)
        self.branches = nn.ModuleDict()
        for m in self.modalities:
            branch_cls = AudioVADBranch if (vad and m == "audio") else ModalityBranch
            self.branches[m] = branch_cls(int(dims[m]), self.num_targets, hidden=hidden,
                                          pooling=pooling, temporal=temporal, dropout=dropout,
                                          compile_windows=compile_windows)
        self.fusion = build_fusion(fusion, list(self.modalities), hidden, self.num_targets,
                                   dropout, fusion_args)
        self.head = regression_head(self.fusion.out_dim, hidden, self.num_targets, dropout)

    def _rates(self, rates: float | Mapping[str, float]) -> dict[str, float]:
        given = (dict.fromkeys(self.modalities, float(rates))
                 if isinstance(rates, int | float) else {m: float(p) for m, p in rates.items()})
        unknown = sorted(set(given) - set(self.modalities))
        bad = {m: p for m, p in given.items() if not 0.0 <= p < 1.0}
        if unknown or bad:
            raise ConfigError(f"modality_dropout: rates must be in [0, 1) for modalities of "
                              f"{list(self.modalities)}, got {given}")
        return {m: p for m, p in given.items() if p > 0}

    def forward(self, batch: FeatureBatch) -> EMIOutput:
        """Predicts the targets for a batch of stored rows (what the DataModule serves)."""
        self._check(batch.rows)
        present = self._present({m: batch.present(m) for m in self.modalities})
        keep = self.fusion.needs_steps
        outputs = {}
        for m in self.modalities:
            try:
                outputs[m] = self.branches[m](batch.rows[m], batch.window(m), present[m], keep)
            except ValueError as err:
                raise ValueError(f"modality {m!r}: {err}") from err
        return self._fuse(outputs, present)

    def forward_dense(self, features: Mapping[str, Tensor],
                      present: Mapping[str, Tensor] | None = None) -> EMIOutput:
        """Predicts the targets from sequences ``[B, T, D_m]`` per modality.

        Args:
            features: Modality -> ``[B, T, D_m]`` (any float dtype); must hold every modality.
            present: Modality -> bool ``[B]`` (False = the clip has no data for that modality);
                ``None`` means every clip has every modality.
        """
        self._check(features)
        if present is None:
            batch = next(iter(features.values())).shape[0]
            present = {m: torch.ones(batch, dtype=torch.bool, device=features[m].device)
                       for m in self.modalities}
        lacking = [m for m in self.modalities if m not in present]
        if lacking:
            raise ValueError(f"present lacks modalities {lacking}; pass a mask for each of "
                             f"{list(self.modalities)} or present=None")
        present = self._present({m: present[m] for m in self.modalities})
        keep = self.fusion.needs_steps
        outputs = {}
        for m in self.modalities:
            try:
                outputs[m] = self.branches[m].forward_dense(features[m], present[m], keep)
            except ValueError as err:
                raise ValueError(f"modality {m!r}: {err}") from err
        return self._fuse(outputs, present)

    def _present(self, present: dict[str, Tensor]) -> dict[str, Tensor]:
        """Returns the presence masks the branches use: modality dropout acts in training."""
        if self.training and self.dropout_rates:
            return drop_modalities(present, self.dropout_rates)
        return present

    def _check(self, features: Mapping[str, Tensor]) -> None:
        missing = [m for m in self.modalities if m not in features]
        if missing:
            raise ValueError(
                f"features lack modalities {missing}; the network needs {list(self.modalities)}, "
                f"got {sorted(features)}"
            )

    def _fuse(self, outputs: dict[str, BranchOutput], present: dict[str, Tensor]) -> EMIOutput:
        embeddings = {m: o.embedding for m, o in outputs.items()}
        steps = {m: o.steps for m, o in outputs.items()} if self.fusion.needs_steps else None
        fused = self.fusion(FusionInput(embeddings, present, steps))
        pred = self.head(fused.fused)
        if pred.ndim == 3:  # one head input per target: output k of input k
            pred = pred.diagonal(dim1=1, dim2=2).contiguous()
        return EMIOutput(
            pred=pred,
            aux={m: o.aux for m, o in outputs.items()},
            vad=outputs["audio"].vad if "audio" in outputs else None,
            embeddings=embeddings,
            present=present,
            weights=fused.weights,
        )
