"""EMIDataModule: the batch contract, samplers without padding, any targets and modalities."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler, RandomSampler

from emimimic.data.datamodule import EMIDataModule, EvalShardSampler
from emimimic.data.store import FeatureStore, StoreError
from emimimic.data.synth import synth


def collect(loader) -> list[dict]:
    return list(loader)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_batches_follow_the_contract(demo_store: Path, num_workers: int) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=24, num_workers=num_workers)
    dm.setup("fit")
    view = FeatureStore(demo_store).split("valid")
    batches = collect(dm.val_dataloader())
    assert [len(b["ids"]) for b in batches] == [24, 24, 16]  # nothing dropped
    ids = [i for b in batches for i in b["ids"]]
    assert ids == view.ids
    start = 0
    for b in batches:
        n = len(b["ids"])
        rows = range(start, start + n)
        assert set(b["features"]) == set(b["present"]) == {"visual", "audio", "text"}
        for m, dim in dm.dims.items():
            x = b["features"][m]
            assert x.dtype == torch.float16 and x.shape == (n, 128, dim)
            np.testing.assert_array_equal(x.numpy(), view.read_batch(m, rows))
            p = b["present"][m]
            assert p.dtype == torch.bool and p.tolist() == view.present(m)[start:start + n].tolist()
            assert not x[~p].any()
        assert b["target"].dtype == torch.float32 and b["target"].shape == (n, 6)
        np.testing.assert_array_equal(b["target"].numpy(), view.labels[start:start + n])
        start += n
    assert any(not b["present"]["text"].all() for b in batches)  # the demo has silent clips


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_shuffles_every_clip_once(demo_store: Path, num_workers: int) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=40, num_workers=num_workers)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler)
    torch.manual_seed(0)
    batches = collect(loader)
    ids = [i for b in batches for i in b["ids"]]
    train = FeatureStore(demo_store).split("train")
    assert sorted(ids) == train.ids and ids != train.ids
    assert [len(b["ids"]) for b in batches] == [40, 40, 16]
    lookup = {clip: n for n, clip in enumerate(train.ids)}
    b = batches[0]
    order = [lookup[i] for i in b["ids"]]
    np.testing.assert_array_equal(b["target"].numpy(), train.labels[order])
    np.testing.assert_array_equal(b["features"]["audio"].numpy(), train.read_batch("audio", order))


def test_predict_on_unlabelled_split_has_no_target(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    batches = collect(dm.predict_dataloader())
    assert all("target" not in b for b in batches)
    assert [i for b in batches for i in b["ids"]] == FeatureStore(demo_store).split("test").ids


def test_dims_and_targets_known_after_init(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), modalities=["text", "audio"])
    assert dm.dims == {"text": 64, "audio": 48}
    assert dm.targets[4] == "Excitement" and dm.num_targets == 6
    batch = next(iter(dm.val_dataloader()))
    assert list(batch["features"]) == ["text", "audio"]


def test_unknown_split_or_modality_is_a_clear_error(demo_store: Path) -> None:
    with pytest.raises(StoreError, match=r"split 'dev' not in the store \(it has \['train', "):
        EMIDataModule(str(demo_store), val_split="dev")
    with pytest.raises(StoreError, match=r"modalities \['face'\] not in the store"):
        EMIDataModule(str(demo_store), modalities=["face", "text"])
    with pytest.raises(StoreError, match="not a feature store"):
        EMIDataModule(str(demo_store.parent / "nothing"))


def test_sample_getitem_matches_the_batch(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store))
    data = dm.dataset("valid")
    sample = data[5]
    batch = data.__getitems__([5])
    assert sample["ids"] == batch["ids"][0]
    assert torch.equal(sample["features"]["text"], batch["features"]["text"][0])
    assert torch.equal(sample["target"], batch["target"][0])


@pytest.mark.parametrize("size", [0, 1, 10, 11, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_sampler_gives_every_index_exactly_once(size: int, world: int) -> None:
    shards = [list(EvalShardSampler(size, world, rank)) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(size))
    assert [len(EvalShardSampler(size, world, r)) for r in range(world)] == [len(s) for s in shards]


def test_samplers_under_ddp(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=8)
    dm.trainer = SimpleNamespace(world_size=3, global_rank=1)
    train = dm.train_dataloader().sampler
    assert isinstance(train, DistributedSampler)
    assert (train.num_replicas, train.rank, train.shuffle, train.drop_last) == (3, 1, True, False)
    val = dm.val_dataloader()
    assert list(val.sampler) == list(range(1, 64, 3))  # 21 of 64 clips, no padding
    ids = [i for b in val for i in b["ids"]]
    assert ids == FeatureStore(demo_store).split("valid").ids[1::3]


def test_preload_serves_the_same_batches(demo_store: Path) -> None:
    a = next(iter(EMIDataModule(str(demo_store), batch_size=64).val_dataloader()))
    dm = EMIDataModule(str(demo_store), batch_size=64, preload=True)
    b = next(iter(dm.val_dataloader()))
    assert dm.dataset("valid").view._preloaded
    for m in a["features"]:
        assert torch.equal(a["features"][m], b["features"][m])


@pytest.mark.parametrize("targets", [["Valence"], [f"E{k}" for k in range(7)]])
def test_other_numbers_of_targets(tmp_path: Path, targets: list[str]) -> None:
    store = synth(tmp_path / "s", counts={"train": 12, "valid": 8}, targets=targets)
    dm = EMIDataModule(str(store), batch_size=5, predict_split=None)
    assert dm.num_targets == len(targets) and dm.targets == targets
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (5, len(targets))


def test_text_only_store(tmp_path: Path) -> None:
    store = synth(tmp_path / "s", counts={"train": 40, "valid": 20, "test": 6},
                  dims={"text": 16})
    dm = EMIDataModule(str(store), batch_size=64)
    assert dm.dims == {"text": 16}
    batch = next(iter(dm.val_dataloader()))
    assert list(batch["features"]) == ["text"] and batch["features"]["text"].shape == (20, 128, 16)
    # text is the only modality here, so synth keeps every clip's text (no clip may be empty)
    view = FeatureStore(store).split("train")
    assert view.present("text").all()
