"""K folds of train + valid, the union they are cut from, and the refit on all of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.reference import QUICKSTART

from emimimic.cli import cli_main
from emimimic.data import EMIDataModule, FeatureStore, StoreError
from emimimic.data.folds import UnionView, fold_of


@pytest.mark.parametrize(("count", "folds"), [(10, 2), (160, 5), (161, 6), (7, 7)])
def test_folds_partition_the_clips_into_near_equal_parts(count, folds):
    assignment = fold_of(count, folds, seed=3)
    assert assignment.shape == (count,) and set(assignment.tolist()) == set(range(folds))
    sizes = np.bincount(assignment, minlength=folds)
    assert sizes.sum() == count and sizes.max() - sizes.min() <= 1
    np.testing.assert_array_equal(assignment, fold_of(count, folds, seed=3))  # fixed by seed
    assert not np.array_equal(assignment, fold_of(count, folds, seed=4))
    with pytest.raises(StoreError, match="folds=1"):
        fold_of(count, 1)


def test_every_labelled_clip_is_in_exactly_one_validation_fold(demo_store):
    store = FeatureStore(demo_store)
    labelled = store.split("train").ids + store.split("valid").ids
    held, trained = [], []
    for fold in range(4):
        data = EMIDataModule(str(demo_store), folds=4, fold=fold, fold_seed=1)
        fit = data.dataset(data.split_names["fit"])
        val = data.dataset(data.split_names["validate"])
        assert not set(fit.ids) & set(val.ids)
        assert sorted(fit.ids + val.ids) == sorted(labelled)
        held += val.ids
        trained.append(set(fit.ids))
        # held_out predicts the fold's clips, and test stays the test split
        assert data.predict_ids == data.dataset(data.split_names["predict"]).ids
        held_out = EMIDataModule(str(demo_store), folds=4, fold=fold, fold_seed=1,
                                 predict_split="held_out")
        assert held_out.predict_ids == val.ids
    assert sorted(held) == sorted(labelled) and len(held) == len(set(held))


def test_union_reads_each_clip_as_its_own_split_does(demo_store):
    store = FeatureStore(demo_store)
    train, valid = store.split("train"), store.split("valid")
    union = UnionView([train, valid], "train+valid")
    picks = [len(train) + 3, 0, len(train) + 60, 17, 17, len(train)]
    for m in store.dims:
        rows = union.read_rows(m, picks)
        expected = [train.read_rows(m, [i]) if i < len(train) else
                    valid.read_rows(m, [i - len(train)]) for i in picks]
        np.testing.assert_array_equal(rows, np.concatenate(expected))
        # row k of the union's all_rows is where its row_starts say (valid's after train's)
        shift = int(train.stored_rows(m).sum())
        np.testing.assert_array_equal(union.row_starts(m)[len(train):],
                                      valid.row_starts(m) + shift)
    np.testing.assert_array_equal(union.labels[len(train):], valid.labels)
    # a batch served from a fold equals the clips' pooled features read one by one
    data = EMIDataModule(str(demo_store), folds=3, fold=2)
    fit = data.dataset(data.split_names["fit"])
    batch = data.prepare_batch(fit.__getitems__([0, 5, len(fit) - 1]))
    for n, clip in enumerate(batch.ids):
        split = train if clip in train.ids else valid
        i = split.ids.index(clip)
        np.testing.assert_array_equal(batch.dense("text")[n].numpy(), split.read("text", i))
        torch.testing.assert_close(batch.target[n], torch.from_numpy(split.labels[i]))


def test_refit_trains_on_train_and_valid_without_validation(demo_store, tmp_path, caplog):
    data = EMIDataModule(str(demo_store), refit=True)
    fit = data.dataset(data.split_names["fit"])
    store = FeatureStore(demo_store)
    assert fit.ids == store.split("train").ids + store.split("valid").ids
    assert not data.validates
    with pytest.raises(StoreError, match="no held-out clips"):
        EMIDataModule(str(demo_store), refit=True, predict_split="held_out")
    with pytest.raises(StoreError, match="exclude each other"):
        EMIDataModule(str(demo_store), refit=True, folds=3)
    root = tmp_path / "refit"
    caplog.set_level("INFO")
    cli_main(["fit", "-c", str(QUICKSTART), "--data.store", str(demo_store), "--data.refit",
              "true", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(root),
              "--trainer.enable_progress_bar", "false"])
    assert "refit on train+valid for 2 epochs, no validation" in caplog.text
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["last.ckpt"]
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    steps = -(-len(fit) // 32) * 2
    assert state["global_step"] == steps and state["epoch"] == 1
