"""Training objective of the EMI model: MSE + batch Pearson + auxiliary branches + VAD prior."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emimimic.contract import EMIOutput
from emimimic.training.correlation import ccc, pearson


def _authors_aux_weights() -> dict[str, float]:
    return {"visual": 0.2, "audio": 0.35, "text": 0.45}


@dataclass
class LossOptions:
    """The training objective's weights (``model.loss.*`` in the configs); the authors' values.

    Attributes:
        lambda_mse: weight of the MSE term (0: off; MimicMetrics' CCC + MSE uses 0.3).
        lambda_ccc: weight of the batch concordance loss ``1 - mean CCC`` (0: off, the default;
            MimicMetrics uses 0.7).
        lambda_corr: weight of the batch Pearson loss after warm-up (0: off).
        corr_warmup_epochs: epochs of linear warm-up of the Pearson weight (0: none).
        lambda_aux: weight of the auxiliary branch losses (0: off).
        aux_weights: per-modality weights inside the auxiliary loss; must cover every branch.
        lambda_vad: weight of the VAD latent prior (0: off).
    """

    lambda_mse: float = 1.0
    lambda_ccc: float = 0.0
    lambda_corr: float = 0.1
    corr_warmup_epochs: int = 8
    lambda_aux: float = 0.03
    aux_weights: dict[str, float] = field(default_factory=_authors_aux_weights)
    lambda_vad: float = 0.01


def pearson_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Returns ``1 - mean_k r_k``, the batch Pearson loss over the ``K`` target columns.

    Computed in float32 whatever the input dtype, by :func:`~emimimic.training.correlation.pearson`
    (the one definition): a column whose prediction or target is constant in the batch
    contributes ``r = 0``; a batch of fewer than two rows has no correlation and gives a zero
    loss that stays connected to ``pred``. ``weight`` ``[B]`` weighs the clips.
    """
    if pred.shape[0] < 2:
        return pred.float().sum() * 0.0
    return 1.0 - pearson(pred, target, weight).mean()


def ccc_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """Returns ``1 - mean_k CCC_k``, the batch concordance loss (see :func:`pearson_loss`)."""
    if pred.shape[0] < 2:
        return pred.float().sum() * 0.0
    return 1.0 - ccc(pred, target, weight).mean()


def _weighted_mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """Returns the mean of per-clip ``values`` ``[B]``, weighted by ``weight`` ``[B]`` if given."""
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype)
    return (w * values).sum() / w.sum()


class EMILoss(nn.Module):
    """Weighted sum of the training terms, returned term by term.

    ``loss = lambda_mse * MSE(pred, y) + lambda_ccc * (1 - mean_k CCC_k)
    + w_corr(epoch) * (1 - mean_k r_k) + lambda_aux * sum_m w_m * SmoothL1(aux_m, y | m present)
    + lambda_vad * mean((vad - 0.5)^2 | audio present)``, with ``w_corr(epoch) = lambda_corr *
    min(1, (epoch + 1) / corr_warmup_epochs)`` (full weight from the start when
    ``corr_warmup_epochs == 0``). A lambda of 0 removes its term from ``loss`` (MSE only = the
    paper's concat baseline); the unweighted terms are still reported.

    With per-clip sample weights every term is the weighted mean over clips (the batch Pearson
    and CCC use weighted moments), so integer weights equal repeating the clips. The auxiliary
    term of a branch covers the clips that have its modality, the VAD prior those with audio
    (presence as the network used it: a modality dropped in training counts as absent).

    Args:
        options: the weights (default: the authors').
    """

    def __init__(self, options: LossOptions | None = None) -> None:
        super().__init__()
        opts = options or LossOptions()
        weights = (opts.lambda_mse, opts.lambda_ccc, opts.lambda_corr, opts.lambda_aux,
                   opts.lambda_vad)
        if min(weights) < 0 or opts.corr_warmup_epochs < 0:
            raise ValueError(f"loss weights and corr_warmup_epochs must be >= 0, got {opts}")
        self.lambda_mse = float(opts.lambda_mse)
        self.lambda_ccc = float(opts.lambda_ccc)
        self.lambda_corr = float(opts.lambda_corr)
        self.corr_warmup_epochs = int(opts.corr_warmup_epochs)
        self.lambda_aux = float(opts.lambda_aux)
        self.aux_weights = dict(opts.aux_weights)
        self.lambda_vad = float(opts.lambda_vad)

    def corr_weight(self, epoch: int) -> float:
        """Returns the Pearson-term weight at ``epoch`` (0-based) after the linear warm-up."""
        if self.corr_warmup_epochs == 0:
            return self.lambda_corr
        return self.lambda_corr * min(1.0, (epoch + 1) / self.corr_warmup_epochs)

    def forward(
        self,
        out: EMIOutput,
        target: Tensor,
        present: Mapping[str, Tensor] | None = None,
        epoch: int = 0,
        weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Returns the loss terms for a batch.

        Args:
            out: Network output.
            target: Targets ``[B, K]``.
            present: Modality -> bool ``[B]``, used where ``out.present`` is None; ``None`` =
                every clip has every modality.
            epoch: Current epoch (0-based), for the Pearson warm-up.
            weight: Per-clip sample weights ``[B]`` (None: all 1).

        Returns:
            Dict of scalar tensors: ``"loss"`` (weighted total), ``"mse"``, ``"ccc"``
            (``1 - mean CCC``), ``"pearson"`` (``1 - mean r``), ``"aux"``
            (``sum_m w_m * aux/<m>``), ``"aux/<m>"`` (masked SmoothL1 of branch m) and
            ``"vad_prior"``.
        """
        pred = out.pred.float()
        target = target.float()
        if pred.shape != target.shape:
            raise ValueError(
                f"EMILoss: prediction shape {tuple(pred.shape)} does not match target shape "
                f"{tuple(target.shape)}"
            )
        if weight is not None:
            weight = weight.to(device=pred.device, dtype=torch.float32)
            if weight.shape != (pred.shape[0],):
                raise ValueError(f"EMILoss: sample weights of shape {tuple(weight.shape)}, "
                                 f"expected [{pred.shape[0]}]")
        present = out.present if out.present is not None else present
        terms: dict[str, Tensor] = {
            "mse": _weighted_mean(((pred - target) ** 2).mean(dim=1), weight),
            "ccc": ccc_loss(pred, target, weight),
            "pearson": pearson_loss(pred, target, weight),
        }
        aux_total = pred.new_zeros(())
        for m, aux in out.aux.items():
            if m not in self.aux_weights:
                raise ValueError(
                    f"EMILoss: no auxiliary weight for branch {m!r}; aux_weights has "
                    f"{sorted(self.aux_weights)}"
                )
            mask = self._mask(present, m, aux)
            aux = aux.float()
            per_clip = F.smooth_l1_loss(aux, target, reduction="none").mean(dim=1)
            terms[f"aux/{m}"] = self._masked_mean(per_clip, mask, weight, aux)
            aux_total = aux_total + self.aux_weights[m] * terms[f"aux/{m}"]
        terms["aux"] = aux_total
        if out.vad is None:
            terms["vad_prior"] = pred.new_zeros(())
        else:
            vad = out.vad.float()
            per_clip = ((vad - 0.5) ** 2).mean(dim=1)
            terms["vad_prior"] = self._masked_mean(per_clip, self._mask(present, "audio", vad),
                                                   weight, vad)

        loss = pred.new_zeros(())
        # Skip zero-weighted terms rather than multiply by 0, so a NaN there cannot leak in.
        for name, lam in (("mse", self.lambda_mse), ("ccc", self.lambda_ccc),
                          ("pearson", self.corr_weight(epoch)), ("aux", self.lambda_aux),
                          ("vad_prior", self.lambda_vad)):
            if lam > 0:
                loss = loss + lam * terms[name]
        return {"loss": loss, **terms}

    @staticmethod
    def _masked_mean(values: Tensor, mask: Tensor, weight: Tensor | None, like: Tensor) -> Tensor:
        """Returns the (weighted) mean of ``values`` over the clips in ``mask``.

        With no clip in the mask the term is zero but connected to ``like``, so DDP sees a
        gradient for every parameter.
        """
        if not mask.any():
            return like.sum() * 0.0
        return _weighted_mean(values[mask], None if weight is None else weight[mask])

    @staticmethod
    def _mask(present: Mapping[str, Tensor] | None, modality: str, like: Tensor) -> Tensor:
        """Returns the bool ``[B]`` presence mask of ``modality`` (all True when unknown)."""
        if present is None or modality not in present:
            return torch.ones(like.shape[0], dtype=torch.bool, device=like.device)
        mask = present[modality].to(device=like.device, dtype=torch.bool)
        if mask.shape != (like.shape[0],):
            raise ValueError(
                f"EMILoss: presence mask of {modality!r} has shape {tuple(mask.shape)}, "
                f"expected [{like.shape[0]}]"
            )
        return mask
