"""``emimimic ensemble``: several trained models as one, and what the ensemble gains.

Usage::

    emimimic ensemble runs/table/final-seed*/ --out runs/ens_final            # mean of 5 seeds
    emimimic ensemble runs/folds/*-fold*/ --weights fitted --out runs/ens_cv  # fitted on OOF

Members are checkpoints or run folders (their best checkpoint; a refit's ``last.ckpt``); each
rebuilds its model and its data module from the checkpoint alone. Members that differ only in
their fold (and seed) form a *group*: a group's prediction of a clip is the mean of its members'.

* ``mean``: the ensemble is the mean of every member's predictions.
* ``fitted``: per target, non-negative weights over the groups that sum to 1, fitted on the
  groups' **held-out** predictions: each clip's prediction comes from the members that did not
  train on it (their validation split, or their fold: out-of-fold predictions over train +
  valid). The weights maximise each target's Pearson r on those clips (non-negative least
  squares on centred predictions, whose direction is the r-maximising one). The test split is
  never used. Where the ensemble predicts clips the weights were fitted on (scoring on the
  validation split, say), those clips get weights fitted without them (5-way cross-fitting), so
  no score is computed on the clips its weights saw.

Outputs in ``OUT``: ``submission.csv`` (the challenge CSV of the predict split),
``{split}_predictions.csv`` of the scored split, ``members.csv``, ``weights.csv``,
``ensemble.md`` (every member's score, the ensemble's, and the paired-bootstrap interval of the
gain over the best member) and ``ensemble.json`` (what ``emimimic table`` reads to take the
ensemble as a row).
"""

from __future__ import annotations

import inspect
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from jsonargparse.typing import PositiveInt

from emimimic.constants import ID_COLUMN
from emimimic.errors import UserError
from emimimic.experiments import stats
from emimimic.experiments.runs import fit_config, held_out, with_rows
from emimimic.files import write_atomic

#: Folds of the cross-fitting that keeps fitted weights off the clips they score.
CROSS_FIT_FOLDS = 5
#: The data module's name for the clips a run validates on (its split, or its fold).
HELD_OUT = "held_out"


@dataclass
class EnsembleOptions:
    """Ensemble trained models: the mean of their predictions, or per-target weights fitted on
    held-out predictions; writes the challenge submission and, on a labelled split, each
    member's score, the ensemble's and the paired-bootstrap interval of its gain over the best
    member.

    Attributes:
        members: checkpoints (.ckpt) or run folders (their best checkpoint; a refit's
            last.ckpt), also the first arguments.
        store: the feature store to predict (default: each member's own, from its checkpoint).
        predict_split: the split whose challenge submission is written.
        score_split: a labelled split on which members and ensemble are scored (default: the
            predict split if it is labelled, else valid).
        weights: mean (every member alike) or fitted (per target, non-negative, summing to 1,
            over the member groups, fitted on held-out predictions).
        out: folder of the outputs.
        batch_size: clips per batch when predicting.
        device: torch device to predict on (cpu, cuda, cuda:1).
        resamples: bootstrap resamples of the clips for the interval.
        confidence: coverage of the interval.
        bootstrap_seed: seed of the resampling.
    """

    members: list[str] = field(default_factory=list)
    store: Path | None = None
    predict_split: str = "test"
    score_split: str | None = None
    weights: Literal["mean", "fitted"] = "mean"
    out: Path = Path("runs/ensemble")
    batch_size: PositiveInt = 64
    device: str = "cpu"
    resamples: int = 2000
    confidence: float = 0.95
    bootstrap_seed: int = 0


# -- the weights ------------------------------------------------------------------------------


def nnls(a: np.ndarray, b: np.ndarray, sweeps: int = 2000, tol: float = 1e-13) -> np.ndarray:
    """Returns ``argmin_{w >= 0} ||a w - b||``, by cyclic coordinate descent (deterministic)."""
    gram, target = a.T @ a, a.T @ b
    w = np.zeros(a.shape[1])
    for _ in range(sweeps):
        change = 0.0
        for i in range(len(w)):
            if gram[i, i] <= 0:
                continue
            new = max(0.0, w[i] + (target[i] - gram[i] @ w) / gram[i, i])
            change = max(change, abs(new - w[i]))
            w[i] = new
        if change < tol:
            break
    return w


def fit_weights(preds: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Returns per-target weights ``[G, K]`` over G prediction sets ``[G, N, K]``: each column
    non-negative and summing to 1, maximising the combination's Pearson r with ``labels``.

    For centred predictions and labels, the least-squares fit of a non-negative combination
    points in the direction of the largest r the combination can reach (a positive r), and r
    does not depend on the scale; the fit is normalised to sum 1. A target whose fit is all zero
    (no positive r possible) gets equal weights.
    """
    g, _, k = preds.shape
    out = np.full((g, k), 1.0 / g)
    for t in range(k):
        a = preds[:, :, t].T - preds[:, :, t].mean(axis=1)
        b = labels[:, t] - labels[:, t].mean()
        w = nnls(a, b)
        if w.sum() > 0:
            out[:, t] = w / w.sum()
    return out


def combine(preds: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Returns the weighted combination ``[N, K]`` of prediction sets ``[G, N, K]``."""
    return np.einsum("gnk,gk->nk", preds, weights)


def cross_fitted(preds: np.ndarray, labels: np.ndarray, folds: int = CROSS_FIT_FOLDS,
                 seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Returns predictions ``[N, K]`` of the fitting clips, each from weights fitted without it,
    and the weights of each fold (the clips cut into ``folds`` with a fixed seed)."""
    from emimimic.data.folds import fold_of

    assignment = fold_of(preds.shape[1], min(folds, preds.shape[1]), seed)
    out = np.empty(preds.shape[1:])
    per_fold = []
    for f in range(int(assignment.max()) + 1):
        held = assignment == f
        w = fit_weights(preds[:, ~held], labels[~held])
        out[held] = combine(preds[:, held], w)
        per_fold.append(w)
    return out, per_fold


# -- the members ------------------------------------------------------------------------------


@dataclass
class Member:
    """A trained model of the ensemble.

    Attributes:
        name: its run folder's (or checkpoint's) name.
        checkpoint: the checkpoint file.
        group: the key of the models it is averaged with (all but fold and seed equal).
        held_out: the split (or fold) it validated on, or None (a refit).
    """

    name: str
    checkpoint: Path
    group: str
    held_out: str | None


def resolve(member: str) -> Path:
    """Returns the checkpoint a member names: a file, or a run folder's best (else last).

    Raises:
        UserError: no checkpoint there.
    """
    from emimimic.training.checkpoints import (
        best_checkpoint,
        checkpoint_callback_state,
        load_checkpoint,
    )

    path = Path(member)
    if path.is_file():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    last = folder / "last.ckpt"
    if not last.is_file():
        raise UserError(f"{member}: no checkpoint (expected a .ckpt file or a run folder with "
                        "checkpoints/last.ckpt)")
    if checkpoint_callback_state(load_checkpoint(last), "ModelCheckpoint"):
        return Path(best_checkpoint(str(folder)))
    return last  # a refit: no validation, its model is the last epoch's


#: Options that do not change what a member learns (or differ by design: its fold and seed).
NOT_THE_MODEL = {"seed_everything": None, "ckpt_path": None, "allow_untrained": None,
                 "submission": None, "checkpoint": None, "last_checkpoint": None,
                 "dashboard": None, "lr_monitor": None,
                 "trainer": ("default_root_dir", "logger", "callbacks", "enable_progress_bar",
                             "enable_model_summary"),
                 "data": ("fold", "num_workers", "preload", "pin_memory", "predict_split",
                          "test_split")}


def _group_key(checkpoint: Path, state: dict) -> tuple[str, str | None]:
    """Returns (the member's group key, its held-out split or fold).

    Members whose run config (the ``logs/fit/config.yaml`` beside its checkpoints; else the
    checkpoint's hyper-parameters) is equal but for :data:`NOT_THE_MODEL` share a group.
    """
    data = {k: v for k, v in (state.get("datamodule_hyper_parameters") or {}).items()
            if not k.startswith("_")}
    held = held_out(data)
    config = fit_config(checkpoint)
    if config is None:
        config = {"model": {k: v for k, v in (state.get("hyper_parameters") or {}).items()
                            if not k.startswith("_")}, "data": data}
    for section, keys in NOT_THE_MODEL.items():
        if keys is None:
            config.pop(section, None)
        elif isinstance(config.get(section), dict):
            for key in keys:
                config[section].pop(key, None)
    return json.dumps(config, sort_keys=True, default=str), held


class Predictor:
    """Predicts splits with each member, in this process, caching them in ``OUT/members``."""

    def __init__(self, opts: EnsembleOptions) -> None:
        self.opts = opts
        self.cache = opts.out / "members"

    def members(self) -> list[Member]:
        from emimimic.training.checkpoints import load_checkpoint

        out, names = [], set()
        for given in self.opts.members:
            ckpt = resolve(given)
            name = Path(given).name if Path(given).is_dir() else ckpt.stem
            if name in names:
                name = f"{name}-{len(names)}"
            names.add(name)
            key, held = _group_key(ckpt, load_checkpoint(ckpt))
            out.append(Member(name, ckpt, key, held))
        return out

    def predict(self, member: Member, split: str) -> pd.DataFrame:
        """Returns the member's predictions of ``split`` (or ``held_out``), indexed by clip.

        They are what its file in ``OUT/members`` holds (6 decimals), whether predicted now or
        earlier, so a rerun of the ensemble gives the same numbers.
        """
        file = self.cache / member.name / f"{split}.csv"
        if file.is_file():
            return pd.read_csv(file, dtype={ID_COLUMN: str}).set_index(ID_COLUMN)
        import torch

        from emimimic.data import EMIDataModule
        from emimimic.training import EMIModule
        from emimimic.training.checkpoints import load_checkpoint
        from emimimic.training.dashboard import predict_split

        state = load_checkpoint(member.checkpoint)
        accepted = inspect.signature(EMIDataModule).parameters
        data_args = {k: v for k, v in (state.get("datamodule_hyper_parameters") or {}).items()
                     if k in accepted}
        if self.opts.store is not None:
            data_args["store"] = str(self.opts.store)
        data_args.update(batch_size=self.opts.batch_size, num_workers=0, preload="none",
                         predict_split=split)
        data = EMIDataModule(**data_args)
        device = torch.device(self.opts.device)
        model = EMIModule.load_from_checkpoint(member.checkpoint, map_location=device)
        result = predict_split(model.net.to(device), data, data.split_names["predict"], device)
        frame = pd.DataFrame(np.clip(result.pred, 0.0, 1.0), columns=list(model.targets),
                             index=pd.Index(result.ids, name=ID_COLUMN))
        file.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(file, frame.to_csv(float_format="%.6f"))
        return self.predict(member, split)


# -- the command ------------------------------------------------------------------------------


def _labels(store: Path, split: str, ids: Sequence[str]) -> np.ndarray | None:
    """Returns the split's labels in the order of ``ids``, or None when it has none."""
    from emimimic.data.store import FeatureStore

    view = FeatureStore(store).split(split)
    if view.labels is None:
        return None
    row = {clip: n for n, clip in enumerate(view.ids)}
    return np.asarray(view.labels, dtype=np.float64)[[row[c] for c in ids]]


def _trained_on(member: Member, split: str) -> bool:
    """Returns whether a member of folds or a refit trained on clips of ``split``."""
    from emimimic.training.checkpoints import load_checkpoint

    data = load_checkpoint(member.checkpoint).get("datamodule_hyper_parameters") or {}
    union = (data.get("train_split", "train"), data.get("val_split", "valid"))
    return bool(data.get("folds") or data.get("refit")) and split in union


def _group_means(frames: dict[str, list[pd.DataFrame]]) -> dict[str, pd.DataFrame]:
    """Returns each group's mean prediction per clip (of the members that predicted it)."""
    return {g: pd.concat(parts).groupby(level=0).mean() for g, parts in frames.items()}


def _store_of(members: Sequence[Member], given: Path | None) -> Path:
    from emimimic.training.checkpoints import load_checkpoint

    if given is not None:
        return given
    stores = {str((load_checkpoint(m.checkpoint).get("datamodule_hyper_parameters") or {})
                  .get("store")) for m in members}
    if len(stores) != 1 or "None" in stores:
        raise UserError(f"the members were trained on stores {sorted(stores)}; pass --store")
    return Path(stores.pop())


def run_ensemble(opts: EnsembleOptions) -> dict:
    """Runs the ensemble (see the module docstring); returns what ``ensemble.json`` records."""
    if not opts.members:
        raise UserError("emimimic ensemble needs members: give checkpoints or run folders first")
    predictor = Predictor(opts)
    members = predictor.members()
    store = _store_of(members, opts.store)
    groups = list(dict.fromkeys(m.group for m in members))
    group_name = {g: f"group {i}" for i, g in enumerate(groups)}
    print(f"emimimic ensemble: {len(members)} member(s) in {len(groups)} group(s), "
          f"weights {opts.weights}", flush=True)

    predict_frames = {m.name: predictor.predict(m, opts.predict_split) for m in members}
    targets = list(next(iter(predict_frames.values())).columns)
    ids = list(next(iter(predict_frames.values())).index)
    score_split = opts.score_split or (
        opts.predict_split if _labels(store, opts.predict_split, ids) is not None else "valid")
    seen = [m.name for m in members if _trained_on(m, score_split)]
    if seen:
        print(f"note: {', '.join(seen)} trained on clips of {score_split!r} (folds or a refit): "
              "their scores there are not held-out; score on a split they never saw",
              flush=True)
    score_frames = {m.name: predictor.predict(m, score_split) for m in members}
    score_ids = list(next(iter(score_frames.values())).index)
    labels = _labels(store, score_split, score_ids)

    fit_info, weights = "every member alike (mean)", None
    fitting: pd.DataFrame | None = None
    if opts.weights == "fitted":
        if any(m.held_out is None for m in members):
            raise UserError("fitted weights need each member's held-out predictions; a refit "
                            "has none (ensemble refits by their mean, or fit the weights on "
                            "their fold or validation runs)")
        held = _group_means({g: [predictor.predict(m, HELD_OUT) for m in members
                                 if m.group == g] for g in groups})
        common = sorted(set.intersection(*(set(f.index) for f in held.values())))
        if len(common) < 2 * CROSS_FIT_FOLDS:
            raise UserError(f"the groups' held-out predictions share {len(common)} clips; "
                            "fitted weights need the same held-out clips for every group")
        fit_labels = _held_out_labels(store, common)
        stacked = np.stack([held[g].loc[common, targets].to_numpy(np.float64) for g in groups])
        weights = fit_weights(stacked, fit_labels)
        cross, _ = cross_fitted(stacked, fit_labels)
        fitting = pd.DataFrame(cross, index=pd.Index(common, name=ID_COLUMN), columns=targets)
        kinds = sorted({m.held_out for m in members})
        fit_info = (f"fitted per target on {len(common)} held-out clips ({', '.join(kinds)}: "
                    "each clip predicted by the models that did not train on it); clips the "
                    "weights were fitted on are predicted with weights fitted without them "
                    f"({CROSS_FIT_FOLDS}-way cross-fitting); the test split is never used")

    def ensemble(frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
        if weights is None:
            return sum(f.loc[:, targets] for f in frames.values()) / len(frames)
        means = _group_means({g: [frames[m.name] for m in members if m.group == g]
                              for g in groups})
        index = next(iter(frames.values())).index
        stacked = np.stack([means[g].loc[index, targets].to_numpy(np.float64) for g in groups])
        out = pd.DataFrame(combine(stacked, weights), index=index, columns=targets)
        seen = [c for c in index if fitting is not None and c in fitting.index]
        if seen:  # never score or submit a clip with weights that were fitted on it
            out.loc[seen] = fitting.loc[seen, targets].to_numpy()
        return out

    opts.out.mkdir(parents=True, exist_ok=True)
    submission = ensemble(predict_frames).clip(0.0, 1.0)
    from emimimic.training.submission import write_submission

    write_submission(opts.out / "submission.csv", targets,
                     [(c, list(map(float, submission.loc[c]))) for c in submission.index])
    scored = ensemble(score_frames).clip(0.0, 1.0)
    write_atomic(opts.out / f"{score_split}_predictions.csv",
                 scored.rename_axis(ID_COLUMN).to_csv(float_format="%.6f"))
    rows = [{"member": m.name, "group": group_name[m.group], "held_out": m.held_out,
             "checkpoint": str(m.checkpoint)} for m in members]
    record = {"members": [str(m.checkpoint) for m in members], "store": str(store),
              "weights": opts.weights, "fit": fit_info, "predict_split": opts.predict_split,
              "score_split": score_split, "groups": [group_name[g] for g in groups]}
    if weights is not None:
        pd.DataFrame(weights, index=[group_name[g] for g in groups], columns=targets
                     ).rename_axis("group").to_csv(opts.out / "weights.csv", float_format="%.6f")
    if labels is not None:
        _score(opts, members, score_frames, scored, labels, targets, rows, record, score_split,
               store)
    pd.DataFrame(rows).to_csv(opts.out / "members.csv", index=False, float_format="%.6f")
    write_atomic(opts.out / "ensemble.json", json.dumps(record, indent=1) + "\n")
    print(f"wrote {opts.out / 'submission.csv'} ({len(submission)} clips of "
          f"{opts.predict_split}), {opts.out / 'members.csv'}"
          + (f", {opts.out / 'ensemble.md'}" if labels is not None else ""), flush=True)
    return record


def _held_out_labels(store: Path, ids: Sequence[str]) -> np.ndarray:
    """Returns the labels of clips of any labelled split of the store, in the order of ids."""
    from emimimic.data.store import FeatureStore

    fs = FeatureStore(store)
    found: dict[str, np.ndarray] = {}
    for split in fs.splits:
        view = fs.split(split)
        if view.labels is not None:
            found.update(zip(view.ids, np.asarray(view.labels, dtype=np.float64), strict=True))
    return np.stack([found[c] for c in ids])


def _score(opts: EnsembleOptions, members: Sequence[Member], frames: dict[str, pd.DataFrame],
           scored: pd.DataFrame, labels: np.ndarray, targets: list[str], rows: list[dict],
           record: dict, split: str, store: Path) -> None:
    """Adds each member's score to ``rows``, and the ensemble's gain to ``ensemble.md``."""
    ids = list(scored.index)
    member_preds = {m.name: frames[m.name].loc[ids, targets].to_numpy(np.float64)
                    for m in members}
    for row in rows:
        r = stats.pearson(member_preds[row["member"]], labels, targets)
        row.update(mean_pearson=float(r.mean()), **dict(zip(targets, r, strict=True)))
    best = max(rows, key=lambda r: r["mean_pearson"])
    ens = scored.loc[ids, targets].to_numpy(np.float64)
    r_ens = stats.pearson(ens, labels, targets)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        intervals = stats.paired_bootstrap({"best member": [member_preds[best["member"]]],
                                            "ensemble": [ens]}, labels, "best member",
                                           resamples=opts.resamples,
                                           confidence=opts.confidence,
                                           seed=opts.bootstrap_seed, target_names=targets)
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"note: bootstrap: {message}", flush=True)
    gain = intervals["ensemble"]
    record.update(score=float(r_ens.mean()), best_member=best["member"],
                  best_member_score=best["mean_pearson"], gain=gain.difference,
                  gain_low=gain.low, gain_high=gain.high)
    scores = [r["mean_pearson"] for r in rows]
    lines = [f"| | Mean Pearson | {' | '.join(targets)} |",
             "|---|---:|" + "---:|" * len(targets)]
    lines += [f"| {r['member']} | {r['mean_pearson']:.4f} | "
              + " | ".join(f"{r[t]:.4f}" for t in targets) + " |" for r in rows]
    lines.append(f"| **ensemble** | **{r_ens.mean():.4f}** | "
                 + " | ".join(f"{v:.4f}" for v in r_ens) + " |")
    lines += ["", f"Ensemble of {len(rows)} member(s) on split `{split}` of `{store}` "
              f"({len(ids)} clips); members {np.mean(scores):.4f} ± "
              f"{np.std(scores, ddof=1) if len(scores) > 1 else math.nan:.4f}. Gain over the "
              f"best member ({best['member']}, chosen on these clips): "
              f"{gain.difference:+.4f} [{gain.low:+.4f}, {gain.high:+.4f}] "
              f"({opts.confidence:.0%} paired bootstrap over clips, {opts.resamples} resamples, "
              f"seed {opts.bootstrap_seed}). Weights: {record['fit']}."]
    write_atomic(opts.out / "ensemble.md", "\n".join(lines) + "\n")
    print(f"ensemble {r_ens.mean():.4f} on {split}; members {min(scores):.4f} .. "
          f"{max(scores):.4f}; gain over the best {gain.difference:+.4f} "
          f"[{gain.low:+.4f}, {gain.high:+.4f}]", flush=True)


def main(argv: Sequence[str]) -> None:
    """Runs ``emimimic ensemble`` on ``argv`` (the arguments after ``ensemble``)."""
    from emimimic.commandline import parse_command

    args = with_rows(argv, "ensemble", key="members")
    run_ensemble(EnsembleOptions(**parse_command(EnsembleOptions, args, "emimimic ensemble")))


__all__ = ["EnsembleOptions", "combine", "cross_fitted", "fit_weights", "main", "nnls",
           "run_ensemble"]

if __name__ == "__main__":
    main(sys.argv[1:])
