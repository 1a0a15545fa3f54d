"""Training objective of the EMI model: MSE + batch Pearson + auxiliary branches + VAD prior."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emimimic.models.network import EMIOutput


def _authors_aux_weights() -> dict[str, float]:
    return {"visual": 0.2, "audio": 0.35, "text": 0.45}


@dataclass
class LossOptions:
    """The training objective's weights (``model.loss.*`` in the configs); the authors' values.

    Attributes:
        lambda_corr: weight of the batch Pearson loss after warm-up (0: off).
        corr_warmup_epochs: epochs of linear warm-up of the Pearson weight (0: none).
        lambda_aux: weight of the auxiliary branch losses (0: off).
        aux_weights: per-modality weights inside the auxiliary loss; must cover every branch.
        lambda_vad: weight of the VAD latent prior (0: off).
    """

    lambda_corr: float = 0.1
    corr_warmup_epochs: int = 8
    lambda_aux: float = 0.03
    aux_weights: dict[str, float] = field(default_factory=_authors_aux_weights)
    lambda_vad: float = 0.01


def pearson_loss(pred: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Returns ``1 - mean_k r_k``, the batch Pearson loss over the ``K`` target columns.

    Computed in float32 whatever the input dtype. A column whose prediction or target is constant
    in the batch contributes ``r = 0`` (``eps`` keeps the denominator and its gradient finite).
    A batch of fewer than two rows has no correlation: the loss is a zero tensor that stays
    connected to ``pred`` (so every parameter still gets a, zero, gradient).

    Args:
        pred: Predictions ``[B, K]`` (or ``[B]``).
        target: Targets of the same shape.
        eps: Added to the product of the column variances under the square root.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"pearson_loss: pred and target shapes differ: {tuple(pred.shape)} vs "
            f"{tuple(target.shape)}"
        )
    p = pred.float()
    t = target.float()
    if p.ndim == 1:
        p, t = p.unsqueeze(1), t.unsqueeze(1)
    if p.shape[0] < 2:
        return p.sum() * 0.0
    pc = p - p.mean(dim=0)
    tc = t - t.mean(dim=0)
    cov = (pc * tc).sum(dim=0)
    var_p = (pc * pc).sum(dim=0)
    var_t = (tc * tc).sum(dim=0)
    r = cov / torch.sqrt(var_p * var_t + eps)
    return 1.0 - r.mean()


class EMILoss(nn.Module):
    """Weighted sum of the paper's training terms, returned term by term.

    ``loss = MSE(pred, y) + w_corr(epoch) * (1 - mean_k r_k) + lambda_aux * sum_m w_m *
    SmoothL1(aux_m, y | m present) + lambda_vad * mean((vad - 0.5)^2 | audio present)``, with
    ``w_corr(epoch) = lambda_corr * min(1, (epoch + 1) / corr_warmup_epochs)`` (full weight from
    the start when ``corr_warmup_epochs == 0``). A lambda of 0 removes its term from ``loss``
    (MSE only = the paper's concat baseline); the unweighted terms are still reported.
    The VAD prior covers only clips with audio: an absent clip's VAD comes from zero rows.

    Args:
        options: the weights (default: the authors').
    """

    def __init__(self, options: LossOptions | None = None) -> None:
        super().__init__()
        opts = options or LossOptions()
        if min(opts.lambda_corr, opts.lambda_aux, opts.lambda_vad) < 0 or (
                opts.corr_warmup_epochs < 0):
            raise ValueError(f"loss weights and corr_warmup_epochs must be >= 0, got {opts}")
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
    ) -> dict[str, Tensor]:
        """Returns the loss terms for a batch.

        Args:
            out: Network output.
            target: Targets ``[B, K]``.
            present: Modality -> bool ``[B]``; ``None`` = every clip has every modality.
            epoch: Current epoch (0-based), for the Pearson warm-up.

        Returns:
            Dict of scalar tensors: ``"loss"`` (weighted total), ``"mse"``, ``"pearson"``
            (``1 - mean r``), ``"aux"`` (``sum_m w_m * aux/<m>``), ``"aux/<m>"`` (masked
            SmoothL1 of branch m) and ``"vad_prior"``.
        """
        pred = out.pred.float()
        target = target.float()
        if pred.shape != target.shape:
            raise ValueError(
                f"EMILoss: prediction shape {tuple(pred.shape)} does not match target shape "
                f"{tuple(target.shape)}"
            )
        terms: dict[str, Tensor] = {
            "mse": F.mse_loss(pred, target),
            "pearson": pearson_loss(pred, target),
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
            if mask.any():
                term = F.smooth_l1_loss(aux[mask], target[mask])
            else:
                # Zero but connected to the branch, so DDP sees a gradient for every parameter.
                term = aux.sum() * 0.0
            terms[f"aux/{m}"] = term
            aux_total = aux_total + self.aux_weights[m] * term
        terms["aux"] = aux_total
        if out.vad is None:
            terms["vad_prior"] = pred.new_zeros(())
        else:
            vad = out.vad.float()
            mask = self._mask(present, "audio", vad)
            terms["vad_prior"] = ((vad[mask] - 0.5) ** 2).mean() if mask.any() else vad.sum() * 0.0

        loss = terms["mse"]
        w_corr = self.corr_weight(epoch)
        # Skip zero-weighted terms rather than multiply by 0, so a NaN there cannot leak in.
        if w_corr > 0:
            loss = loss + w_corr * terms["pearson"]
        if self.lambda_aux > 0:
            loss = loss + self.lambda_aux * terms["aux"]
        if self.lambda_vad > 0:
            loss = loss + self.lambda_vad * terms["vad_prior"]
        return {"loss": loss, **terms}

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
