"""``emimimic synth``: deterministic, realistic-looking labels, a learnable planted signal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from emimimic.constants import EMOTIONS
from emimimic.data import commands
from emimimic.data.store import FeatureStore
from emimimic.data.synth import synth, synth_labels


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    counts = {"train": 20, "valid": 10, "test": 5}
    a = synth(tmp_path / "a", seed=3, counts=counts)
    b = synth(tmp_path / "b", seed=3, counts=counts)
    c = synth(tmp_path / "c", seed=4, counts=counts)
    assert files_of(a) == files_of(b)
    fa, fc = files_of(a), files_of(c)
    assert fa.keys() == fc.keys()
    assert fa["train/text.f16"] != fc["train/text.f16"]
    assert fa["train/labels.csv"] != fc["train/labels.csv"]


def test_demo_store_is_marked_synthetic_and_shaped_like_the_task(demo_store: Path) -> None:
    store = FeatureStore(demo_store)
    assert store.provenance["synthetic"] is True and "NOT" in store.provenance["warning"]
    assert store.targets == list(EMOTIONS)
    assert store.dims == {"visual": 32, "audio": 48, "text": 64}
    assert [len(store.split(s)) for s in ("train", "valid", "test")] == [96, 64, 32]
    assert store.split("test").labels is None
    ids = [i for s in store.splits for i in store.split(s).ids]
    assert ids == [f"{i:05d}" for i in range(192)]
    lengths = store.split("train").raw_lengths("audio")
    assert (lengths > 128).any()
    text = store.split("train").raw_lengths("text")
    assert text[text > 0].min() >= 10 and text.max() <= 60  # always stored raw, pooled on read


def test_labels_look_like_the_real_ones() -> None:
    rng = np.random.default_rng(0)
    n = 6000
    train, _ = synth_labels(rng, rng.standard_normal((n, 7)), EMOTIONS, 0.0)
    valid, _ = synth_labels(rng, rng.standard_normal((n, 7)), EMOTIONS, 0.169)
    for labels in (train, valid):
        assert labels.min() >= 0 and labels.max() <= 1
        # rater fractions k/N: some N <= 137 makes every value of a row an integer multiple of 1/N
        n_ok = [any(np.allclose(row * r, np.round(row * r), atol=1e-9) for r in range(1, 138))
                for row in labels[:300]]
        assert all(n_ok)
        zeros = (labels == 0).mean(axis=0)
        assert (zeros > 0.5).all() and (zeros < 0.95).all()  # mostly zeros, per emotion
        assert np.median(labels, axis=0).max() == 0
        corr = np.corrcoef(labels.T)
        assert corr[4, 5] > 0.1  # Excitement - Joy
        assert corr[2, [0, 1, 3, 4, 5]].mean() < 0  # Determination against the rest
    assert not (~train.any(axis=1)).any()  # train: no all-zero rows
    assert abs((~valid.any(axis=1)).mean() - 0.169) < 0.01
    coarse = np.isin(np.round(train, 4), [0, 0.3333, 0.5, 0.6667, 1]).mean()
    assert coarse > 0.75  # few raters: values are mostly 0, 1/3, 1/2, 2/3, 1


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1])


def test_signal_is_learnable_text_most_face_least(tmp_path: Path) -> None:
    """A ridge regression on per-clip statistics ranks the modalities as the paper does.

    The statistics are the time-means of x and of |x|: the first sees the mean-visible part of
    the signal, the second the part whose sign flips per step.
    """
    store = FeatureStore(synth(tmp_path / "s", seed=1, counts={"train": 600, "valid": 300}))
    train, valid = store.split("train"), store.split("valid")
    score = {}
    for m in store.dims:
        xs = []
        for v in (train, valid):
            x = v.read_batch(m, range(len(v))).astype(np.float32)
            xs.append(np.concatenate([x.mean(axis=1), np.abs(x).mean(axis=1)], axis=1))
        w = np.linalg.solve(xs[0].T @ xs[0] + 10 * np.eye(xs[0].shape[1]),
                            xs[0].T @ (train.labels - train.labels.mean(0)))
        pred = xs[1] @ w
        score[m] = np.mean([pearson(pred[:, k], valid.labels[:, k]) for k in range(6)])
    assert score["text"] > score["audio"] > score["visual"] > 0.02, score


def test_missing_text_is_absent_not_invented(tmp_path: Path) -> None:
    store = FeatureStore(synth(tmp_path / "s", seed=2, counts={"train": 400}))
    view = store.split("train")
    present = view.present("text")
    assert 0.02 < 1 - present.mean() < 0.09
    gone = np.nonzero(~present)[0]
    assert not view.read_batch("text", gone).any()
    assert (view.raw_lengths("text")[gone] == 0).all()


@pytest.mark.parametrize("targets", [["Valence"], [f"E{k}" for k in range(7)]])
def test_any_number_of_targets(tmp_path: Path, targets: list[str]) -> None:
    store = FeatureStore(synth(tmp_path / "s", counts={"train": 30, "valid": 10}, targets=targets))
    assert store.targets == targets
    assert store.split("valid").labels.shape == (10, len(targets))


def test_cli_synth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    commands.synth_main([str(tmp_path / "s"), "--seed", "5", "--counts.train", "8",
                         "--counts.valid", "4", "--dims", "{text: 16, audio: 8}"])
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "train: 8 clips" in out and "test" not in out.split("targets")[1]
    store = FeatureStore(tmp_path / "s")
    assert store.dims == {"text": 16, "audio": 8} and store.provenance["seed"] == 5
