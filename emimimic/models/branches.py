"""Per-modality branches of the EMI network: projector, temporal block, pooling, heads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from emimimic.constants import STEPS
from emimimic.models.dropout import Dropout, keep_counts
from emimimic.models.projector import norm_linear, norm_linear_windows
from emimimic.pooling import Windows

#: Pooling over time of every branch: the authors' final run uses the mean; ``lstm`` is the
#: ABAW8 winners' per-modality LSTM.
Pooling = Literal["mean", "attention", "lstm"]


@dataclass
class BranchOutput:
    """What one modality branch returns for a batch.

    Attributes:
        embedding: Branch embedding ``z_m`` ``[B, hidden]``; rows of clips without this modality
            hold the branch's learned missing-modality embedding.
        aux: Auxiliary regressor output ``[B, K]`` in ``[0, 1]``.
        vad: Latent valence/arousal/dominance vector ``[B, 3]`` in ``[0, 1]`` (audio VAD branch
            only, else ``None``); rows of clips without audio are computed from zero rows and carry
            no meaning (the loss masks them).
        steps: the sequence that was pooled, ``[B, 128, H]``, when asked for (``keep_steps``);
            rows of absent clips carry no meaning.
    """

    embedding: Tensor
    aux: Tensor
    vad: Tensor | None = None
    steps: Tensor | None = None


class AttentionPooling(nn.Module):
    """Pools a sequence ``[B, T, H]`` to ``[B, H]`` with learned softmax weights over time."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, 1)

    def weights(self, seq: Tensor) -> Tensor:
        """Returns the attention weights ``[B, T]`` (each row sums to 1)."""
        # Softmax in float32: under fp16 autocast 128 logits can overflow or lose mass.
        return torch.softmax(self.score(seq).squeeze(-1).float(), dim=1)

    def forward(self, seq: Tensor) -> Tensor:
        """Returns the attention-weighted time average ``[B, H]``."""
        weights = self.weights(seq).to(seq.dtype)
        return torch.einsum("bt,bth->bh", weights, seq)


class MeanPooling(nn.Module):
    """Pools a sequence ``[B, T, H]`` to ``[B, H]`` by its time mean."""

    def forward(self, seq: Tensor) -> Tensor:
        """Returns the time mean ``[B, H]``."""
        return seq.mean(dim=1)


class LSTMPooling(nn.Module):
    """Pools a sequence ``[B, T, H]`` to ``[B, H]`` with a two-layer LSTM: its last state.

    The branch's sequences are the 128 pooled steps of every clip, never padded, so the last
    valid state is the top layer's state after step 128 (absent clips get the missing-modality
    embedding later).
    """

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(hidden, hidden, num_layers=2, batch_first=True, dropout=dropout)

    def forward(self, seq: Tensor) -> Tensor:
        """Returns the top layer's hidden state after the last step ``[B, H]``."""
        _, (state, _) = self.lstm(seq)
        return state[-1]


class TemporalEnhancer(nn.Module):
    """Residual Conv1d block followed by a two-layer bidirectional GRU; keeps ``[B, T, H]``."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        if hidden % 2:
            raise ValueError(
                f"temporal enhancement needs an even hidden size (bidirectional GRU with hidden/2 "
                f"per direction), got hidden={hidden}"
            )
        self.conv = nn.Sequential(
            nn.Conv1d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            Dropout(dropout),
            nn.Conv1d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            Dropout(dropout),
        )
        self.norm = nn.LayerNorm(hidden)
        self.gru = nn.GRU(
            hidden,
            hidden // 2,
            num_layers=2,
            batch_first=True,
            bidirectional=True,
            dropout=dropout,
        )

    def forward(self, seq: Tensor) -> Tensor:
        """Returns the enhanced sequence ``[B, T, H]``."""
        conv = self.conv(seq.transpose(1, 2)).transpose(1, 2)
        seq = seq + self.norm(conv)
        out, _ = self.gru(seq)
        return out


def regression_head(in_dim: int, hidden: int, num_targets: int, dropout: float) -> nn.Sequential:
    """Returns LayerNorm -> Linear(in, H) -> GELU -> Dropout -> Linear(H, K) -> Sigmoid.

    The shape of both the shared head and every branch's auxiliary regressor.
    """
    return nn.Sequential(
        nn.LayerNorm(in_dim),
        nn.Linear(in_dim, hidden),
        nn.GELU(),
        Dropout(dropout),
        nn.Linear(hidden, num_targets),
        nn.Sigmoid(),
    )


class ModalityBranch(nn.Module):
    """Encodes one modality's clips into an embedding and an auxiliary prediction.

    Layers (paper §3): projector LayerNorm(D) -> Linear(D, H) -> GELU -> Dropout per time step;
    optional temporal enhancement; mean, attention or LSTM pooling over time; feature layer
    LayerNorm -> Linear(H, H) giving ``z_m``; auxiliary regressor
    LayerNorm -> Linear(H, H) -> GELU -> Dropout -> Linear(H, K) -> Sigmoid on ``z_m``.
    Clips marked absent get a learned missing-modality embedding in place of ``z_m``.

    :meth:`forward` takes a batch's stored rows and projects each distinct pooling window once
    (:mod:`emimimic.pooling`), then gathers the 128 projected steps; :meth:`forward_dense`
    takes ``[B, T, D]`` sequences. Both give the same result for the same clips.

    Args:
        in_dim: Feature dimension ``D`` of the modality.
        num_targets: Number of regression targets ``K``.
        hidden: Width ``H`` of the branch.
        pooling: ``"mean"``, ``"attention"`` or ``"lstm"``.
        temporal: Whether to add the Conv1d + BiGRU temporal enhancement.
        dropout: Dropout probability used throughout the branch.
        compile_windows: gather the windows and compute their LayerNorm statistics in one
            ``torch.compile``-d kernel (CPU, float32 or bf16-mixed; see
            :func:`~emimimic.models.projector.norm_linear_windows`). Same results to float32
            rounding; the first batch pays the compile.
    """

    #: With mean pooling and nothing between the projector and the pooling (no temporal block,
    #: no VAD pathway), training on the CPU draws the projector's dropout as one
    #: ``Binomial(n, 1 - p)`` count per distinct window and element, n the steps that use the
    #: window (:func:`~emimimic.models.dropout.keep_counts`): the pooled value has the same
    #: distribution as with a mask per step, without the ``[B, 128, H]`` steps. ``False`` draws
    #: a mask per step, as :meth:`forward_dense` does (the same values for the same seed).
    window_dropout: bool = True

    def __init__(self, in_dim: int, num_targets: int, hidden: int = 256,
                 pooling: Pooling = "mean", temporal: bool = False, dropout: float = 0.2,
                 compile_windows: bool = False) -> None:
        super().__init__()
        if pooling not in get_args(Pooling):
            raise ValueError(f"pooling must be one of {get_args(Pooling)}, got {pooling!r}")
        if in_dim < 1 or num_targets < 1 or hidden < 1:
            raise ValueError(
                f"in_dim, num_targets and hidden must be positive, got in_dim={in_dim}, "
                f"num_targets={num_targets}, hidden={hidden}"
            )
        self.in_dim = in_dim
        self.compile_windows = bool(compile_windows)
        self.projector = nn.Sequential(
            nn.LayerNorm(in_dim),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            Dropout(dropout),
        )
        self.temporal = TemporalEnhancer(hidden, dropout) if temporal else None
        self.pool: nn.Module = MeanPooling()
        if pooling == "attention":
            self.pool = AttentionPooling(hidden)
        elif pooling == "lstm":
            self.pool = LSTMPooling(hidden, dropout)
        self.feature = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden))
        self.aux_head = regression_head(hidden, hidden, num_targets, dropout)
        # Small random init so the missing embedding differs from any all-zero pattern at start.
        self.missing_embedding = nn.Parameter(torch.randn(hidden) * 0.02)

    def condition(self, seq: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns the projected sequence ``[B, T, H]`` after any modality-specific pathway.

        The generic branch has none; the audio VAD branch overrides this and
        :meth:`condition_windows`.
        """
        return seq, None

    def condition_windows(self, h: Tensor, win: Windows) -> tuple[Tensor, Tensor | None]:
        """Returns :meth:`condition` applied to per-window projections ``[W, H]`` (eval only)."""
        return h, None

    def forward(self, rows: Tensor, win: Windows, present: Tensor | None = None,
                keep_steps: bool = False) -> BranchOutput:
        """Encodes a batch from its stored rows.

        Args:
            rows: Stored rows ``[R, D]`` of the batch's clips back to back (float16 from the
                store, or any float dtype).
            win: The batch's pooling windows (:func:`emimimic.pooling.windows`).
            present: Bool ``[B]``; False marks clips without this modality. ``None``: all present.
            keep_steps: also return the pooled sequence ``[B, 128, H]`` (``BranchOutput.steps``).
        """
        if rows.ndim != 2 or rows.shape[-1] != self.in_dim:
            raise ValueError(f"expected rows of shape [R, {self.in_dim}], got {tuple(rows.shape)}")
        norm, linear, act, drop = self.projector
        # Under autocast the window inputs stay float16 (exact copies of the store's values):
        # normalising them in float16 costs less than a float32 copy, and the matmul rounds to
        # the autocast dtype anyway. Otherwise they are the parameters' dtype (float32).
        mixed = rows.dtype == torch.float16 and torch.is_autocast_enabled(rows.device.type)
        h = norm_linear_windows(rows, win, norm, linear) if self.compile_windows else None
        if h is None:
            x = win.gather(rows, rows.dtype if mixed else linear.weight.dtype)
            # each distinct window projected once; x is the gather's own copy unless it is rows
            h = norm_linear(x, norm, linear, overwrite=x is not rows)
        h = act(h)
        if self.training and self._drops_by_window(rows, keep_steps):
            # mean pooling right after the dropout: the pooled value depends on each window's
            # number of steps that keep an element, one Binomial draw per window and element
            keep = 1.0 - drop.p
            counts = self.keep_counts(win, keep, h.shape[1]).mul_(1.0 / (STEPS * keep))
            return self._finish(win.sum(h * counts.to(h.dtype)), None, present)
        if (self.training or keep_steps or self.temporal is not None
                or not isinstance(self.pool, MeanPooling)):
            # dropout after the gather, so each step gets its own mask as on a dense input
            seq, vad = self.condition(drop(win.expand(h)))
            if self.temporal is not None:
                seq = self.temporal(seq)
            return self._finish(self.pool(seq), vad, present, seq if keep_steps else None)
        h, vad = self.condition_windows(h, win)
        return self._finish(win.mean(h), vad, present)

    def _drops_by_window(self, rows: Tensor, keep_steps: bool) -> bool:
        """Whether training draws the projector's dropout per window (:attr:`window_dropout`)."""
        return (self.window_dropout and rows.device.type == "cpu" and not keep_steps
                and self.temporal is None and type(self.pool) is MeanPooling
                and type(self).condition is ModalityBranch.condition
                and 0.0 < self.projector[3].p < 1.0)

    def keep_counts(self, win: Windows, keep: float, width: int) -> Tensor:
        """Returns float32 ``[W, width]``: of each window's steps, how many keep each element."""
        return keep_counts(win.uses(), keep, width)

    def forward_dense(self, x: Tensor, present: Tensor | None = None,
                      keep_steps: bool = False) -> BranchOutput:
        """Encodes a batch of sequences ``[B, T, D]`` (any float dtype, any T)."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(
                f"expected features of shape [B, T, {self.in_dim}], got {tuple(x.shape)}"
            )
        # fp16 storage -> parameter dtype (float32 normally); autocast still picks the op dtype.
        x = x.to(self.projector[1].weight.dtype)
        seq, vad = self.condition(self.projector(x))
        if self.temporal is not None:
            seq = self.temporal(seq)
        return self._finish(self.pool(seq), vad, present, seq if keep_steps else None)

    def _finish(self, pooled: Tensor, vad: Tensor | None, present: Tensor | None,
                steps: Tensor | None = None) -> BranchOutput:
        z = self.feature(pooled)
        if present is not None:
            if present.shape != (z.shape[0],):
                raise ValueError(
                    f"expected a presence mask of shape [{z.shape[0]}], got {tuple(present.shape)}"
                )
            mask = present.to(device=z.device, dtype=torch.bool).unsqueeze(1)
            # torch.where cuts the gradient to the rows of absent clips entirely.
            z = torch.where(mask, z, self.missing_embedding.to(z.dtype).expand_as(z))
        return BranchOutput(embedding=z, aux=self.aux_head(z), vad=vad, steps=steps)


class AudioVADBranch(ModalityBranch):
    """Audio branch with the VAD-aware pathway between projector and pooling.

    The time mean of the projected sequence goes through
    LayerNorm -> Linear(H, H/2) -> GELU -> Dropout -> Linear(H/2, 3) -> Sigmoid to give a latent
    ``vad`` ``[B, 3]``; it is repeated over time, concatenated to the sequence (``H + 3``) and
    mapped back by LayerNorm -> Linear(H + 3, H) -> GELU -> Dropout. Other arguments as
    :class:`ModalityBranch`.
    """

    def __init__(
        self,
        in_dim: int,
        num_targets: int,
        hidden: int = 256,
        pooling: Pooling = "mean",
        temporal: bool = False,
        dropout: float = 0.2,
        compile_windows: bool = False,
    ) -> None:
        super().__init__(in_dim, num_targets, hidden, pooling, temporal, dropout, compile_windows)
        self.vad_head = nn.Sequential(
            nn.LayerNorm(hidden),
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            Dropout(dropout),
            nn.Linear(hidden // 2, 3),
            nn.Sigmoid(),
        )
        self.vad_fuse = nn.Sequential(
            nn.LayerNorm(hidden + 3),
            nn.Linear(hidden + 3, hidden),
            nn.GELU(),
            Dropout(dropout),
        )

    def condition(self, seq: Tensor) -> tuple[Tensor, Tensor | None]:
        """Returns the VAD-conditioned sequence ``[B, T, H]`` and the latent ``vad`` ``[B, 3]``."""
        vad = self.vad_head(seq.mean(dim=1))
        repeated = vad.to(seq.dtype).unsqueeze(1).expand(-1, seq.shape[1], -1)
        return self.vad_fuse(torch.cat([seq, repeated], dim=-1)), vad

    def condition_windows(self, h: Tensor, win: Windows) -> tuple[Tensor, Tensor | None]:
        """Returns the VAD-conditioned window projections ``[W, H]`` and ``vad`` ``[B, 3]``.

        The latent comes from the clip's time mean, and the fuse layer acts per step, so in eval
        mode (no dropout) it can act once per window instead.
        """
        vad = self.vad_head(win.mean(h))
        return self.vad_fuse(torch.cat([h, vad.to(h.dtype)[win.clip]], dim=-1)), vad
