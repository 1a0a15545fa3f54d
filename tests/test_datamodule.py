"""EMIDataModule: plans, compact batches, their expansion to the contract, samplers, targets."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from emimimic.data import expand_batch
from emimimic.data.datamodule import (
    EMIDataModule,
    EvalShardSampler,
    FeatureDataset,
    batch_buffers,
    expand_rows,
    is_plan,
    pass_batch,
)
from emimimic.data.store import FeatureStore, StoreError, pool_reference
from emimimic.data.synth import synth


def collect(loader) -> list[dict]:
    return list(loader)


def arrays_in(obj) -> list:
    """Returns every numpy array and tensor inside a (nested) batch."""
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in arrays_in(v)]
    if isinstance(obj, list | tuple):
        return [a for v in obj for a in arrays_in(v)]
    return [obj] if isinstance(obj, np.ndarray | torch.Tensor) else []


def check_plan(plan: dict, view, rows: list[int]) -> None:
    """Asserts a plan names clips ``rows`` of ``view`` and carries no feature bytes."""
    assert is_plan(plan) and "rows" not in plan and "features" not in plan
    assert plan["split"] == view.name and plan["indices"].tolist() == rows
    found = arrays_in(plan)
    assert found and not any(isinstance(a, torch.Tensor) for a in found)
    assert not any(a.dtype == np.float16 for a in found)
    # indices, lengths, present, target: a few bytes per clip, whatever D is
    assert sum(a.nbytes for a in found) <= len(rows) * (8 + 9 * len(plan["lengths"]) + 4 * 6)
    assert len(pickle.dumps(plan)) < 1000 + 150 * len(rows)


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
    plans = collect(dm.val_dataloader())
    assert [len(b["ids"]) for b in plans] == [24, 24, 16]  # nothing dropped
    ids = [i for b in plans for i in b["ids"]]
    assert ids == view.ids
    start = 0
    for plan in plans:
        n = len(plan["ids"])
        rows = list(range(start, start + n))
        check_plan(plan, view, rows)
        # the Trainer's order: on_before_batch_transfer (read), transfer, on_after (expand)
        b = dm.on_before_batch_transfer(plan, 0)
        assert set(b["rows"]) == set(b["lengths"]) == set(b["present"]) == {"visual", "audio",
                                                                            "text"}
        check_compact(b, view, rows, dm.dims)
        e = dm.on_after_batch_transfer(b, 0)
        assert set(e) == {"features", "present", "target", "ids"} and e["ids"] == b["ids"]
        bare = dm.prepare_batch(plan, "cpu")
        assert set(bare) == set(e) and bare["ids"] == e["ids"]
        for m, dim in dm.dims.items():
            x = e["features"][m]
            assert x.dtype == torch.float16 and x.shape == (n, 128, dim)
            np.testing.assert_array_equal(x.numpy().view(np.uint16),
                                          view.read_batch(m, rows).view(np.uint16))
            assert torch.equal(bare["features"][m].view(torch.int16), x.view(torch.int16))
            assert torch.equal(bare["present"][m], e["present"][m])
            p = e["present"][m]
            assert p.dtype == torch.bool and p.tolist() == view.present(m)[start:start + n].tolist()
            assert not x[~p].any() and (b["lengths"][m] > 0).tolist() == p.tolist()
        assert e["target"].dtype == torch.float32 and e["target"].shape == (n, 6)
        np.testing.assert_array_equal(e["target"].numpy(), view.labels[start:start + n])
        assert torch.equal(bare["target"], e["target"])
        start += n
    assert any(not b["present"]["text"].all() for b in plans)  # the demo has silent clips


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
    for plan in batches:
        order = [lookup[i] for i in plan["ids"]]
        check_plan(plan, train, order)
        check_compact(dm.read_plan(plan), train, order, dm.dims)
        e = dm.prepare_batch(plan)
        np.testing.assert_array_equal(e["target"].numpy(), train.labels[order])
        for m in dm.dims:
            assert e["present"][m].tolist() == train.present(m)[order].tolist()
            for k, i in enumerate(order):
                np.testing.assert_array_equal(e["features"][m][k].numpy().view(np.uint16),
                                              train.read(m, i).view(np.uint16))


def test_predict_on_unlabelled_split_has_no_target(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    batches = collect(dm.predict_dataloader())
    assert all("target" not in b for b in batches)
    assert [i for b in batches for i in b["ids"]] == FeatureStore(demo_store).split("test").ids


def test_dims_and_targets_known_after_init(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), modalities=["text", "audio"])
    assert dm.dims == {"text": 64, "audio": 48}
    assert dm.targets[4] == "Excitement" and dm.num_targets == 6
    batch = dm.read_plan(next(iter(dm.val_dataloader())))
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
    plan = data.__getitems__([5])
    assert sample["ids"] == plan["ids"][0]
    assert sample["features"]["text"].shape == (128, 64)
    np.testing.assert_array_equal(sample["features"]["text"].numpy(), data.view.read("text", 5))
    np.testing.assert_array_equal(sample["target"].numpy(), plan["target"][0])
    assert sample["target"].dtype == torch.float32


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
    plain = EMIDataModule(str(demo_store), batch_size=64)
    a = plain.read_plan(next(iter(plain.val_dataloader())))
    dm = EMIDataModule(str(demo_store), batch_size=64, preload=True)
    b = dm.read_plan(next(iter(dm.val_dataloader())))
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
    features = dm.prepare_batch(batch)["features"]
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
    b = data.read_plan(data.__getitems__(order))
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


def test_batch_transfer_hooks_give_the_contract(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    view = FeatureStore(demo_store).split("valid")
    compact = dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert dm.on_before_batch_transfer(compact, 0) is compact  # only plans are read
    batch = dm.on_after_batch_transfer(compact, 0)
    assert set(batch) == {"features", "present", "target", "ids"}
    for m, dim in dm.dims.items():
        assert batch["features"][m].shape == (16, 128, dim)
        np.testing.assert_array_equal(batch["features"][m].numpy(), view.read_batch(m, range(16)))
        assert torch.equal(batch["present"][m], torch.from_numpy(view.present(m)[:16]))


def expected_ranges(view, m: str, indices) -> list[tuple[int, int]]:
    """Byte ranges of clips ``indices`` of ``m`` per the index: sorted, touching ones merged."""
    index = np.load(view.root / view.name / f"{m}.index.npy")
    spans = sorted({(int(index[i, 0]), int(index[i, 0] + index[i, 1])) for i in indices
                    if index[i, 1] > 0})
    merged: list[list[int]] = []
    for a, b in spans:
        if merged and merged[-1][1] == a:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    row = view.dims[m] * 2
    return [(a * row, (b - a) * row) for a, b in merged]


def test_planning_advises_the_kernel_of_the_clips_byte_ranges(
        demo_store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    view = FeatureStore(demo_store).split("train")
    calls: list[tuple[str, int, int, int]] = []

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", record)
    order = [40, 3, 41, 90, 2, 3] + np.flatnonzero(~view.present("text"))[:2].tolist()
    FeatureDataset(view, ["text", "audio"], prefetch=True).__getitems__(order)
    expected = [(f"{m}.f16", off, n, os.POSIX_FADV_WILLNEED)
                for m in ("text", "audio") for off, n in expected_ranges(view, m, order)]
    assert calls == expected
    assert len(expected_ranges(view, "audio", order)) < len(set(order))  # 2-3, 40-41 merge
    calls.clear()
    FeatureDataset(view, ["text"]).__getitems__(order)  # default: only inside workers
    FeatureDataset(view, ["text"], prefetch=False).__getitems__(order)
    assert calls == []


def test_workers_prefetch_and_the_main_process_reads(
        demo_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "advice.log"

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        with open(log, "a") as f:  # the worker is a forked process: tell the test through a file
            f.write(f"{os.getpid()} {offset} {length} {advice}\n")

    monkeypatch.setattr(os, "posix_fadvise", record)
    view = FeatureStore(demo_store).split("valid")
    data = FeatureDataset(view, ["visual"])
    loader = DataLoader(data, batch_size=10, num_workers=2, collate_fn=pass_batch,
                        multiprocessing_context="fork")
    plans = list(loader)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert {int(p) for p, *_ in lines} - {os.getpid()} and all(int(p) != os.getpid()
                                                                for p, *_ in lines)
    got = sorted((int(o), int(n)) for _, o, n, _ in lines)
    assert got == sorted(r for p in plans
                         for r in expected_ranges(view, "visual", p["indices"].tolist()))
    assert all(int(a) == os.POSIX_FADV_WILLNEED for *_, a in lines)
    assert not data.view._files  # the main process opened nothing yet: workers only advised
    for plan in plans:
        check_plan(plan, view, plan["indices"].tolist())
        b = data.read_plan(plan)
        check_compact(b, view, plan["indices"].tolist(), {"visual": data.view.dims["visual"]})


def test_datasets_pickle_without_open_files_or_maps(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=8)
    data = dm.dataset("valid")
    data.prefetch = True
    compact = data.read_plan(data.__getitems__([0, 5, 9]))
    data.view.read("text", 3)  # memory maps too
    assert data.view._files and data.view._maps
    clone = pickle.loads(pickle.dumps(data))
    assert clone.view._files == {} and clone.view._maps == {}
    again = clone.read_plan(clone.__getitems__([0, 5, 9]))
    for m in dm.dims:
        assert torch.equal(again["rows"][m].view(torch.int16), compact["rows"][m].view(torch.int16))
    assert data.view._files  # the original keeps its own


def test_a_plan_is_read_only_by_its_split(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=8, modalities=["text"])
    plan = next(iter(dm.val_dataloader()))
    with pytest.raises(StoreError, match=r"split 'valid' cannot be read from split 'train'"):
        dm.dataset("train").read_plan(plan)
    other = EMIDataModule(str(demo_store), batch_size=8, modalities=["audio"])
    with pytest.raises(StoreError, match=r"the plan holds modalities \['text'\]"):
        other.dataset("valid").read_plan(plan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning and transfers need a GPU")
def test_prepare_batch_pins_and_moves_to_the_gpu(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16, pin_memory=True)
    plan = next(iter(dm.val_dataloader()))
    assert all(t.is_pinned() for t in dm.read_plan(plan)["rows"].values())
    batch = dm.prepare_batch(plan, "cuda")
    view = FeatureStore(demo_store).split("valid")
    for m in dm.dims:
        assert batch["features"][m].device.type == "cuda"
        np.testing.assert_array_equal(batch["features"][m].cpu().numpy(),
                                      view.read_batch(m, range(16)))


def test_batch_buffers_are_disjoint_views_of_one_allocation() -> None:
    shapes = [(3, 5), (0, 7), (10, 4096), (1, 1)]
    bufs = batch_buffers(shapes)
    assert [tuple(b.shape) for b in bufs] == shapes
    assert all(b.dtype == torch.float16 and b.is_contiguous() for b in bufs)
    base = bufs[0].untyped_storage().data_ptr()
    assert all(b.untyped_storage().data_ptr() == base for b in bufs)  # one allocation
    spans = sorted((b.data_ptr(), b.data_ptr() + b.numel() * 2) for b in bufs if b.numel())
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no overlap
    assert all((s - base) % 64 == 0 for s, _ in spans)  # cache-line offsets
    for k, b in enumerate(bufs):
        b.fill_(k)
    assert [b.unique().tolist() for b in bufs if b.numel()] == [[0.0], [2.0], [3.0]]
