"""LightningDataModule serving feature-store splits: compact batches, expanded on the device.

The model receives the batch contract shared with the network::

    features: dict[str, Tensor]  modality -> [B, 128, D] float16 (absent clips are zero rows)
    present:  dict[str, Tensor]  modality -> [B] bool (False: no data, the rows are not real)
    target:   Tensor [B, K] float32 (labelled splits only)
    ids:      list[str]          clip ids

The DataLoaders do not build ``features``: they serve *compact* batches, which hold only the
stored rows (a text clip of 25 tokens is 25 rows, not 128)::

    rows:     dict[str, Tensor]  modality -> [R, D] float16, the stored rows of the batch's clips
                                 back to back (0 rows for an absent clip, 128 pooled rows for a
                                 clip with T > 128, its T raw rows otherwise)
    lengths:  dict[str, Tensor]  modality -> [B] int64, stored rows per clip
    present, target, ids         as above

:func:`expand_batch` turns a compact batch into the contract, bit for bit equal to
``SplitView.read`` (adaptive average pooling to 128 steps). Under a Lightning ``Trainer``,
:meth:`EMIDataModule.on_after_batch_transfer` calls it, so the expansion runs after the (smaller)
host-to-device copy, on the GPU when there is one. **A bare PyTorch loop over these loaders must
call** ``batch = expand_batch(move_to_device(batch))`` **itself** before using ``features``.

Samplers are built here because exact whole-split Pearson needs every clip exactly once: under
DDP the evaluation loaders give rank r the clips r, r + W, r + 2W, ... without the padding that
``DistributedSampler`` adds. Run the Trainer with ``use_distributed_sampler=False``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler

from emimimic.constants import STEPS
from emimimic.data.store import FeatureStore, SplitView, StoreError

Batch = dict[str, Any]


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Returns an uninitialised tensor; in a DataLoader worker, directly in shared memory.

    Allocating in shared memory up front (as torch's default collate does) saves the copy the
    worker would otherwise make when it sends the batch to the main process.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


def _host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Returns an uninitialised CPU tensor whose memory numpy allocated.

    numpy advises the kernel to back large arrays with huge pages, so first writes to a fresh
    multi-megabyte buffer fault a few 2 MiB pages instead of thousands of 4 KiB ones (measured
    3-10x faster than ``torch.empty`` for the [B, 128, D] outputs of :func:`expand_rows`).
    """
    return torch.from_numpy(np.empty(shape, dtype=torch.empty(0, dtype=dtype).numpy().dtype))


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
    this. A bare PyTorch loop moves the batch to the device first, then calls
    ``expand_batch(batch)`` (expanding on the device copies less over the bus).
    """
    if "rows" not in batch:
        return batch
    out: Batch = {"features": {m: expand_rows(r, batch["lengths"][m])
                               for m, r in batch["rows"].items()}}
    out.update((k, v) for k, v in batch.items() if k not in ("rows", "lengths"))
    return out


class FeatureDataset(Dataset):
    """Map-style dataset over one store split; ``__getitems__`` builds a compact batch at once.

    Args:
        view: the split.
        modalities: the modalities to serve, in order.
    """

    def __init__(self, view: SplitView, modalities: Sequence[str]) -> None:
        self.view = view
        self.modalities = list(modalities)
        self.ids = view.ids
        self.labels = None if view.labels is None else torch.from_numpy(view.labels)
        self.stored = {m: view.stored_rows(m) for m in self.modalities}
        self.present = {m: torch.from_numpy(self.stored[m] > 0) for m in self.modalities}

    def __len__(self) -> int:
        return len(self.view)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """Returns the compact batch of clips ``indices`` (see the module docstring).

        Each modality's rows go into one preallocated tensor (in shared memory inside a worker),
        read with one positional read per clip (per run of adjacent clips).
        """
        idx = np.asarray(indices, dtype=np.int64)
        rows, lengths = {}, {}
        for m in self.modalities:
            counts = self.stored[m][idx]
            out = _empty((int(counts.sum()), self.view.dims[m]), torch.float16)
            self.view.read_rows(m, idx, out=out.numpy())
            rows[m], lengths[m] = out, torch.from_numpy(counts)
        tidx = torch.from_numpy(idx)
        batch: Batch = {"rows": rows, "lengths": lengths,
                        "present": {m: self.present[m][tidx] for m in self.modalities},
                        "ids": [self.ids[i] for i in idx.tolist()]}
        if self.labels is not None:
            batch["target"] = self.labels[tidx]
        return batch

    def __getitem__(self, i: int) -> Batch:
        """Returns clip ``i`` as an expanded sample: the contract without the batch dimension."""
        batch = expand_batch(self.__getitems__([i]))
        sample: Batch = {"features": {m: t[0] for m, t in batch["features"].items()},
                         "present": {m: t[0] for m, t in batch["present"].items()},
                         "ids": batch["ids"][0]}
        if "target" in batch:
            sample["target"] = batch["target"][0]
        return sample


def pass_batch(batch: Batch) -> Batch:
    """Returns the batch ``FeatureDataset.__getitems__`` already built (collation is done there)."""
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
        num_workers: DataLoader worker processes (each opens its own memory maps).
        modalities: modalities to serve; None serves all modalities in the store.
        train_split: split for fitting (None: no training loader).
        val_split: split for validation (None: none).
        test_split: split for testing (None: none).
        predict_split: split for prediction (None: none); may be unlabelled.
        preload: read the used splits' features into RAM instead of reading them on demand.
        pin_memory: pin batches in page-locked memory (for faster host-to-GPU copies).
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
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=pass_batch,
                          pin_memory=self.pin_memory, drop_last=False,
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

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Returns the batch expanded to the contract with :func:`expand_batch`, on its device."""
        return expand_batch(batch)

    def predict_dataloader(self) -> DataLoader:
        """Returns the prediction loader: in order, every clip exactly once across ranks."""
        return self._loader(self.split_names["predict"], "predict")

