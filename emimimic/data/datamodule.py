"""LightningDataModule serving feature-store splits: plans, compact batches, expanded on the device.

The model receives the batch contract shared with the network::

    features: dict[str, Tensor]  modality -> [B, 128, D] float16 (absent clips are zero rows)
    present:  dict[str, Tensor]  modality -> [B] bool (False: no data, the rows are not real)
    target:   Tensor [B, K] float32 (labelled splits only)
    ids:      list[str]          clip ids

A batch gets there in three steps:

1. The DataLoaders (in their workers, if any) serve a *plan*: which clips, and what is known about
   them without reading features. It holds no feature bytes, only small numpy arrays::

       split:    str                     the split the indices refer to
       indices:  np.ndarray [B] int64    clip positions in the split
       lengths:  dict[str, np.ndarray]   modality -> [B] int64 stored rows per clip
       present:  dict[str, np.ndarray]   modality -> [B] bool
       target:   np.ndarray [B, K] float32 (labelled splits only)
       ids:      list[str]

   Making it, the dataset asks the kernel to bring the clips' bytes into the page cache
   (:meth:`SplitView.prefetch`, ``posix_fadvise(WILLNEED)``), so workers run ahead of the reads
   and hide disk latency when the store does not fit in RAM, without copying any bytes.
2. In the main process, :meth:`EMIDataModule.read_plan` (Lightning's ``on_before_batch_transfer``)
   reads the stored rows with positional reads into one fresh buffer per modality (page-locked
   when ``pin_memory`` is set and there is a GPU), giving a *compact* batch::

       rows:     dict[str, Tensor]  modality -> [R, D] float16, the stored rows of the batch's
                                    clips back to back (0 rows for an absent clip, 128 pooled rows
                                    for a clip with T > 128, its T raw rows otherwise)
       lengths:  dict[str, Tensor]  modality -> [B] int64, stored rows per clip
       present, target, ids         as in the contract

   Reading in the main process copies each byte once; a worker that read them would have to
   write them into shared memory and the main process would pay for them again.
3. After the host-to-device copy (``on_after_batch_transfer``), :func:`expand_batch` turns the
   compact batch into the contract, bit for bit equal to ``SplitView.read`` (adaptive average
   pooling to 128 steps), on the GPU when there is one.

Under a Lightning ``Trainer`` the hooks do steps 2 and 3. **A bare PyTorch loop over these loaders
must call** ``batch = datamodule.prepare_batch(batch, device)`` **itself** before using
``features``: it reads a plan, moves the batch to ``device`` and expands it.

Samplers are built here because exact whole-split Pearson needs every clip exactly once: under
DDP the evaluation loaders give rank r the clips r, r + W, r + 2W, ... without the padding that
``DistributedSampler`` adds. Run the Trainer with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities import move_data_to_device
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from emimimic.constants import STEPS
from emimimic.data.store import FeatureStore, SplitView, StoreError

Batch = dict[str, Any]


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Returns an uninitialised CPU tensor whose memory numpy allocated.

    numpy advises the kernel to back large arrays with huge pages, so first writes to a fresh
    multi-megabyte buffer fault a few 2 MiB pages instead of thousands of 4 KiB ones (measured
    3-10x faster than ``torch.empty`` for the [B, 128, D] outputs of :func:`expand_rows`).
    """
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


def batch_buffers(shapes: Sequence[tuple[int, int]], pin_memory: bool = False
                  ) -> list[torch.Tensor]:
    """Returns uninitialised float16 [R, D] tensors of the given shapes, views of ONE allocation.

    This is how a compact batch's rows are allocated. One allocation per batch rather than one
    per modality matters on the CPU: glibc returns a large free block at the top of its heap to
    the kernel once it exceeds twice the largest block it ever mapped, so several modality-sized
    buffers freed together are unmapped and every later batch faults its pages in again (measured
    ~1,500 page faults and a 2-3x slower read per paper-dims batch of 32); a single block is
    reused in place. ``pin_memory`` takes page-locked memory from torch's caching host allocator
    instead, which reuses blocks by itself. Offsets are rounded up to 64 bytes (a cache line).
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


def _pool_bins(steps: int = STEPS) -> torch.Tensor:
    """Returns int64 [2, steps + 1, steps]: first and last stored row of each pooling bin.

    Row L describes a clip with L stored rows: adaptive average pooling to ``steps`` bins puts
    rows [floor(i L / S), ceil((i + 1) L / S)) in bin i, which for L <= S is one or two rows.
    L = 0 (absent) gets bins [0, 0], masked to zeros by :func:`expand_batch`.
    """
    length = torch.arange(steps + 1)[:, None]
    i = torch.arange(steps)[None, :]
    first = (i * length) // steps
    last = -((-(i + 1) * length) // steps) - 1  # ceil division, minus one
    return torch.stack([first, last.clamp(min=first)])


#: The constant table behind :func:`expand_batch` (on the CPU; copies per device are cached).
POOL_BINS = _pool_bins()
_BINS_ON: dict[torch.device, torch.Tensor] = {}


def _bins_on(device: torch.device) -> torch.Tensor:
    table = _BINS_ON.get(device)
    if table is None:
        table = _BINS_ON[device] = POOL_BINS.to(device)
    return table


def expand_rows(rows: torch.Tensor, lengths: torch.Tensor, dense: bool | None = None
                ) -> torch.Tensor:
    """Returns [B, 128, D] float16 pooled features from one modality's compact rows.

    Bin i of a clip with L stored rows averages its rows a = floor(i L / 128) and
    b = ceil((i + 1) L / 128) - 1 as ``((rows[a].float() + rows[b].float()) * 0.5).half()``: for
    L = 128 and one-row bins a == b and this is rows[a] exactly (doubling and halving a float16 in
    float32 is exact), for two-row bins it is adaptive pooling's float32 sum divided by two, so the
    result equals ``SplitView.read`` bit for bit. L = 0 gives zeros. Everything is gathered through
    :data:`POOL_BINS` on ``rows.device``, with no loop over clips.

    Args:
        rows: [R, D] float16, the stored rows of B clips back to back.
        lengths: [B] int64 stored rows per clip (on ``rows.device``), summing to R.
        dense: True computes the formula on every bin (no host synchronisation, for GPUs);
            False copies one-row bins and averages only the two-row ones (less work on a CPU).
            None picks False on the CPU, True elsewhere. Both give identical bits.

    Raises:
        ValueError: on the CPU, ``lengths`` do not sum to the number of rows or exceed 128.
    """
    device = rows.device
    batch, dim = lengths.shape[0], rows.shape[1]
    lengths = lengths.to(device=device, dtype=torch.int64)
    if device.type == "cpu" and (int(lengths.sum()) != rows.shape[0]
                                 or (batch and int(lengths.max()) > STEPS)):
        raise ValueError(f"compact batch: lengths {lengths.tolist()} (each at most {STEPS}) must "
                         f"sum to the {rows.shape[0]} rows given")
    if rows.shape[0] == 0:
        return torch.zeros(batch, STEPS, dim, dtype=torch.float16, device=device)
    if dense is None:
        dense = device.type != "cpu"
    bins = _bins_on(device)
    offsets = (torch.cumsum(lengths, 0) - lengths)[:, None]
    limit = rows.shape[0] - 1  # absent clips at the end point one past the last row
    first = (offsets + bins[0][lengths]).clamp_(max=limit).view(-1)
    if dense:
        last = (offsets + bins[1][lengths]).clamp_(max=limit).view(-1)
        acc = rows.index_select(0, first).float()
        acc += rows.index_select(0, last)
        out = acc.mul_(0.5).half()
    else:
        out = _host_empty((first.shape[0], dim), rows.dtype) if device.type == "cpu" else None
        out = torch.index_select(rows, 0, first, out=out)
        two = (bins[1] > bins[0])[lengths].view(-1).nonzero().squeeze(1)
        if two.numel():
            pick = first.index_select(0, two)
            acc = rows.index_select(0, pick).float()
            acc += rows.index_select(0, pick + 1)
            out.index_copy_(0, two, acc.mul_(0.5).half())
    out = out.view(batch, STEPS, dim)
    return out.masked_fill_((lengths == 0)[:, None, None], 0)


def expand_batch(batch: Batch) -> Batch:
    """Returns the batch with compact ``rows``/``lengths`` replaced by pooled ``features``.

    ``features[m]`` is [B, 128, D] float16 on the device of ``rows[m]``, bit for bit what
    ``SplitView.read`` gives for each clip (zeros for absent clips); ``present``, ``target`` and
    ``ids`` pass through. A batch without ``rows`` (already expanded) is returned as it is.

    Under a Lightning ``Trainer`` with :class:`EMIDataModule`, ``on_after_batch_transfer`` calls
    this. A bare PyTorch loop calls :meth:`EMIDataModule.prepare_batch`, which reads the loader's
    plan, moves the compact batch to the device, then calls this (expanding on the device copies
    less over the bus).
    """
    if "rows" not in batch:
        return batch
    out: Batch = {"features": {m: expand_rows(r, batch["lengths"][m])
                               for m, r in batch["rows"].items()}}
    out.update((k, v) for k, v in batch.items() if k not in ("rows", "lengths"))
    return out


def is_plan(batch: Batch) -> bool:
    """Returns True if ``batch`` is a plan (from ``FeatureDataset.__getitems__``, not yet read)."""
    return "indices" in batch


class FeatureDataset(Dataset):
    """Map-style dataset over a store split: ``__getitems__`` plans batches, ``read_plan`` reads.

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
        self.ids = view.ids
        self.labels = view.labels
        self.stored = {m: view.stored_rows(m) for m in self.modalities}
        self.present = {m: self.stored[m] > 0 for m in self.modalities}

    def __len__(self) -> int:
        return len(self.view)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """Returns the plan of a batch of clips ``indices`` (see the module docstring).

        No feature bytes are read or copied: when prefetching, the kernel is only asked to start
        reading them into the page cache (``posix_fadvise(WILLNEED)``), which returns at once.
        """
        idx = np.asarray(indices, dtype=np.int64)
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = torch.utils.data.get_worker_info() is not None
        if prefetch:
            self.view.prefetch(self.modalities, idx)
        plan: Batch = {"split": self.view.name, "indices": idx,
                       "lengths": {m: self.stored[m][idx] for m in self.modalities},
                       "present": {m: self.present[m][idx] for m in self.modalities},
                       "ids": [self.ids[i] for i in idx.tolist()]}
        if self.labels is not None:
            plan["target"] = self.labels[idx]
        return plan

    def read_plan(self, plan: Batch, pin_memory: bool = False) -> Batch:
        """Returns the compact batch of a plan: its clips' stored rows read into fresh tensors.

        Each modality's rows go into a new [R, D] float16 tensor (all of them views of one
        buffer, :func:`batch_buffers`), filled by positional reads (one per run of clips stored
        back to back) straight from the page cache.

        Args:
            plan: a plan from :meth:`__getitems__` of this split.
            pin_memory: allocate the rows in page-locked memory (needs a GPU), for faster and
                asynchronous host-to-device copies.

        Raises:
            StoreError: the plan is of another split or holds modalities this dataset does not
                serve.
        """
        where = self.view.root / self.view.name
        if plan["split"] != self.view.name:
            raise StoreError(f"{where}: a plan of split {plan['split']!r} cannot be read from "
                             f"split {self.view.name!r}")
        unknown = [m for m in plan["lengths"] if m not in self.stored]
        if unknown:
            raise StoreError(f"{where}: the plan holds modalities {unknown}, this dataset serves "
                             f"{self.modalities}")
        idx = plan["indices"]
        shapes = {m: (int(c.sum()), self.view.dims[m]) for m, c in plan["lengths"].items()}
        rows = dict(zip(shapes, batch_buffers(list(shapes.values()), pin_memory), strict=True))
        for m, out in rows.items():
            self.view.read_rows(m, idx, out=out.numpy())
        lengths = {m: torch.as_tensor(c) for m, c in plan["lengths"].items()}
        batch: Batch = {"rows": rows, "lengths": lengths,
                        "present": {m: torch.as_tensor(p) for m, p in plan["present"].items()},
                        "ids": list(plan["ids"])}
        if "target" in plan:
            batch["target"] = torch.as_tensor(plan["target"])
        return batch

    def __getitem__(self, i: int) -> Batch:
        """Returns clip ``i`` as an expanded sample: the contract without the batch dimension."""
        batch = expand_batch(self.read_plan(self.__getitems__([i])))
        sample: Batch = {"features": {m: t[0] for m, t in batch["features"].items()},
                         "present": {m: t[0] for m, t in batch["present"].items()},
                         "ids": batch["ids"][0]}
        if "target" in batch:
            sample["target"] = batch["target"][0]
        return sample


def pass_batch(batch: Batch) -> Batch:
    """Returns the plan ``FeatureDataset.__getitems__`` already built (collation is done there)."""
    return batch


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


class EMIDataModule(L.LightningDataModule):
    """Serves a feature store's splits as batches (see the module docstring for their contents).

    ``dims``, ``targets`` and ``num_targets`` are known right after construction (read from the
    store's manifest), so a CLI can link them into the model.

    Args:
        store: path of the feature store.
        batch_size: clips per batch.
        num_workers: DataLoader worker processes; they plan batches and prefetch their bytes into
            the page cache, the main process reads them (see the module docstring).
        modalities: modalities to serve; None serves all modalities in the store.
        train_split: split for fitting (None: no training loader).
        val_split: split for validation (None: none).
        test_split: split for testing (None: none).
        predict_split: split for prediction (None: none); may be unlabelled.
        preload: read the used splits' features into RAM instead of reading them on demand.
        pin_memory: read batches into page-locked memory (faster, asynchronous host-to-GPU
            copies; ignored without a GPU).
    """

    def __init__(self, store: str, batch_size: int = 32, num_workers: int = 0,
                 modalities: list[str] | None = None, train_split: str | None = "train",
                 val_split: str | None = "valid", test_split: str | None = "valid",
                 predict_split: str | None = "test", preload: bool = False,
                 pin_memory: bool = False) -> None:
        super().__init__()
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
        for name in {s for s in self.split_names.values() if s is not None}:
            if name not in self.store.splits:
                raise StoreError(f"{store}: split {name!r} not in the store "
                                 f"(it has {self.store.splits})")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.preload = preload
        self.pin_memory = pin_memory
        #: modality -> feature dimension D of the served modalities.
        self.dims: dict[str, int] = {m: self.store.dims[m] for m in self.modalities}
        #: target names, in label-column order.
        self.targets: list[str] = list(self.store.targets)
        self._datasets: dict[str, FeatureDataset] = {}

    @property
    def num_targets(self) -> int:
        """Returns the number of targets K."""
        return len(self.targets)

    @property
    def predict_ids(self) -> list[str] | None:
        """Returns the clip ids of the predict split (None without one): what a submission needs."""
        split = self.split_names["predict"]
        return None if split is None else list(self.store.split(split).ids)

    def dataset(self, split: str) -> FeatureDataset:
        """Returns the (cached) dataset of a split, preloading it when ``preload`` is set."""
        if split not in self._datasets:
            view = self.store.split(split)
            if self.preload:
                view.preload(self.modalities)
            self._datasets[split] = FeatureDataset(view, self.modalities)
        return self._datasets[split]

    def setup(self, stage: str) -> None:
        """Opens the splits the stage needs (``fit`` also opens the validation split)."""
        names = [self.split_names["fit"], self.split_names["validate"]] if stage == "fit" \
            else [self.split_names.get(stage)]
        for name in names:
            if name is not None:
                self.dataset(name)

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, split: str | None, stage: str, sampler: Sampler[int] | None = None
                ) -> DataLoader:
        if split is None:
            raise StoreError(f"{self.store.path}: no split configured for {stage}")
        data = self.dataset(split)
        if sampler is None:
            world, rank = self._world()
            sampler = EvalShardSampler(len(data), world, rank)
        # no pin_memory here: plans hold no tensors; read_plan allocates pinned rows itself
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=pass_batch, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """Returns the shuffled training loader (DistributedSampler under DDP; no rows dropped)."""
        split = self.split_names["fit"]
        if split is None:
            raise StoreError(f"{self.store.path}: no split configured for fit (train_split=None)")
        data = self.dataset(split)
        world, rank = self._world()
        sampler: Sampler[int]
        if world > 1:
            sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                         drop_last=False)
        else:
            sampler = RandomSampler(data)
        return self._loader(split, "fit", sampler)

    def val_dataloader(self) -> DataLoader:
        """Returns the validation loader: in order, every clip exactly once across ranks."""
        return self._loader(self.split_names["validate"], "validate")

    def test_dataloader(self) -> DataLoader:
        """Returns the test loader: in order, every clip exactly once across ranks."""
        return self._loader(self.split_names["test"], "test")

    def read_plan(self, batch: Batch, pin_memory: bool | None = None) -> Batch:
        """Returns the compact batch of a plan, read in this process; other batches as they are.

        Args:
            batch: a plan served by one of this module's loaders (or any later form of a batch).
            pin_memory: read into page-locked memory; None follows the ``pin_memory`` argument.
                Pinning happens only when a GPU is available.
        """
        if not is_plan(batch):
            return batch
        pin = self.pin_memory if pin_memory is None else pin_memory
        return self.dataset(batch["split"]).read_plan(
            batch, pin_memory=bool(pin) and torch.cuda.is_available())

    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Returns the compact batch of a loader's plan (:meth:`read_plan`, main process)."""
        return self.read_plan(batch)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Returns the batch expanded to the contract with :func:`expand_batch`, on its device."""
        return expand_batch(batch)

    def prepare_batch(self, batch: Batch, device: torch.device | str | None = None) -> Batch:
        """Returns a loader's batch as the model contract, on ``device``: for bare PyTorch loops.

        Does what the Trainer's hooks do: reads a plan (:meth:`read_plan`, pinned when
        ``pin_memory`` is set and ``device`` is a GPU), moves the batch to ``device`` (None: stays
        on the CPU), then :func:`expand_batch` there.
        """
        target = None if device is None else torch.device(device)
        pin = self.pin_memory and target is not None and target.type == "cuda"
        batch = self.read_plan(batch, pin_memory=pin)
        if target is not None:
            batch = move_data_to_device(batch, target)
        return expand_batch(batch)

    def predict_dataloader(self) -> DataLoader:
        """Returns the prediction loader: in order, every clip exactly once across ranks."""
        return self._loader(self.split_names["predict"], "predict")

