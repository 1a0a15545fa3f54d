"""emimimic ensemble: the mean of members, weights fitted on held-out clips, scored honestly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize
from support.reference import QUICKSTART

from emimimic.cli import cli_main
from emimimic.constants import EMOTIONS
from emimimic.data import FeatureStore
from emimimic.errors import UserError
from emimimic.experiments.ensemble import (
    EnsembleOptions,
    combine,
    cross_fitted,
    fit_weights,
    main,
    nnls,
    run_ensemble,
)


@pytest.mark.parametrize("seed", range(5))
def test_nnls_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((40, 6)), rng.standard_normal(40)
    expected, _ = optimize.nnls(a, b)
    np.testing.assert_allclose(nnls(a, b), expected, atol=1e-7)


def _sets(rng, n=300, k=3):
    """Three prediction sets of one signal, and labels that mix two of them."""
    signal = rng.standard_normal((n, k))
    preds = np.stack([signal + rng.standard_normal((n, k)) * s for s in (0.5, 1.0, 3.0)])
    labels = 0.7 * preds[0] + 0.3 * preds[1] + 0.05 * rng.standard_normal((n, k))
    return preds, labels


def test_fitted_weights_are_a_distribution_that_finds_the_mix():
    preds, labels = _sets(np.random.default_rng(0))
    weights = fit_weights(preds, labels)
    assert weights.shape == (3, 3) and (weights >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=0), np.ones(3))
    np.testing.assert_allclose(weights[:, 0], [0.7, 0.3, 0.0], atol=0.03)
    # the fitted combination correlates at least as well as the mean and as any single set
    def r(p):
        return np.mean([np.corrcoef(p[:, t], labels[:, t])[0, 1] for t in range(3)])
    assert r(combine(preds, weights)) >= max(r(preds.mean(0)), *(r(p) for p in preds))
    # a target no combination can follow positively gets equal weights
    flat = fit_weights(preds[:, :, :1], -preds[0, :, :1] - preds[1, :, :1])
    np.testing.assert_allclose(flat[:, 0], [1 / 3] * 3)


def test_cross_fitting_never_scores_a_clip_with_weights_fitted_on_it():
    preds, labels = _sets(np.random.default_rng(1))
    honest, per_fold = cross_fitted(preds, labels, folds=5, seed=0)
    assert len(per_fold) == 5
    # changing the labels of some clips changes no prediction of those clips
    from emimimic.data.folds import fold_of

    fold = fold_of(preds.shape[1], 5, 0)
    moved = labels.copy()
    moved[fold == 2] = np.random.default_rng(9).standard_normal(moved[fold == 2].shape)
    again, _ = cross_fitted(preds, moved, folds=5, seed=0)
    np.testing.assert_array_equal(again[fold == 2], honest[fold == 2])
    assert not np.allclose(again[fold != 2], honest[fold != 2])


@pytest.fixture(scope="module")
def runs(demo_store, tmp_path_factory):
    """Two configs x two folds, one epoch each, and two plain seeds: run folders."""
    root = tmp_path_factory.mktemp("members")
    made = {}
    common = ["-c", str(QUICKSTART), "--data.store", str(demo_store), "--trainer.max_epochs",
              "1", "--trainer.enable_progress_bar", "false"]
    for fusion in ("concat", "average"):
        for fold in (0, 1):
            folder = root / f"{fusion}-fold{fold}"
            cli_main(["fit", *common, "--model.network.fusion", fusion, "--data.folds", "2",
                      "--data.fold", str(fold), "--trainer.default_root_dir", str(folder)])
            made[(fusion, fold)] = folder
    for seed in (0, 1):
        folder = root / f"plain-seed{seed}"
        cli_main(["fit", *common, "--seed_everything", str(seed),
                  "--trainer.default_root_dir", str(folder)])
        made[("plain", seed)] = folder
    return made


def test_the_mean_ensemble_is_the_mean_of_the_members_prediction_files(runs, demo_store,
                                                                       tmp_path):
    members = [runs[("plain", 0)], runs[("plain", 1)]]
    files = []
    # each member's own submission, written by `emimimic predict` without the run's config:
    # it evaluates in the precision the run was trained in (32-true), as the ensemble does
    for folder in members:
        out = tmp_path / f"{folder.name}.csv"
        cli_main(["predict", "--data.store", str(demo_store), "--ckpt_path", "best",
                  "--trainer.default_root_dir", str(folder), "--submission.path", str(out)])
        files.append(pd.read_csv(out, dtype={"Filename": str}).set_index("Filename"))
    main([*map(str, members), "--out", str(tmp_path / "ens"), "--resamples", "200"])
    got = pd.read_csv(tmp_path / "ens" / "submission.csv", dtype={"Filename": str})
    got = got.set_index("Filename")
    assert list(got.columns) == list(EMOTIONS)
    assert list(got.index) == sorted(FeatureStore(demo_store).split("test").ids)
    mean = (files[0] + files[1]) / 2
    np.testing.assert_allclose(got.loc[mean.index].to_numpy(), mean.to_numpy(), atol=1.5e-6)
    # scored on valid: each member's score, the ensemble's and the gain's interval
    md = (tmp_path / "ens" / "ensemble.md").read_text()
    assert "plain-seed0" in md and "**ensemble**" in md and "Gain over the best member" in md
    members_csv = pd.read_csv(tmp_path / "ens" / "members.csv")
    assert list(members_csv.member) == ["plain-seed0", "plain-seed1"]
    assert members_csv.group.nunique() == 1  # two seeds of one config: one group


def test_fitted_weights_use_out_of_fold_clips_and_score_without_them(runs, demo_store,
                                                                     tmp_path):
    members = [runs[(f, k)] for f in ("concat", "average") for k in (0, 1)]
    record = run_ensemble(EnsembleOptions(members=[str(m) for m in members],
                                          weights="fitted", score_split="valid",
                                          out=tmp_path / "ens", resamples=200))
    assert record["groups"] == ["group 0", "group 1"]  # two configs, each of two folds
    weights = pd.read_csv(tmp_path / "ens" / "weights.csv", index_col="group")
    assert (weights.to_numpy() >= 0).all()
    np.testing.assert_allclose(weights.sum(axis=0), np.ones(len(EMOTIONS)), atol=2e-6)
    store = FeatureStore(demo_store)
    labelled = store.split("train").ids + store.split("valid").ids
    assert f"on {len(labelled)} held-out clips (fold 0 of 2, fold 1 of 2" in record["fit"]
    # independently: out-of-fold predictions of each config, cross-fitted weights, and the
    # scored valid predictions are those (never the weights fitted on the scored clips)
    oof = []
    for fusion in ("concat", "average"):
        parts = [pd.read_csv(tmp_path / "ens" / "members" / f"{fusion}-fold{k}" /
                             "held_out.csv", dtype={"Filename": str}).set_index("Filename")
                 for k in (0, 1)]
        both = pd.concat(parts)
        assert sorted(both.index) == sorted(labelled) and both.index.is_unique
        oof.append(both)
    common = sorted(labelled)
    labels = {c: lab for split in ("train", "valid") for c, lab in
              zip(store.split(split).ids, store.split(split).labels, strict=True)}
    stacked = np.stack([o.loc[common, list(EMOTIONS)].to_numpy(np.float64) for o in oof])
    honest, _ = cross_fitted(stacked, np.stack([labels[c] for c in common]).astype(np.float64))
    scored = pd.read_csv(tmp_path / "ens" / "valid_predictions.csv",
                         dtype={"Filename": str}).set_index("Filename")
    expected = pd.DataFrame(honest, index=common, columns=list(EMOTIONS)).clip(0, 1)
    np.testing.assert_allclose(scored.to_numpy(), expected.loc[scored.index].to_numpy(),
                               atol=1.5e-6)
    # weights are fitted on clips every group held out: two single folds share none
    with pytest.raises(UserError, match="share 0 clips"):
        run_ensemble(EnsembleOptions(members=[str(runs[("concat", 0)]),
                                              str(runs[("average", 1)])],
                                     weights="fitted", out=tmp_path / "bad", resamples=200))
