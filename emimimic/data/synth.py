"""Synthetic feature stores for the demo and the tests (``emimimic synth``). NOT real data.

A synthetic store looks like a Hume-Vidmimic2 store from the outside and says in its manifest's
provenance that it is synthetic. What it imitates (see ``label_stats.md``):

* labels are rater fractions k/N with few raters (mostly N = 2-3, ~11% with N in 35-137), most
  values 0; train has no all-zero rows, valid has ~17%; Excitement and Joy correlate positively,
  Determination negatively with the others;
* every clip has a hidden latent vector ``z`` that drives its labels; each modality carries ``z``
  through a fixed random projection with its own strength (text > audio > visual, as in the paper)
  against a clip-level nuisance in the same subspace, plus per-step noise, so a model can learn
  the task and the unimodal ranking is the paper's. Half of that strength is visible in the
  clip's time-mean; the other part rides on a per-step pattern whose sign flips at random from
  step to step, so it cancels in the time-mean and only a model that is non-linear per step
  before pooling (the paper's projector) can use it. A time-averaged linear baseline therefore
  sees part of the signal, and the demo shows what the architecture adds;
* raw lengths are realistic: durations log-normal (mean ~7 s, 95th percentile ~11.5 s), visual
  25 or 30 fps, audio 50 Hz, text 10-60 tokens (~3.2 tokens/s); ~5% of clips have no text (silent)
  and ~1% no face;
* ids are consecutive 5-digit numbers across train, valid, test; test is unlabelled.

Everything comes from ``numpy.random.default_rng`` seeded with the seed and the clip's position, so
the same seed gives a byte-identical store. Clips go through :class:`StoreWriter`, the same writer
``emimimic pack`` uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from emimimic.constants import EMOTIONS
from emimimic.data.store import FORMAT_VERSION, StoreError

#: Small dims for a fast demo, and the paper's (ViT, WavLM-Large, ChatGLM3-6B).
DEMO_DIMS: dict[str, int] = {"visual": 32, "audio": 48, "text": 64}
PAPER_DIMS: dict[str, int] = {"visual": 768, "audio": 1024, "text": 4096}
DEFAULT_COUNTS: dict[str, int] = {"train": 384, "valid": 256, "test": 128}
#: How strongly each modality carries the latent label driver (text most, face least).
SIGNAL: dict[str, float] = {"text": 1.2, "audio": 0.6, "visual": 0.15}
#: Share of a modality's signal strength visible in the time-mean (the rest flips sign per step).
MEAN_VISIBLE: float = 0.5
#: Offset of the sign-flipping pattern: its magnitude, not its sign, carries the latent.
_FLIP_OFFSET: float = 1.5
#: Share of clips without data: silent clips have no transcript, a few have no detected face.
MISSING: dict[str, float] = {"text": 0.05, "visual": 0.01}
#: Fraction of all-zero label rows per split (label_stats.md: train none, valid 16.9%).
ALL_ZERO: dict[str, float] = {"train": 0.0, "valid": 0.169}
#: Per-emotion bias and loading on a shared "positive arousal" factor (logit scale).
_BIAS = {"Admiration": -2.2, "Amusement": -2.7, "Determination": -2.9, "Empathic Pain": -4.6,
         "Excitement": -2.6, "Joy": -2.9}
_SHARED = {"Excitement": 1.6, "Joy": 1.6, "Amusement": 0.3, "Admiration": 0.1,
           "Determination": -0.8, "Empathic Pain": -0.3}
_SPLIT_SEED = {"train": 1, "valid": 2, "test": 3}


def _split_key(name: str) -> int:
    return _SPLIT_SEED.get(name, 100 + sum(name.encode()))


def rater_counts(rng: np.random.Generator, n: int) -> np.ndarray:
    """Returns int [n] rater counts: mostly 2-3, a tail to 10, ~11% large panels (35-137)."""
    small = rng.choice(np.arange(1, 11), size=n,
                       p=np.array([3, 45, 16, 6, 6, 5.5, 3, 1.5, 1, 0.5]) / 87.5)
    large = rng.integers(35, 138, size=n)
    return np.where(rng.random(n) < 0.11, large, small)


def synth_labels(rng: np.random.Generator, z: np.ndarray, targets: Sequence[str],
                 all_zero: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Returns float64 [N, K] rater-fraction labels driven by the latents ``z`` [N, K + 1], and
    the int [N] rater counts behind them.

    ``all_zero`` is the fraction of all-zero rows to produce (0 = none, as in train); None keeps
    whatever the draw gives.
    """
    n, k = z.shape[0], len(targets)
    bias = np.array([_BIAS.get(t, -2.0) for t in targets])
    shared = np.array([_SHARED.get(t, 0.0) for t in targets])
    p = 1.0 / (1.0 + np.exp(-(bias + 1.3 * z[:, 1:] + shared * z[:, :1])))
    raters = rater_counts(rng, n)
    labels = rng.binomial(raters[:, None], p) / raters[:, None]
    if all_zero is None:
        return labels, raters
    want = int(round(all_zero * n))
    zero = np.nonzero(~labels.any(axis=1))[0]
    if zero.size > want:
        # the least intense all-zero rows stay zero; the rest get their likeliest target at 1/N
        keep = zero[np.argsort(p[zero].sum(axis=1), kind="stable")[:want]]
        fix = np.setdiff1d(zero, keep)
        labels[fix, p[fix].argmax(axis=1)] = 1.0 / raters[fix]
    elif zero.size < want:
        nonzero = np.nonzero(labels.any(axis=1))[0]
        extra = nonzero[np.argsort(p[nonzero].sum(axis=1), kind="stable")[: want - zero.size]]
        labels[extra] = 0.0
    return labels.reshape(n, k), raters


def durations(rng: np.random.Generator, n: int) -> np.ndarray:
    """Returns clip durations in seconds: log-normal, mean ~7 s, 95th percentile ~11.5 s."""
    return np.clip(rng.lognormal(mean=1.889, sigma=0.336, size=n), 1.0, 60.0)


def raw_lengths(rng: np.random.Generator, duration: float) -> dict[str, int]:
    """Returns a clip's raw sequence length per modality for a duration in seconds."""
    fps = 25 if rng.random() < 0.5 else 30
    tokens = 2 + 3.2 * duration * rng.uniform(0.6, 1.4)
    return {"visual": max(1, round(duration * fps)), "audio": max(1, round(duration * 50)),
            "text": int(np.clip(round(tokens), 10, 60))}


def synth(dest: Path, *, seed: int = 0, counts: dict[str, int] | None = None,
          dims: dict[str, int] | Literal["demo", "paper"] = "demo",
          targets: list[str] = list(EMOTIONS), progress: bool = False,  # noqa: B006
          sample_weights: bool = False, labelled_test: bool = False) -> Path:
    """Writes a SYNTHETIC feature store (not real data, its manifest says so); returns its path.

    Args:
        dest: the store folder to create.
        seed: same seed -> byte-identical store.
        counts: clips per split (default 384 train / 256 valid / 128 test, e.g.
            ``--counts.train 2000``); a split named ``test`` is unlabelled unless
            ``labelled_test``, the others labelled. A count of 0 leaves the split out.
        dims: modality -> D, or ``demo`` (visual 32, audio 48, text 64) or ``paper`` (768, 1024,
            4096: ViT, WavLM-Large, ChatGLM3-6B); modalities other than visual/audio/text get
            audio's signal strength.
        targets: label names (default the six EMI emotions; any number works).
        progress: show a progress bar.
        sample_weights: store the square root of each labelled clip's rater count as its sample
            weight (what USTC-IAT's optional weighting uses).
        labelled_test: give the test split labels too, drawn like valid's, so that a protocol
            can be scored on clips no model or search has seen (a benchmark's held-out split).
    """
    from emimimic.data.store.writer import SplitSpec, StoreWriter  # torch: only to write

    if isinstance(dims, str):
        if dims not in ("demo", "paper"):
            raise StoreError(f"dims {dims!r}: expected 'demo', 'paper' or modality -> D")
        dims = DEMO_DIMS if dims == "demo" else PAPER_DIMS
    counts = {k: int(v) for k, v in (counts or DEFAULT_COUNTS).items() if int(v) > 0}
    dims = dict(dims or DEMO_DIMS)
    if not counts or not dims or not targets:
        raise StoreError(f"synth needs clips, modalities and targets; got {counts}, {dims}, "
                         f"{list(targets)}")
    k = len(targets)
    latent = k + 1
    proj = {m: np.random.default_rng([seed, 7, i]).standard_normal((latent, d)).astype(np.float32)
            / np.sqrt(latent) for i, (m, d) in enumerate(dims.items())}
    flip = {m: np.random.default_rng([seed, 9, i]).standard_normal((latent, d)).astype(np.float32)
            / np.sqrt(latent) for i, (m, d) in enumerate(dims.items())}
    plans, latents, first = [], {}, 0
    for name, n in counts.items():
        rng = np.random.default_rng([seed, 1, _split_key(name)])
        z = rng.standard_normal((n, latent))
        labels, raters = synth_labels(rng, z, targets,
                                      ALL_ZERO.get("valid" if name == "test" else name))
        ids = [f"{first + i:05d}" for i in range(n)]
        first += n
        labelled = name != "test" or labelled_test
        plans.append(SplitSpec(name, ids, labels if labelled else None,
                               np.sqrt(raters) if labelled and sample_weights else None))
        latents[name] = (z.astype(np.float32), durations(rng, n))
    provenance = {"created_by": "emimimic synth", "synthetic": True,
                  "warning": "SYNTHETIC DATA for demos and tests, NOT Hume-Vidmimic2 features",
                  "seed": seed, "format_version": FORMAT_VERSION,
                  "signal": {m: SIGNAL.get(m, SIGNAL["audio"]) for m in dims},
                  "missing": {m: MISSING.get(m, 0.0) for m in dims}}
    writer = StoreWriter(dest, targets, dims, plans, provenance)
    try:
        total = sum(counts.values())
        with tqdm(total=total, desc=f"synth {Path(dest).name}", unit="clip",
                  disable=not progress) as bar:
            for plan in plans:
                z, secs = latents[plan.name]
                bar.update(writer.done(plan.name))
                for i in range(writer.done(plan.name), len(plan.ids)):
                    rng = np.random.default_rng([seed, 2, _split_key(plan.name), i])
                    writer.add(plan.name, _clip_arrays(rng, z[i], float(secs[i]), dims, proj,
                                                       flip))
                    bar.update(1)
    finally:
        writer.close()
    return writer.finish()


def _clip_arrays(rng: np.random.Generator, z: np.ndarray, duration: float,
                 dims: Mapping[str, int], proj: Mapping[str, np.ndarray],
                 flip: Mapping[str, np.ndarray]) -> dict[str, np.ndarray | None]:
    lengths = raw_lengths(rng, duration)
    gone = {m: bool(rng.random() < MISSING.get(m, 0.0)) for m in dims}
    if all(gone.values()):  # every clip has some data (a store refuses empty clips)
        gone[next(iter(dims))] = False
    arrays: dict[str, np.ndarray | None] = {}
    for m, d in dims.items():
        if gone[m]:
            arrays[m] = None
            continue
        # the clip-level nuisance lives in the same subspace as the signal, so no linear map can
        # separate them: a modality's strength is its signal-to-nuisance ratio
        strength = SIGNAL.get(m, SIGNAL["audio"])
        nuisance = rng.standard_normal(z.shape[0]).astype(np.float32)
        base = (MEAN_VISIBLE * strength * z + nuisance) @ proj[m]
        pattern = (_FLIP_OFFSET + strength * z) @ flip[m]
        n_steps = lengths.get(m, lengths["audio"])
        signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(n_steps, 1))
        steps = rng.standard_normal((n_steps, d), dtype=np.float32)
        steps *= np.float32(0.5)
        steps += base
        steps += signs * pattern.astype(np.float32)
        arrays[m] = steps
    return arrays
