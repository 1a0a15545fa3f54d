"""EMIDataModule: compact batches, their expansion to the contract, samplers, any targets."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, RandomSampler

from emimimic.data import expand_batch
from emimimic.data.datamodule import EMIDataModule, EvalShardSampler, expand_rows
from emimimic.data.store import FeatureStore, StoreError, pool_reference
from emimimic.data.synth import synth


def collect(loader) -> list[dict]:
    return list(loader)


def check_compact(b: dict, view, rows: list[int], dims: dict[str, int]) -> None:
    """Asserts a compact batch holds exactly the stored rows of clips ``rows`` of ``view``."""
    assert "features" not in b
    for m, dim in dims.items():
        lengths = b["lengths"][m]
        assert lengths.dtype == torch.int64
        assert lengths.tolist() == view.stored_rows(m)[rows].tolist()
        x = b["rows"][m]
        assert x.dtype == torch.float16 and x.shape == (int(lengths.sum()), dim)
        data = np.fromfile(view.root / view.name / f"{m}.f16", dtype=np.float16).reshape(-1, dim)
        index = np.load(view.root / view.name / f"{m}.index.npy")
        expected = [data[index[i, 0]:index[i, 0] + index[i, 1]] for i in rows]
        np.testing.assert_array_equal(x.numpy(), np.concatenate(expected))


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
        rows = list(range(start, start + n))
        assert set(b["rows"]) == set(b["lengths"]) == set(b["present"]) == {"visual", "audio",
                                                                            "text"}
        check_compact(b, view, rows, dm.dims)
        e = expand_batch(b)
        assert "rows" not in e and "lengths" not in e and e["ids"] == b["ids"]
        for m, dim in dm.dims.items():
            x = e["features"][m]
            assert x.dtype == torch.float16 and x.shape == (n, 128, dim)
            np.testing.assert_array_equal(x.numpy().view(np.uint16),
                                          view.read_batch(m, rows).view(np.uint16))
            p = e["present"][m]
            assert p.dtype == torch.bool and p.tolist() == view.present(m)[start:start + n].tolist()
            assert not x[~p].any() and (b["lengths"][m] > 0).tolist() == p.tolist()
        assert e["target"].dtype == torch.float32 and e["target"].shape == (n, 6)
        np.testing.assert_array_equal(e["target"].numpy(), view.labels[start:start + n])
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
    check_compact(b, train, order, dm.dims)
    e = expand_batch(b)
    for m in dm.dims:
        np.testing.assert_array_equal(e["features"][m].numpy(), train.read_batch(m, order))


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
    assert list(batch["rows"]) == list(batch["lengths"]) == ["text", "audio"]
    assert list(expand_batch(batch)["features"]) == ["text", "audio"]


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
    assert sample["features"]["text"].shape == (128, 64)
    np.testing.assert_array_equal(sample["features"]["text"].numpy(), data.view.read("text", 5))
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
    for m in a["rows"]:
        assert torch.equal(a["rows"][m], b["rows"][m])
        assert torch.equal(a["lengths"][m], b["lengths"][m])


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
    features = expand_batch(batch)["features"]
    assert list(features) == ["text"] and features["text"].shape == (20, 128, 16)
    # text is the only modality here, so synth keeps every clip's text (no clip may be empty)
    view = FeatureStore(store).split("train")
    assert view.present("text").all()


def f16_rows(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float16 rows over a wide range of magnitudes and signs, without -0.0 (as stored)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 3, size=shape)
    return torch.from_numpy((x.astype(np.float16).astype(np.float32) + 0.0).astype(np.float16))


@pytest.mark.parametrize("dense", [False, True])
def test_expand_matches_adaptive_pool_for_every_length(dense: bool) -> None:
    lengths = list(range(1, 129))
    clips = [f16_rows(n, (n, 12)) for n in lengths]
    out = expand_rows(torch.cat(clips), torch.tensor(lengths), dense=dense)
    assert out.dtype == torch.float16 and out.shape == (128, 128, 12)
    for n, raw in zip(lengths, clips, strict=True):
        ref = F.adaptive_avg_pool1d(raw.T[None].float(), 128)[0].T.half()
        np.testing.assert_array_equal(out[n - 1].numpy().view(np.uint16),
                                      ref.numpy().view(np.uint16), err_msg=f"L={n}")


@pytest.mark.parametrize("dense", [False, True])
def test_expand_puts_zeros_for_absent_clips_anywhere(dense: bool) -> None:
    lengths = [0, 5, 0, 128, 1, 0]
    clips = [f16_rows(10 + k, (n, 3)) for k, n in enumerate(lengths)]
    out = expand_rows(torch.cat(clips), torch.tensor(lengths), dense=dense)
    for k, n in enumerate(lengths):
        expected = np.zeros((128, 3), np.float16) if n == 0 else pool_reference(clips[k].numpy())
        np.testing.assert_array_equal(out[k].numpy().view(np.uint16), expected.view(np.uint16))
    none = expand_rows(torch.zeros(0, 3, dtype=torch.float16), torch.tensor([0, 0]), dense=dense)
    assert none.shape == (2, 128, 3) and not none.any()


def test_expand_refuses_lengths_that_do_not_fit_the_rows() -> None:
    with pytest.raises(ValueError, match="must sum to the 7 rows"):
        expand_rows(torch.zeros(7, 2, dtype=torch.float16), torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="each at most 128"):
        expand_rows(torch.zeros(130, 2, dtype=torch.float16), torch.tensor([130]))


def test_expand_batch_of_a_shuffled_batch_equals_split_reads(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store))
    data = dm.dataset("train")
    silent = np.flatnonzero(~data.view.present("text")).tolist()
    # shuffled, with a repeat, adjacent clips and clips without text (first, middle and last)
    order = [silent[0], 95, 3, 40, 3, 0, silent[-1], 77, 12, 50, 1, 2, silent[1]]
    b = data.__getitems__(order)
    check_compact(b, data.view, order, dm.dims)
    e = expand_batch(b)
    absent = 0
    for m in dm.dims:
        assert e["present"][m].tolist() == data.view.present(m)[order].tolist()
        for k, i in enumerate(order):
            np.testing.assert_array_equal(e["features"][m][k].numpy().view(np.uint16),
                                          data.view.read(m, i).view(np.uint16))
            absent += not data.view.present(m)[i]
    assert absent >= 3
    assert expand_batch(e) is e  # an expanded batch passes through


def test_on_after_batch_transfer_gives_the_contract(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    view = FeatureStore(demo_store).split("valid")
    compact = next(iter(dm.val_dataloader()))
    batch = dm.on_after_batch_transfer(compact, 0)
    assert set(batch) == {"features", "present", "target", "ids"}
    for m, dim in dm.dims.items():
        assert batch["features"][m].shape == (16, 128, dim)
        np.testing.assert_array_equal(batch["features"][m].numpy(), view.read_batch(m, range(16)))
        assert torch.equal(batch["present"][m], torch.from_numpy(view.present(m)[:16]))
