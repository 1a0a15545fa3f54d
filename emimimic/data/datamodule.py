"""LightningDataModule serving feature-store splits as batches of pooled features.

A batch is a dict (the batch contract shared with the model)::

    features: dict[str, Tensor]  modality -> [B, 128, D] float16 (absent clips are zero rows)
    present:  dict[str, Tensor]  modality -> [B] bool (False: no data, the rows are not real)
    target:   Tensor [B, K] float32 (labelled splits only)
    ids:      list[str]          clip ids

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


class FeatureDataset(Dataset):
    """Map-style dataset over one store split; ``__getitems__`` builds a whole batch at once.

    Args:
        view: the split.
        modalities: the modalities to serve, in order.
    """

    def __init__(self, view: SplitView, modalities: Sequence[str]) -> None:
        self.view = view
        self.modalities = list(modalities)
        self.ids = view.ids
        self.labels = None if view.labels is None else torch.from_numpy(view.labels)
        self.present = {m: torch.from_numpy(view.present(m)) for m in self.modalities}

    def __len__(self) -> int:
        return len(self.view)

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """Returns the batch of clips ``indices`` (one preallocated array per modality)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        features = {}
        for m in self.modalities:
            out = _empty((len(idx), STEPS, self.view.dims[m]), torch.float16)
            self.view.read_batch(m, idx.numpy(), out=out.numpy())
            features[m] = out
        batch: Batch = {"features": features,
                        "present": {m: self.present[m][idx] for m in self.modalities},
                        "ids": [self.ids[i] for i in idx.tolist()]}
        if self.labels is not None:
            batch["target"] = self.labels[idx]
        return batch

    def __getitem__(self, i: int) -> Batch:
        """Returns clip ``i`` as a sample: like a batch without the batch dimension."""
        batch = self.__getitems__([i])
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

    def predict_dataloader(self) -> DataLoader:
        """Returns the prediction loader: in order, every clip exactly once across ranks."""
        return self._loader(self.split_names["predict"], "predict")

