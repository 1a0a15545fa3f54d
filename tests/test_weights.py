"""Per-clip sample weights: from a split CSV column into the store, and into training batches."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from emimimic.data import EMIDataModule
from emimimic.data.pack import pack
from emimimic.data.store import FeatureStore, StoreError
from emimimic.data.synth import synth


def add_column(path: str, name: str, values: list[str], at: int | None = None) -> None:
    """Adds a column to a split CSV (at position ``at``, default the end)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    at = len(rows[0]) if at is None else at
    rows = [row[:at] + [cell] + row[at:] for row, cell in zip(rows, [name, *values],
                                                               strict=True)]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_pack_stores_the_weight_column_of_labelled_splits(raw_inputs, tmp_path: Path):
    inputs = raw_inputs(train=5, valid=3, test=2)
    weights = {"train": ["1", "1.5", "2", "0", "4"], "valid": ["2", "2", "1"]}
    add_column(inputs["splits"]["train"], "raters", weights["train"], at=1)  # anywhere
    add_column(inputs["splits"]["valid"], "raters", weights["valid"])
    store = FeatureStore(pack(tmp_path / "store", inputs["splits"], inputs["modalities"],
                              weight_column="raters", progress=False))
    for split, values in weights.items():
        np.testing.assert_array_equal(store.split(split).weights,
                                      np.asarray(values, dtype=np.float32))
        # the labels are the targets only, the weight column is not one of them
        np.testing.assert_allclose(store.split(split).labels, inputs["labels"][split], atol=1e-6)
    assert store.split("test").weights is None  # unlabelled, no column: no weights
    assert store.manifest["splits"]["train"]["weighted"] is True
    assert "weighted" not in store.manifest["splits"]["test"]


@pytest.mark.parametrize(("cells", "message"), [
    (["1", "-1", "1", "1", "1"], "sample weight -1.0 outside"),
    (["1", "x", "1", "1", "1"], "sample weight 'x' is not a number"),
    (["1", "", "1", "1", "1"], "missing sample weight"),
    (["0", "0", "0", "0", "0"], "every sample weight is 0"),
])
def test_bad_weights_are_one_clear_error(raw_inputs, tmp_path: Path, cells, message):
    inputs = raw_inputs(train=5, valid=0, test=0)
    add_column(inputs["splits"]["train"], "raters", cells)
    with pytest.raises(StoreError, match=message) as err:
        pack(tmp_path / "store", inputs["splits"], inputs["modalities"], weight_column="raters",
             progress=False)
    assert "train.csv" in str(err.value)
    if message != "every sample weight is 0":
        assert "clip 00001" in str(err.value) and "'raters'" in str(err.value)


def test_a_labelled_split_without_the_weight_column_is_refused(raw_inputs, tmp_path: Path):
    inputs = raw_inputs(train=3, valid=2, test=0)
    add_column(inputs["splits"]["train"], "raters", ["1", "2", "3"])
    with pytest.raises(StoreError, match=r"valid.csv: no sample-weight column 'raters'"):
        pack(tmp_path / "store", inputs["splits"], inputs["modalities"], weight_column="raters",
             progress=False)


def test_synth_weights_are_the_square_root_of_the_rater_counts(tmp_path: Path):
    plain = FeatureStore(synth(tmp_path / "a", counts={"train": 40, "valid": 20, "test": 5}))
    weighted = FeatureStore(synth(tmp_path / "b", counts={"train": 40, "valid": 20, "test": 5},
                                  sample_weights=True))
    w = weighted.split("train").weights
    raters = np.round(w.astype(np.float64) ** 2)
    np.testing.assert_allclose(w, np.sqrt(raters), rtol=1e-6)
    # labels are rater fractions k/N: N times each label is a whole number
    labels = weighted.split("train").labels.astype(np.float64)
    np.testing.assert_allclose(labels * raters[:, None], np.round(labels * raters[:, None]),
                               atol=1e-3)
    # the features and labels are those of the same seed without weights
    np.testing.assert_array_equal(weighted.split("train").labels, plain.split("train").labels)
    assert plain.split("train").weights is None and weighted.split("test").weights is None


def test_training_batches_carry_weights_and_evaluation_batches_do_not(tmp_path: Path):
    store = synth(tmp_path / "s", counts={"train": 40, "valid": 20, "test": 5},
                  sample_weights=True)
    data = EMIDataModule(str(store), batch_size=8)
    weights = FeatureStore(store).split("train").weights
    plan = data.dataset("train").__getitems__([3, 1, 7])
    batch = data.prepare_batch(plan)
    torch.testing.assert_close(batch.weight, torch.from_numpy(weights[[3, 1, 7]]))
    assert data.prepare_batch(data.dataset("valid").__getitems__([0, 1])).weight is None
    off = EMIDataModule(str(store), batch_size=8, sample_weights=False)
    assert off.prepare_batch(off.dataset("train").__getitems__([0])).weight is None


def test_a_damaged_weights_file_is_named(tmp_path: Path):
    store = synth(tmp_path / "s", counts={"train": 10, "valid": 4, "test": 0},
                  sample_weights=True)
    np.save(store / "train" / "weights.npy", np.ones(3, dtype=np.float32))
    with pytest.raises(StoreError, match=r"train/weights.npy: expected float32 \[10\]"):
        FeatureStore(store).split("train")
