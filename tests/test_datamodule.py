"""EMIDataModule: plans, feature batches, preloading (RAM, device), samplers, splits, targets."""

from __future__ import annotations

import gc
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from emimimic.data.batches import BatchPlan, FeatureBatch
from emimimic.data.datamodule import EMIDataModule
from emimimic.data.dataset import FeatureDataset, batch_buffers
from emimimic.data.samplers import EpochShuffle, EvalShardSampler
from emimimic.data.store import FeatureStore, StoreError
from emimimic.data.synth import synth
from emimimic.pooling import windows

MODALITIES = ["visual", "audio", "text"]


def identity(plan: BatchPlan) -> BatchPlan:
    """Collation: ``FeatureDataset.__getitems__`` already built the plan."""
    return plan


@pytest.fixture
def reap_workers() -> Iterator[None]:
    """Shuts down the test's DataLoader workers when it ends, before another test forks more.

    Persistent workers live in a reference cycle; left to a later garbage collection, their
    shutdown can wait out DataLoader's 5 s join timeout per worker inside an unrelated test.
    """
    yield
    gc.collect()


def arrays_in(obj) -> list:
    """Returns every numpy array and tensor inside a (nested) plan."""
    if isinstance(obj, BatchPlan):
        return arrays_in(vars(obj))
    if isinstance(obj, dict):
        return [a for v in obj.values() for a in arrays_in(v)]
    if isinstance(obj, list | tuple):
        return [a for v in obj for a in arrays_in(v)]
    return [obj] if isinstance(obj, np.ndarray | torch.Tensor) else []


def check_plan(plan: BatchPlan, view, rows: list[int]) -> None:
    """Asserts a plan names clips ``rows`` of ``view`` and carries no feature bytes."""
    assert isinstance(plan, BatchPlan)
    assert plan.split == view.name and plan.indices.tolist() == rows
    assert plan.ids == [view.ids[i] for i in rows]
    for m, lengths in plan.lengths.items():
        assert lengths.tolist() == view.stored_rows(m)[rows].tolist()
    found = arrays_in(plan)
    assert found and not any(isinstance(a, torch.Tensor) for a in found)
    assert not any(a.dtype == np.float16 for a in found)
    # indices, lengths, target: a few bytes per clip, whatever D is
    assert sum(a.nbytes for a in found) <= len(rows) * (8 + 8 * len(plan.lengths) + 4 * 6)
    assert len(pickle.dumps(plan)) < 1000 + 150 * len(rows)


def check_batch(b: FeatureBatch, view, rows: list[int], dims: dict[str, int]) -> None:
    """Asserts a batch holds exactly the stored rows, lengths, labels and ids of clips ``rows``."""
    assert isinstance(b, FeatureBatch) and b.modalities == list(dims)
    assert b.ids == [view.ids[i] for i in rows] and len(b) == len(rows)
    for m, dim in dims.items():
        lengths = b.lengths[m]
        assert lengths.dtype == torch.int64
        assert lengths.tolist() == view.stored_rows(m)[rows].tolist()
        assert b.present(m).tolist() == view.present(m)[rows].tolist()
        x = b.rows[m]
        assert x.dtype == torch.float16 and x.shape == (int(lengths.sum()), dim)
        data = np.fromfile(view.root / view.name / f"{m}.f16", dtype=np.float16).reshape(-1, dim)
        index = np.load(view.root / view.name / f"{m}.index.npy")
        expected = [data[index[i, 0]:index[i, 0] + index[i, 1]] for i in rows]
        np.testing.assert_array_equal(x.numpy().view(np.uint16),
                                      np.concatenate(expected).view(np.uint16))
    if view.labels is None:
        assert b.target is None
    else:
        assert b.target.dtype == torch.float32
        np.testing.assert_array_equal(b.target.numpy(), view.labels[rows])


def check_dense(b: FeatureBatch, view, rows: list[int]) -> None:
    """Asserts the batch's dense sequences equal the store's pooled reads, bit for bit."""
    for m in b.modalities:
        x = b.dense(m)
        assert x.dtype == torch.float16 and x.shape == (len(rows), 128, view.dims[m])
        np.testing.assert_array_equal(x.numpy().view(np.uint16),
                                      view.read_batch(m, rows).view(np.uint16))


def same_batch(a: FeatureBatch, b: FeatureBatch) -> None:
    """Asserts two batches hold the same rows (bit for bit), lengths, targets and ids."""
    assert a.ids == b.ids and a.modalities == b.modalities
    for m in a.modalities:
        assert torch.equal(a.rows[m].view(torch.int16), b.rows[m].view(torch.int16))
        assert torch.equal(a.lengths[m], b.lengths[m])
    assert (a.target is None) == (b.target is None)
    if a.target is not None:
        assert torch.equal(a.target, b.target)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_validation_batches_follow_the_contract(demo_store: Path, num_workers: int,
                                                reap_workers: None) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=24, num_workers=num_workers)
    dm.setup("fit")
    view = FeatureStore(demo_store).split("valid")
    plans = list(dm.val_dataloader())
    assert [len(p.ids) for p in plans] == [24, 24, 16]  # nothing dropped
    assert [i for p in plans for i in p.ids] == view.ids
    start, absent = 0, 0
    for plan in plans:
        rows = list(range(start, start + len(plan.ids)))
        check_plan(plan, view, rows)
        b = dm.read(plan)
        check_batch(b, view, rows, dm.dims)
        check_dense(b, view, rows)
        same_batch(dm.prepare_batch(plan, "cpu"), b)
        absent += int((~b.present("text")).sum())
        start += len(rows)
    assert absent  # the demo has silent clips


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_shuffles_every_clip_once(demo_store: Path, num_workers: int,
                                               reap_workers: None) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=40, num_workers=num_workers)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochShuffle)
    plans = list(loader)
    ids = [i for p in plans for i in p.ids]
    train = FeatureStore(demo_store).split("train")
    assert sorted(ids) == train.ids and ids != train.ids
    assert [len(p.ids) for p in plans] == [40, 40, 16]
    for plan in plans:
        order = plan.indices.tolist()
        check_plan(plan, train, order)
        check_batch(dm.read(plan), train, order, dm.dims)


def test_shuffled_batch_with_repeats_and_absent_clips_equals_split_reads(
        demo_store: Path) -> None:
    data = EMIDataModule(str(demo_store)).dataset("train")
    silent = np.flatnonzero(~data.view.present("text")).tolist()
    # shuffled, with a repeat, adjacent clips and clips without text (first, middle and last)
    order = [silent[0], 95, 3, 40, 3, 0, silent[-1], 77, 12, 50, 1, 2, silent[1]]
    b = data.read(data.__getitems__(order))
    check_batch(b, data.view, order, {m: data.view.dims[m] for m in MODALITIES})
    check_dense(b, data.view, order)
    assert int((~b.present("text")).sum()) >= 3


def test_batches_carry_the_windows_of_their_lengths(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    b = dm.read(next(iter(dm.val_dataloader())))
    for m in dm.dims:
        expected = windows(b.lengths[m])
        got = b.window(m)
        for name in ("first", "last", "absent", "clip", "weight", "step"):
            assert torch.equal(getattr(got, name), getattr(expected, name)), (m, name)
    lazy = FeatureBatch(rows=b.rows, lengths=b.lengths, target=b.target, ids=b.ids)
    assert lazy.windows is None
    assert torch.equal(lazy.window("text").step, b.window("text").step)
    assert list(lazy.windows) == ["text"]  # computed when first asked for, then kept


def test_on_before_batch_transfer_reads_for_the_trainers_device(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                 world_size=1, global_rank=0)
    plan = next(iter(dm.val_dataloader()))
    b = dm.on_before_batch_transfer(plan, 0)
    view = FeatureStore(demo_store).split("valid")
    check_batch(b, view, list(range(16)), dm.dims)
    moved = b.to("cpu")  # what Lightning's transfer calls
    assert isinstance(moved, FeatureBatch) and moved is not b
    same_batch(moved, b)
    assert torch.equal(moved.window("audio").step, b.window("audio").step)


def test_predict_on_unlabelled_split_has_no_target(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16)
    plans = list(dm.predict_dataloader())
    assert all(p.target is None and dm.read(p).target is None for p in plans)
    ids = FeatureStore(demo_store).split("test").ids
    assert [i for p in plans for i in p.ids] == ids == dm.predict_ids


def test_dims_and_targets_known_after_init(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), modalities=["text", "audio"])
    assert dm.dims == {"text": 64, "audio": 48}
    assert dm.targets[4] == "Excitement" and dm.num_targets == 6
    batch = dm.read(next(iter(dm.val_dataloader())))
    assert batch.modalities == list(batch.lengths) == ["text", "audio"]


def test_missing_split_is_an_error_when_its_stage_starts(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), val_split="dev")  # not checked yet
    message = rf"{demo_store}: split 'dev' not in the store \(it has \['train', 'valid', 'test'\]\)"
    with pytest.raises(StoreError, match=message):
        dm.setup("validate")
    with pytest.raises(StoreError, match=message):
        dm.val_dataloader()
    dm.setup("test")  # the test split (valid) exists


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modalities": ["face", "text"]}, r"modalities \['face'\] not in the store"),
    ({"preload": "gpu"}, r"preload='gpu'; expected 'none', 'ram' or 'device'"),
    ({"batch_size": 0}, r"batch_size must be >= 1"),
])
def test_bad_arguments_are_clear_errors(demo_store: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        EMIDataModule(str(demo_store), **kwargs)


def test_missing_store_is_a_clear_error(demo_store: Path) -> None:
    with pytest.raises(StoreError, match="feature store does not exist"):
        EMIDataModule(str(demo_store.parent / "nothing"))


def test_store_without_test_split_fits_with_the_default_predict_split(tmp_path: Path) -> None:
    store = synth(tmp_path / "s", counts={"train": 12, "valid": 8})
    dm = EMIDataModule(str(store), batch_size=5)
    assert dm.split_names["predict"] == "test"
    dm.setup("fit")
    train = FeatureStore(store).split("train")
    plans = list(dm.train_dataloader())
    assert sorted(i for p in plans for i in p.ids) == train.ids
    assert sum(len(p.ids) for p in dm.val_dataloader()) == 8
    with pytest.raises(StoreError, match=r"split 'test' not in the store"):
        dm.setup("predict")


def test_sample_getitem_is_a_one_clip_batch(demo_store: Path) -> None:
    data = EMIDataModule(str(demo_store)).dataset("valid")
    sample = data[5]
    check_batch(sample, data.view, [5], {m: data.view.dims[m] for m in MODALITIES})
    np.testing.assert_array_equal(sample.dense("text")[0].numpy(), data.view.read("text", 5))


def test_train_order_is_a_function_of_seed_and_epoch_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    epoch = [0]

    def order(seed: str) -> list[int]:
        monkeypatch.setenv("PL_GLOBAL_SEED", seed)
        torch.manual_seed(int(seed) + 99)  # the global generator plays no part
        return list(EpochShuffle(50, lambda: epoch[0]))

    first = order("7")
    assert sorted(first) == list(range(50)) and first != list(range(50))
    assert order("7") == first and order("8") != first
    epoch[0] = 1
    assert order("7") != first


@pytest.mark.parametrize("size", [0, 1, 10, 11, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_sampler_gives_every_index_exactly_once(size: int, world: int) -> None:
    shards = [list(EvalShardSampler(size, world, rank)) for rank in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(size))
    assert [len(EvalShardSampler(size, world, r)) for r in range(world)] == [len(s) for s in shards]


def test_samplers_under_ddp(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=8)
    shards = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, current_epoch=0)
        train = dm.train_dataloader().sampler
        assert isinstance(train, EpochShuffle) and (train.num_replicas, train.rank) == (3, rank)
        shards.append(list(train))
    assert [len(s) for s in shards] == [32, 32, 32]  # 96 clips, nothing dropped or padded
    assert sorted(i for s in shards for i in s) == list(range(96))
    dm.trainer = SimpleNamespace(world_size=3, global_rank=1, current_epoch=0)
    val = dm.val_dataloader()
    assert list(val.sampler) == list(range(1, 64, 3))  # 21 of 64 clips, no padding
    ids = [i for p in val for i in p.ids]
    assert ids == FeatureStore(demo_store).split("valid").ids[1::3]


def test_preload_ram_serves_the_same_batches(demo_store: Path) -> None:
    plain = EMIDataModule(str(demo_store), batch_size=64)
    dm = EMIDataModule(str(demo_store), batch_size=64, preload="ram")
    plan = next(iter(dm.val_dataloader()))
    assert set(dm.dataset("valid").view._preloaded) == set(MODALITIES)
    same_batch(dm.read(plan), plain.read(plan))


def test_preload_device_on_the_cpu_equals_the_normal_path(demo_store: Path) -> None:
    plain = EMIDataModule(str(demo_store), batch_size=24)
    dm = EMIDataModule(str(demo_store), batch_size=24, preload="device", num_workers=2)
    assert dm.num_workers == 0 and dm.val_dataloader().num_workers == 0
    data = plain.dataset("train")
    silent = np.flatnonzero(~data.view.present("text")).tolist()
    orders = [[silent[0], 95, 3, 40, 3, 0, silent[-1], 77, 12, 1, 2], [silent[1]], list(range(96))]
    for order in orders:
        plan = data.__getitems__(order)
        got = dm.read(plan, "cpu")
        same_batch(got, plain.read(plan))
        for m in MODALITIES:
            assert torch.equal(got.window(m).step, windows(got.lengths[m]).step)
        same_batch(dm.prepare_batch(plan, "cpu"), got)
    assert dm._resident["train"].nbytes() == sum(r.nbytes for r in
                                                 map(data.view.all_rows, MODALITIES))
    other = plain.dataset("valid").__getitems__([0, 1])
    with pytest.raises(StoreError, match=r"split 'valid' cannot be read from split 'train'"):
        dm.resident("train", torch.device("cpu")).read(other)


class BatchRecorder(L.LightningModule):
    """Records the batches a Trainer hands to ``validation_step``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.batches: list[FeatureBatch] = []

    def validation_step(self, batch: FeatureBatch, batch_idx: int) -> None:
        self.batches.append(batch)


def test_preload_device_under_a_cpu_trainer_equals_the_normal_path(demo_store: Path) -> None:
    batches = {}
    for preload in ("none", "device"):
        dm = EMIDataModule(str(demo_store), batch_size=24, preload=preload)
        recorder = BatchRecorder()
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, use_distributed_sampler=False
                  ).validate(recorder, datamodule=dm, verbose=False)
        batches[preload] = recorder.batches
        assert bool(dm._resident) == (preload == "device")
    assert [len(b) for b in batches["device"]] == [24, 24, 16]
    for a, b in zip(batches["none"], batches["device"], strict=True):
        same_batch(a, b)


@pytest.mark.parametrize("targets", [["Valence"], [f"E{k}" for k in range(7)]])
def test_other_numbers_of_targets(tmp_path: Path, targets: list[str]) -> None:
    store = synth(tmp_path / "s", counts={"train": 12, "valid": 8}, targets=targets)
    dm = EMIDataModule(str(store), batch_size=5)
    assert dm.num_targets == len(targets) and dm.targets == targets
    batch = dm.read(next(iter(dm.train_dataloader())))
    assert batch.target.shape == (5, len(targets))


def test_text_only_store(tmp_path: Path) -> None:
    store = synth(tmp_path / "s", counts={"train": 40, "valid": 20, "test": 6},
                  dims={"text": 16})
    dm = EMIDataModule(str(store), batch_size=64)
    assert dm.dims == {"text": 16}
    batch = dm.prepare_batch(next(iter(dm.val_dataloader())))
    assert batch.modalities == ["text"] and batch.dense("text").shape == (20, 128, 16)
    # text is the only modality here, so synth keeps every clip's text (no clip may be empty)
    assert FeatureStore(store).split("train").present("text").all()


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
        demo_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        reap_workers: None) -> None:
    log = tmp_path / "advice.log"

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        with open(log, "a") as f:  # the worker is a forked process: tell the test through a file
            f.write(f"{os.getpid()} {offset} {length} {advice}\n")

    monkeypatch.setattr(os, "posix_fadvise", record)
    view = FeatureStore(demo_store).split("valid")
    data = FeatureDataset(view, ["visual"])
    loader = DataLoader(data, batch_size=10, num_workers=2, collate_fn=identity,
                        multiprocessing_context="fork")
    plans = list(loader)
    lines = [line.split() for line in log.read_text().splitlines()]
    assert lines and all(int(p) != os.getpid() for p, *_ in lines)
    got = sorted((int(o), int(n)) for _, o, n, _ in lines)
    assert got == sorted(r for p in plans
                         for r in expected_ranges(view, "visual", p.indices.tolist()))
    assert all(int(a) == os.POSIX_FADV_WILLNEED for *_, a in lines)
    assert not data.view._files  # the main process opened nothing yet: workers only advised
    for plan in plans:
        check_plan(plan, view, plan.indices.tolist())
        check_batch(data.read(plan), view, plan.indices.tolist(),
                    {"visual": view.dims["visual"]})


def test_datasets_pickle_without_open_files(demo_store: Path) -> None:
    data = EMIDataModule(str(demo_store), batch_size=8).dataset("valid")
    data.prefetch = True
    batch = data.read(data.__getitems__([0, 5, 9]))
    assert data.view._files
    clone = pickle.loads(pickle.dumps(data))
    assert clone.view._files == {}
    same_batch(clone.read(clone.__getitems__([0, 5, 9])), batch)
    assert data.view._files  # the original keeps its own


def test_a_plan_is_read_only_by_its_split_and_modalities(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=8, modalities=["text"])
    plan = next(iter(dm.val_dataloader()))
    with pytest.raises(StoreError, match=r"split 'valid' cannot be read from split 'train'"):
        dm.dataset("train").read(plan)
    other = EMIDataModule(str(demo_store), batch_size=8, modalities=["audio"])
    with pytest.raises(StoreError, match=r"the plan holds modalities \['text'\]"):
        other.dataset("valid").read(plan)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning and transfers need a GPU")
def test_prepare_batch_pins_and_moves_to_the_gpu(demo_store: Path) -> None:
    dm = EMIDataModule(str(demo_store), batch_size=16, pin_memory=True)
    plan = next(iter(dm.val_dataloader()))
    assert all(t.is_pinned() for t in dm.read(plan, "cuda").rows.values())
    batch = dm.prepare_batch(plan, "cuda")
    view = FeatureStore(demo_store).split("valid")
    for m in dm.dims:
        assert batch.rows[m].device.type == "cuda" and batch.window(m).step.device.type == "cuda"
        np.testing.assert_array_equal(batch.dense(m).cpu().numpy(),
                                      view.read_batch(m, range(16)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_preload_device_on_the_gpu_equals_the_normal_path(demo_store: Path) -> None:
    plain = EMIDataModule(str(demo_store), batch_size=24)
    dm = EMIDataModule(str(demo_store), batch_size=24, preload="device")
    plan = plain.dataset("train").__getitems__([5, 3, 90, 3, 0])
    got = dm.read(plan, "cuda")
    assert all(r.device.type == "cuda" for r in got.rows.values())
    same_batch(got.to("cpu"), plain.read(plan))


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
