"""LayerNorm followed by Linear on an input that needs no gradient, with a one-matmul backward.

The per-step projector ``Linear(LayerNorm(x))`` is most of the model's arithmetic (D up to 4,096,
H = 256). Features never need a gradient, yet autograd computes the Linear's input gradient
``gy W`` only to pass it through the LayerNorm to its affine parameters. With x̂ the normalised
input, ``LayerNorm(x) = x̂ γ + β``, so

    y = x̂ (W diag γ)ᵀ + (W β + b)

and with ``G = gyᵀ x̂`` and ``s = Σ_rows gy`` every parameter gradient follows from ``G``:

    dW = G diag γ + s βᵀ,   db = s,   dγ = Σ_h W ⊙ G,   dβ = Wᵀ s.

One matmul in the backward instead of two, and γ, β are folded into the forward's weights. Under
autocast the two matmuls run in the autocast dtype, as autograd's would; x̂ is computed in float32
(from a float16 input under autocast, in float16 with float32 statistics).

In float32, when the caller lets ``x`` be overwritten (a copy it made, as the windows' gather
does), x is centred in place, ``x_c = x - mean``, and the row scale ``r = (var + eps)^(-1/2)``
is applied to the matmul's output instead of its input: ``y = r ⊙ (x_c (W diag γ)ᵀ) + (W β + b)``
and ``G = (r ⊙ gy)ᵀ x_c``. The same two-pass statistics as a LayerNorm, without a second
``[R, D]`` tensor: on two CPU cores 4.5–4.9 ms instead of ``layer_norm``'s 7.0–12.4 for the
windows of a batch's text (``[1568, 4096]``), 2.5–3.6 instead of 4.9–5.1 for its audio.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from emimimic.pooling import Windows


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Returns the autocast dtype active for ``device``, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class _NormLinear(torch.autograd.Function):
    """``Linear(LayerNorm(x))`` for an ``x`` without gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, gamma: Tensor, beta: Tensor, weight: Tensor, bias: Tensor,
                eps: float, overwrite: bool, prepared: bool = False,
                row_scale: Tensor | None = None) -> Tensor:
        dtype = _autocast_dtype(x.device) or weight.dtype
        with torch.autocast(x.device.type, enabled=False):
            w = (weight * gamma).to(dtype)  # W diag(γ): scales column d by γ_d
            b = torch.addmv(bias, weight, beta).to(dtype)
            if prepared:  # x̂ (row_scale None), or x centred with its row scale (float32)
                xhat, scale = x, row_scale
            elif overwrite and x.dtype == dtype == torch.float32:
                # centred in place; the row scale goes onto the output (see the module docstring)
                width = x.shape[1]
                xhat = x.sub_(x.sum(1, keepdim=True).div_(width))
                scale = torch.linalg.vector_norm(xhat, dim=1, keepdim=True)
                scale = scale.square_().div_(width).add_(eps).rsqrt_()
            else:
                # a float16 input (mixed precision) is normalised as it is, float32 statistics
                src = x if x.dtype == torch.float16 and dtype != weight.dtype else x.float()
                xhat = F.layer_norm(src, (x.shape[-1],), eps=eps).to(dtype)
                scale = None
            y = (torch.addmm(b, xhat, w.t()) if scale is None
                 else torch.mm(xhat, w.t()).mul_(scale).add_(b))
        ctx.save_for_backward(xhat, gamma, beta, weight, scale)
        return y

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        xhat, gamma, beta, weight, scale = ctx.saved_tensors
        with torch.autocast(gy.device.type, enabled=False):
            rows = gy.to(xhat.dtype) if scale is None else gy * scale
            g = (rows.t() @ xhat).float()  # [H, D], the backward's one matmul
            s = gy.float().sum(0)  # [H]
            d_weight = g * gamma.float() + torch.outer(s, beta.float())
            d_gamma = (weight.float() * g).sum(0)
            d_beta = weight.float().t() @ s
        return (None, d_gamma.to(gamma.dtype), d_beta.to(beta.dtype), d_weight.to(weight.dtype),
                s.to(weight.dtype), None, None, None, None)


def norm_linear(x: Tensor, norm: nn.LayerNorm, linear: nn.Linear,
                overwrite: bool = False) -> Tensor:
    """Returns ``linear(norm(x))`` for a 2-d ``x`` that needs no gradient.

    Equal to the two modules applied in turn (to float rounding), with gradients for their
    parameters from one matmul in the backward instead of two.

    Args:
        x: ``[R, D]`` rows.
        norm: an affine LayerNorm over D.
        linear: a Linear from D, with a bias.
        overwrite: ``x`` is the caller's own copy and may be overwritten (centred in place),
            which spares a LayerNorm output of x's size in float32.

    Raises:
        ValueError: ``x`` requires a gradient, is not 2-d, or the layers do not fit it.
    """
    if x.requires_grad:
        raise ValueError("norm_linear computes no input gradient; x must not require one")
    if x.ndim != 2 or norm.normalized_shape != (x.shape[1],) or linear.in_features != x.shape[1]:
        raise ValueError(f"norm_linear: expected x [R, {linear.in_features}] and a LayerNorm over "
                         f"{linear.in_features}, got x {tuple(x.shape)} and "
                         f"{tuple(norm.normalized_shape)}")
    if norm.weight is None or linear.bias is None:
        raise ValueError("norm_linear needs an affine LayerNorm and a Linear with a bias")
    return _NormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps,
                             overwrite)


def _prepare_windows(rows: Tensor, first: Tensor, last: Tensor, absent: Tensor, eps: float,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """The windows' gather and LayerNorm statistics (compiled into one kernel by
    :func:`norm_linear_windows`): float32 ``(x - mean, r)``, or ``x̂ = (x - mean) r`` in ``dtype``.

    A window is ``float16((float32(rows[first]) + float32(rows[last])) / 2)``, the row itself
    when ``first == last``: :meth:`Windows.gather`'s values, bit for bit.
    """
    pair = (rows.index_select(0, first).float() + rows.index_select(0, last).float()) * 0.5
    x = torch.where(absent[:, None], 0.0, pair.half().float())
    centred = x - x.mean(1, keepdim=True)
    scale = torch.rsqrt((centred * centred).mean(1, keepdim=True) + eps)
    if dtype == torch.float32:
        return centred, scale
    return (centred * scale).to(dtype), None


_COMPILED: dict[str, Any] = {}


def _compiled_prepare() -> Any:
    """Returns :func:`_prepare_windows` compiled once per process (shapes dynamic)."""
    if "prepare" not in _COMPILED:
        # emulate_precision_casts keeps the float16 rounding of two-row windows, which the
        # compiler would otherwise fold away (then values differ by up to 2**-11 relative)
        _COMPILED["prepare"] = torch.compile(_prepare_windows, dynamic=True,
                                             options={"emulate_precision_casts": True})
    return _COMPILED["prepare"]


def _compiled_dtype(rows: Tensor, weight: Tensor) -> torch.dtype | None:
    """Returns the matmul dtype where :func:`norm_linear_windows` compiles, else None: the
    store's float16 rows on the CPU, float32 parameters, and float32 or bfloat16 matmuls (no
    autocast, or CPU bf16 autocast), unless the compiler failed earlier."""
    dtype = _autocast_dtype(rows.device) or weight.dtype
    applies = (rows.device.type == "cpu" and rows.dtype == torch.float16 and rows.shape[0] > 0
               and weight.dtype == torch.float32
               and dtype in (torch.float32, torch.bfloat16) and "failed" not in _COMPILED)
    return dtype if applies else None


def norm_linear_windows(rows: Tensor, win: Windows, norm: nn.LayerNorm,
                        linear: nn.Linear) -> Tensor | None:
    """Returns ``linear(norm(win.gather(rows)))`` with the gather, the centring and the row
    statistics in one ``torch.compile``-d kernel, or None where it does not apply
    (:func:`_compiled_dtype`) or the compiler failed (a warning says why, once).

    The eager path passes over the windows' ``[W, D]`` values five times (gather, float32 copy,
    sum, centring, norm); the compiled kernel reads the stored rows once and writes the centred
    windows once. Results equal the eager path to float32 rounding (the statistics' sums run in
    another order). The first call compiles (tens of seconds on two cores; torch caches the
    kernel on disk for later processes); it needs the C++ compiler that torch's Inductor uses.

    Raises:
        ValueError: ``rows`` require a gradient (none is computed for them).
    """
    if rows.requires_grad:
        raise ValueError("norm_linear_windows computes no input gradient; rows must not require "
                         "one")
    dtype = _compiled_dtype(rows, linear.weight)
    if dtype is None:
        return None
    try:
        x, scale = _compiled_prepare()(rows, *win.bounds(rows), win.absent, norm.eps, dtype)
    except Exception as err:  # noqa: BLE001 - any compiler failure falls back to eager
        _COMPILED["failed"] = True
        warnings.warn(f"compile_windows: torch.compile failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); the windows are "
                      f"gathered and normalised eagerly from now on", RuntimeWarning, stacklevel=2)
        return None
    return _NormLinear.apply(x, norm.weight, norm.bias, linear.weight, linear.bias, norm.eps,
                             False, True, scale)
