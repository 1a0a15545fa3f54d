"""LightningDataModule serving feature-store splits as :mod:`emimimic.data.batches`.

The DataLoaders yield :class:`~emimimic.data.batches.BatchPlan` s; ``on_before_batch_transfer``
reads each into a :class:`~emimimic.data.batches.FeatureBatch` in the main process (positional
reads straight from the page cache into one fresh buffer; a worker that read them would have to
write them into shared memory and the main process would pay for them again). **A bare PyTorch
loop over these loaders calls** ``batch = datamodule.prepare_batch(plan, device)`` **itself.**

With ``preload="device"`` a split's rows are put on the training device once and batches are
gathered there, with no DataLoader workers and no host round trip.

Samplers are built here because exact whole-split Pearson needs every clip exactly once: under
DDP the evaluation loaders give rank r the clips r, r + W, r + 2W, ... without the padding that
``DistributedSampler`` adds. Run the Trainer with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch.utils.data import DataLoader, Dataset, Sampler

from emimimic.data.batches import BatchPlan, FeatureBatch
from emimimic.data.pooling import windows
from emimimic.data.store import FeatureStore, SplitView, StoreError

#: Where a split's rows are read from: the store's files, RAM, or the training device.
Preload = Literal["none", "ram", "device"]


def batch_buffers(shapes: Sequence[tuple[int, int]], pin_memory: bool = False
                  ) -> list[torch.Tensor]:
    """Returns uninitialised float16 [R, D] tensors of the given shapes, views of ONE allocation.

    One allocation per batch rather than one per modality matters on the CPU: glibc returns a
    large free block at the top of its heap to the kernel once it exceeds twice the largest block
    it ever mapped, so several modality-sized buffers freed together are unmapped and every later
    batch faults its pages in again (measured 2-3x slower reads per paper-dims batch); a single
    block is reused in place. ``pin_memory`` takes page-locked memory from torch's caching host
    allocator instead. Offsets are rounded up to 64 bytes (a cache line).
    """
    sizes = [rows * dim * 2 for rows, dim in shapes]
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-size // 64) * 64
    if pin_memory:
        flat = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    else:
        flat = torch.from_numpy(np.empty(total, dtype=np.uint8))
    return [flat[o:o + n].view(torch.float16).view(shape)
            for o, n, shape in zip(offsets, sizes, shapes, strict=True)]


def _batch(rows: dict[str, torch.Tensor], plan: BatchPlan, device: torch.device) -> FeatureBatch:
    """Returns the FeatureBatch of ``plan`` with ``rows``, its small tensors on ``device``."""
    lengths = {m: torch.as_tensor(c) for m, c in plan.lengths.items()}
    batch = FeatureBatch(rows=rows, lengths=lengths,
                         target=None if plan.target is None else torch.as_tensor(plan.target),
                         ids=list(plan.ids), windows={m: windows(n) for m, n in lengths.items()})
    return batch if device.type == "cpu" else batch.to(device)


class FeatureDataset(Dataset):
    """Map-style dataset over a store split: ``__getitems__`` plans batches, ``read`` reads them.

    Args:
        view: the split.
        modalities: the modalities to serve, in order.
        prefetch: ask the kernel to bring each planned batch's bytes into the page cache
            (:meth:`SplitView.prefetch`). None (default) does so only inside DataLoader workers,
            which plan batches ahead of the main process's reads; in the main process the read
            follows at once, and on a warm cache the advice costs ~10% of the read for nothing.
    """

    def __init__(self, view: SplitView, modalities: Sequence[str],
                 prefetch: bool | None = None) -> None:
        self.view = view
        self.modalities = list(modalities)
        self.prefetch = prefetch
        self.stored = {m: view.stored_rows(m) for m in self.modalities}

    def __len__(self) -> int:
        return len(self.view)

    def __getitems__(self, indices: Sequence[int]) -> BatchPlan:
        """Returns the plan of a batch of clips ``indices``; reads no feature bytes."""
        idx = np.asarray(indices, dtype=np.int64)
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = torch.utils.data.get_worker_info() is not None
        if prefetch:
            self.view.prefetch(self.modalities, idx)
        labels = self.view.labels
        return BatchPlan(split=self.view.name, indices=idx,
                         lengths={m: self.stored[m][idx] for m in self.modalities},
                         target=None if labels is None else labels[idx],
                         ids=[self.view.ids[i] for i in idx.tolist()])

    def __getitem__(self, i: int) -> FeatureBatch:
        """Returns clip ``i`` as a one-clip batch."""
        return self.read(self.__getitems__([i]))

    def _check(self, plan: BatchPlan) -> None:
        if plan.split != self.view.name:
            raise StoreError(f"{self.view.folder}: a plan of split {plan.split!r} cannot be read "
                             f"from split {self.view.name!r}")
        unknown = [m for m in plan.lengths if m not in self.stored]
        if unknown:
            raise StoreError(f"{self.view.folder}: the plan holds modalities {unknown}, this "
                             f"dataset serves {self.modalities}")

    def read(self, plan: BatchPlan, pin_memory: bool = False) -> FeatureBatch:
        """Returns the batch of a plan: its clips' stored rows read into fresh tensors (CPU).

        Args:
            plan: a plan from :meth:`__getitems__` of this split.
            pin_memory: allocate the rows in page-locked memory (needs a GPU), for faster and
                asynchronous host-to-device copies.

        Raises:
            StoreError: the plan is of another split or holds modalities this dataset does not
                serve.
        """
        self._check(plan)
        shapes = {m: (int(c.sum()), self.view.dims[m]) for m, c in plan.lengths.items()}
        rows = dict(zip(shapes, batch_buffers(list(shapes.values()), pin_memory), strict=True))
        for m, out in rows.items():
            self.view.read_rows(m, plan.indices, out=out.numpy())
        return _batch(rows, plan, torch.device("cpu"))


class ResidentSplit:
    """A split's stored rows held on one device; batches are gathered there.

    Args:
        data: the split's dataset (for its view, modalities and plan checks).
        device: where to put the rows (a GPU, or the CPU for the same code path in tests).
    """

    def __init__(self, data: FeatureDataset, device: torch.device) -> None:
        self.data = data
        self.device = device
        view = data.view
        self.rows = {m: torch.from_numpy(view.all_rows(m)).to(device) for m in data.modalities}
        self.starts = {m: torch.from_numpy(view.row_starts(m)).to(device)
                       for m in data.modalities}

    def nbytes(self) -> int:
        """Returns the bytes of feature rows held on the device."""
        return sum(r.numel() * r.element_size() for r in self.rows.values())

    def read(self, plan: BatchPlan) -> FeatureBatch:
        """Returns the batch of ``plan`` with every tensor on the device."""
        self.data._check(plan)
        idx = torch.from_numpy(plan.indices).to(self.device)
        rows = {}
        for m, count in plan.lengths.items():
            total = int(count.sum())  # known on the host: no device synchronisation
            lengths = torch.from_numpy(count).to(self.device)
            clip = torch.repeat_interleave(torch.arange(len(count), device=self.device), lengths,
                                           output_size=total)
            offset = torch.cumsum(lengths, 0) - lengths
            row = self.starts[m][idx][clip] + torch.arange(total, device=self.device) - offset[clip]
            rows[m] = self.rows[m].index_select(0, row)
        return _batch(rows, plan, self.device)


def run_seed() -> int:
    """Returns the run's seed: what ``seed_everything`` (``--seed_everything``) set, else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def epoch_seed(seed: int, epoch: int, offset: int = 0) -> int:
    """Returns the seed of one epoch's randomness, a function of the run's seed and epoch only."""
    return (seed * 1_000_003 + epoch * 7919 + offset) % 2**63


class EpochShuffle(Sampler[int]):
    """A fresh permutation of the split every epoch, drawn from (seed, epoch) only.

    So a run resumed at epoch e sees the order the uninterrupted run saw (``RandomSampler`` draws
    from the global generator, and Lightning builds the first iterator of a resumed run before it
    tells samplers the epoch). Under DDP rank r takes every W-th index of the permutation, padded
    by repeating its start to a multiple of W, as ``DistributedSampler`` does.

    Args:
        size: clips in the split.
        epoch: returns the current epoch when an epoch's iteration starts.
        num_replicas: DDP world size.
        rank: this process's rank.
    """

    def __init__(self, size: int, epoch: Callable[[], int], num_replicas: int = 1,
                 rank: int = 0) -> None:
        self.size, self.epoch, self.num_replicas, self.rank = size, epoch, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(run_seed(), self.epoch()))
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.num_replicas > 1:
            order += order[: len(self) * self.num_replicas - self.size]
            order = order[self.rank::self.num_replicas]
        return iter(order)

    def __len__(self) -> int:
        return -(-self.size // self.num_replicas)


class EvalShardSampler(Sampler[int]):
    """Gives rank ``rank`` of ``num_replicas`` the indices rank, rank + W, ... without padding.

    Over all ranks every index appears exactly once, so metrics over the whole split stay exact
    (ranks may get one sample more or less than each other).
    """

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.num_replicas))


def _pass(plan: BatchPlan) -> BatchPlan:
    """Returns the plan ``FeatureDataset.__getitems__`` already built (collation is done there)."""
    return plan


class EMIDataModule(L.LightningDataModule):
    """Serves a feature store's splits as batches (see the module docstring).

    ``dims``, ``targets`` and ``num_targets`` are known right after construction (read from the
    store's manifest), so a CLI can link them into the model. A split is opened, and must exist,
    only when a stage uses it.

    Args:
        store: path of the feature store.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes; they plan batches and prefetch their bytes into
            the page cache, the main process reads them.
        modalities: modalities to serve; None serves all modalities in the store.
        train_split: split for fitting.
        val_split: split for validation (during fit and ``validate``).
        test_split: split for ``test``.
        predict_split: split for ``predict``; may be unlabelled.
        preload: ``"none"`` reads rows from the store's files on demand (works when the store is
            larger than RAM); ``"ram"`` reads the used splits into RAM first; ``"device"`` puts
            them on the training device (a GPU) and gathers batches there, without workers.
        pin_memory: read batches into page-locked memory (faster, asynchronous host-to-GPU
            copies; ignored without a GPU).
    """

    def __init__(self, store: str, batch_size: PositiveInt = 32, num_workers: NonNegativeInt = 0,
                 modalities: list[str] | None = None, train_split: str = "train",
                 val_split: str = "valid", test_split: str = "valid",
                 predict_split: str = "test", preload: Preload = "none",
                 pin_memory: bool = False) -> None:
        super().__init__()
        if batch_size < 1 or num_workers < 0:
            raise StoreError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size} "
                             f"and {num_workers}")
        if preload not in ("none", "ram", "device"):
            raise StoreError(f"preload={preload!r}; expected 'none', 'ram' or 'device'")
        self.save_hyperparameters()
        self.store = FeatureStore(store)
        if modalities is None:
            modalities = list(self.store.dims)
        unknown = [m for m in modalities if m not in self.store.dims]
        if unknown or not modalities:
            raise StoreError(f"{store}: modalities {unknown or modalities} not in the store "
                             f"(it has {list(self.store.dims)})")
        self.modalities = list(modalities)
        self.split_names = {"fit": train_split, "validate": val_split, "test": test_split,
                            "predict": predict_split}
        self.batch_size = batch_size
        self.num_workers = 0 if preload == "device" else num_workers
        self.preload = preload
        self.pin_memory = pin_memory
        #: modality -> feature dimension D of the served modalities.
        self.dims: dict[str, int] = {m: self.store.dims[m] for m in self.modalities}
        #: target names, in label-column order.
        self.targets: list[str] = list(self.store.targets)
        self._datasets: dict[str, FeatureDataset] = {}
        self._resident: dict[str, ResidentSplit] = {}

    @property
    def num_targets(self) -> int:
        """Returns the number of targets K."""
        return len(self.targets)

    @property
    def predict_ids(self) -> list[str]:
        """Returns the clip ids of the predict split: what a submission needs."""
        return list(self.store.split(self.split_names["predict"]).ids)

    def stage_splits(self, stage: str) -> list[str]:
        """Returns the splits a Trainer stage reads (``fit`` also validates)."""
        if stage == "fit":
            return [self.split_names["fit"], self.split_names["validate"]]
        return [self.split_names[stage]]

    def dataset(self, split: str) -> FeatureDataset:
        """Returns the (cached) dataset of a split, preloading it into RAM when asked to."""
        if split not in self._datasets:
            view = self.store.split(split)
            if self.preload == "ram":
                view.preload(self.modalities)
            self._datasets[split] = FeatureDataset(view, self.modalities)
        return self._datasets[split]

    def setup(self, stage: str) -> None:
        """Opens the splits the stage needs (a missing one is an error naming the store)."""
        for name in self.stage_splits(stage):
            self.dataset(name)
            if self.preload == "device" and self.trainer is not None:
                self.resident(name, self.trainer.strategy.root_device)

    def resident(self, split: str, device: torch.device) -> ResidentSplit:
        """Returns the split's rows on ``device`` (put there on first use)."""
        held = self._resident.get(split)
        if held is None or held.device != device:
            held = self._resident[split] = ResidentSplit(self.dataset(split), device)
        return held

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, stage: str, sampler: Sampler[int] | None = None) -> DataLoader:
        data = self.dataset(self.split_names[stage])
        if sampler is None:
            world, rank = self._world()
            sampler = EvalShardSampler(len(data), world, rank)
        # no pin_memory here: plans hold no tensors; read() allocates pinned rows itself. Workers
        # draw their seeds from their own generator, so the global one (dropout) is left alone.
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=_pass, drop_last=False,
                          persistent_workers=self.num_workers > 0,
                          generator=torch.Generator().manual_seed(run_seed()))

    def train_dataloader(self) -> DataLoader:
        """Returns the training loader, shuffled per epoch from (seed, epoch); no rows dropped."""
        data = self.dataset(self.split_names["fit"])
        world, rank = self._world()
        return self._loader("fit", EpochShuffle(len(data), self._epoch, world, rank))

    def _epoch(self) -> int:
        return 0 if self.trainer is None else int(self.trainer.current_epoch)

    def val_dataloader(self) -> DataLoader:
        """Returns the validation loader: in order, every clip exactly once across ranks."""
        return self._loader("validate")

    def test_dataloader(self) -> DataLoader:
        """Returns the test loader: in order, every clip exactly once across ranks."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Returns the prediction loader: in order, every clip exactly once across ranks."""
        return self._loader("predict")

    def read(self, plan: BatchPlan, device: torch.device | str | None = None) -> FeatureBatch:
        """Returns the batch of a loader's plan, read in this process.

        Args:
            plan: a plan served by one of this module's loaders.
            device: the device the batch is for; with ``preload="device"`` the batch is gathered
                there, otherwise it is read on the CPU (pinned when ``pin_memory`` is set and
                ``device`` is a GPU) and left for the caller (or Lightning) to move.
        """
        target = torch.device("cpu") if device is None else torch.device(device)
        if self.preload == "device":
            return self.resident(plan.split, target).read(plan)
        pin = self.pin_memory and target.type == "cuda"
        return self.dataset(plan.split).read(plan, pin_memory=pin)

    def on_before_batch_transfer(self, batch: BatchPlan, dataloader_idx: int) -> FeatureBatch:
        """Returns the batch of a loader's plan (:meth:`read`, main process)."""
        return self.read(batch, self.trainer.strategy.root_device)

    def prepare_batch(self, plan: BatchPlan, device: torch.device | str = "cpu") -> FeatureBatch:
        """Returns a loader's plan as a batch on ``device``: what a bare PyTorch loop calls."""
        return self.read(plan, device).to(device)
