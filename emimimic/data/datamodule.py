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
from typing import Literal

import lightning as L
import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Sampler

from emimimic.data.batches import BatchPlan, FeatureBatch
from emimimic.data.dataset import FeatureDataset, ResidentSplit
from emimimic.data.folds import UnionView, fold_of
from emimimic.data.samplers import EpochShuffle, EvalShardSampler, run_seed
from emimimic.data.store import FeatureStore, StoreError
from emimimic.hardware import auto_workers

#: Where a split's rows are read from: the store's files, RAM, or the training device.
Preload = Literal["none", "ram", "device"]


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
            the page cache, the main process reads them. Null: what fits the machine (up to 4,
            leaving a core to the main process); more than the machine's cores are cut to its
            count.
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
        sample_weights: give the training loss the store's per-clip sample weights, where the
            training split has them (``emimimic pack --weight_column``); false ignores them.
        folds: cross-validation over the union of ``train_split`` and ``val_split``: cut it into
            this many folds (0: off, the splits as they are); every labelled clip is in exactly
            one validation fold.
        fold: the fold validated on (0 .. folds - 1); the others are trained on.
        fold_seed: seed of the cut into folds (the same seed, the same folds for every run).
        refit: train on the union of ``train_split`` and ``val_split``, with no validation: the
            final model of a winning entry, trained for a fixed number of epochs (the folds' or
            the tuned trial's best; see ``emimimic tune``). Its model is ``last.ckpt``.

    ``predict_split`` (and ``test_split``) may be ``held_out``: the clips the run validates on
    (``val_split``, or its fold), whose predictions are the run's out-of-fold predictions. With
    folds or a refit, ``val_split`` is part of the training clips: score such a run on
    ``held_out`` or on a split it never saw.
    """

    #: The name ``predict_split`` gives to the clips a run validates on.
    HELD_OUT = "held_out"

    def __init__(self, store: str, batch_size: PositiveInt = 32,
                 num_workers: NonNegativeInt | None = 0,
                 modalities: list[str] | None = None, train_split: str = "train",
                 val_split: str = "valid", test_split: str = "valid",
                 predict_split: str = "test", preload: Preload = "none",
                 pin_memory: bool = False, sample_weights: bool = True,
                 folds: NonNegativeInt = 0, fold: NonNegativeInt = 0, fold_seed: int = 0,
                 refit: bool = False) -> None:
        super().__init__()
        if num_workers is None:
            num_workers = auto_workers()
        elif num_workers > (os.cpu_count() or 1):
            rank_zero_info(f"num_workers {num_workers} cut to this machine's "
                           f"{os.cpu_count()} cores")
            num_workers = os.cpu_count() or 1
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
        #: the union of train and valid that folds and refits read, and its folds
        self._union: dict[str, tuple[UnionView, np.ndarray | None]] = {}
        fit, validate = train_split, val_split
        if folds or refit:
            if folds and refit:
                raise StoreError("folds and refit exclude each other: cross-validate first, "
                                 "then refit on all the clips")
            union = f"{train_split}+{val_split}"
            if refit:
                fit, validate = union, None
                self._union[union] = (self._union_view(union), None)
            else:
                if fold >= folds:
                    raise StoreError(f"fold={fold}: expected 0 <= fold < folds={folds}")
                view = self._union_view(union)
                assignment = fold_of(len(view), folds, fold_seed)
                tag = f"{union} fold {fold} of {folds} (seed {fold_seed})"
                fit, validate = f"{tag}: train", f"{tag}: held out"
                self._union[fit] = (view, np.flatnonzero(assignment != fold))
                self._union[validate] = (view, np.flatnonzero(assignment == fold))
        held_out = {self.HELD_OUT: validate}
        self.split_names = {"fit": fit, "validate": validate,
                            "test": held_out.get(test_split, test_split),
                            "predict": held_out.get(predict_split, predict_split)}
        if self.split_names["predict"] is None:
            raise StoreError("a refit has no held-out clips to predict; predict another split")
        self.batch_size = batch_size
        self.num_workers = 0 if preload == "device" else num_workers
        self.preload = preload
        self.pin_memory = pin_memory
        self.sample_weights = sample_weights
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
        return list(self.dataset(self.split_names["predict"]).ids)

    @property
    def validates(self) -> bool:
        """Returns whether fitting validates (False for a refit on train + valid)."""
        return self.split_names["validate"] is not None

    def stage_splits(self, stage: str) -> list[str]:
        """Returns the splits a Trainer stage reads (``fit`` also validates)."""
        if stage == "fit":
            return [s for s in (self.split_names["fit"], self.split_names["validate"]) if s]
        if self.split_names[stage] is None:
            raise StoreError(f"a refit (data.refit) has no validation clips for `{stage}`; "
                             "choose a split with --data.val_split / --data.test_split")
        return [self.split_names[stage]]

    def _union_view(self, name: str) -> UnionView:
        train, valid = name.split("+")
        views = [self.store.split(train), self.store.split(valid)]
        for view in views:
            if view.labels is None:
                raise StoreError(f"{self.store.path}: split {view.name!r} has no labels; folds "
                                 "and refits need labelled train and validation splits")
        return UnionView(views, name)

    def dataset(self, split: str) -> FeatureDataset:
        """Returns the (cached) dataset of a split, preloading it into RAM when asked to."""
        if split not in self._datasets:
            view, subset = self._union.get(split, (None, None))
            if view is None:
                view = self.store.split(split)
            if self.preload == "ram":
                view.preload(self.modalities)
            # weights matter to the training loss only; evaluation is unweighted
            weighted = self.sample_weights and split == self.split_names["fit"]
            self._datasets[split] = FeatureDataset(view, self.modalities,
                                                   sample_weights=weighted, subset=subset,
                                                   name=split)
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
        self.stage_splits("validate")  # a refit has none: say so
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
        return self.dataset(plan.split).read(plan, pin_memory=pin, device=target)

    def on_before_batch_transfer(self, batch: BatchPlan, dataloader_idx: int) -> FeatureBatch:
        """Returns the batch of a loader's plan (:meth:`read`, main process)."""
        return self.read(batch, self.trainer.strategy.root_device)

    def prepare_batch(self, plan: BatchPlan, device: torch.device | str = "cpu") -> FeatureBatch:
        """Returns a loader's plan as a batch on ``device``: what a bare PyTorch loop calls."""
        return self.read(plan, device).to(device)
