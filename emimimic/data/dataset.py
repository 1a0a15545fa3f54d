"""A store split as a dataset: plans of batches, and their reads into FeatureBatches."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from emimimic.data.batches import BatchPlan, FeatureBatch
from emimimic.data.store import SplitView, StoreError
from emimimic.pooling import windows


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
    """Returns the FeatureBatch of ``plan`` with ``rows`` (its small tensors on the host).

    For a batch bound for an accelerator (``device``) the pooling windows are computed here, on
    the host where the lengths are, so the device never waits on index arithmetic; on the CPU
    the model computes them when it needs them (the same work, outside the loader).
    """
    lengths = {m: torch.as_tensor(c) for m, c in plan.lengths.items()}
    batch = FeatureBatch(rows=rows, lengths=lengths,
                         target=None if plan.target is None else torch.as_tensor(plan.target),
                         ids=list(plan.ids),
                         weight=None if plan.weight is None else torch.as_tensor(plan.weight))
    if device.type != "cpu":
        batch.windows = {m: windows(n) for m, n in lengths.items()}
    return batch


class FeatureDataset(Dataset):
    """Map-style dataset over a store split: ``__getitems__`` plans batches, ``read`` reads them.

    Args:
        view: the split.
        modalities: the modalities to serve, in order.
        prefetch: ask the kernel to bring each planned batch's bytes into the page cache
            (:meth:`SplitView.prefetch`). None (default) does so only inside DataLoader workers,
            which plan batches ahead of the main process's reads; in the main process the read
            follows at once, and on a warm cache the advice costs ~10% of the read for nothing.
        sample_weights: serve the split's sample weights (when it has them) with each batch.
        subset: positions in ``view`` of the clips served, in order (a fold); None: all.
        name: the dataset's name in its batch plans (default the view's).
    """

    def __init__(self, view: SplitView, modalities: Sequence[str],
                 prefetch: bool | None = None, sample_weights: bool = True,
                 subset: Sequence[int] | np.ndarray | None = None,
                 name: str | None = None) -> None:
        self.view = view
        self.name = name or view.name
        self.modalities = list(modalities)
        self.prefetch = prefetch
        self.weights = view.weights if sample_weights else None
        self.stored = {m: view.stored_rows(m) for m in self.modalities}
        self.subset = None if subset is None else np.asarray(subset, dtype=np.int64)
        #: the ids of the clips served, in order
        self.ids = (list(view.ids) if self.subset is None
                    else [view.ids[i] for i in self.subset.tolist()])

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: Sequence[int]) -> BatchPlan:
        """Returns the plan of a batch of clips ``indices``; reads no feature bytes."""
        idx = np.asarray(indices, dtype=np.int64)
        if self.subset is not None:
            idx = self.subset[idx]
        prefetch = self.prefetch
        if prefetch is None:
            prefetch = torch.utils.data.get_worker_info() is not None
        if prefetch:
            self.view.prefetch(self.modalities, idx)
        labels = self.view.labels
        return BatchPlan(split=self.name, indices=idx,
                         lengths={m: self.stored[m][idx] for m in self.modalities},
                         target=None if labels is None else labels[idx],
                         ids=[self.view.ids[i] for i in idx.tolist()],
                         weight=None if self.weights is None else self.weights[idx])

    def __getitem__(self, i: int) -> FeatureBatch:
        """Returns clip ``i`` as a one-clip batch."""
        return self.read(self.__getitems__([i]))

    def _check(self, plan: BatchPlan) -> None:
        if plan.split != self.name:
            raise StoreError(f"{self.view.folder}: a plan of split {plan.split!r} cannot be "
                             f"read from split {self.name!r}")
        unknown = [m for m in plan.lengths if m not in self.stored]
        if unknown:
            raise StoreError(f"{self.view.folder}: the plan holds modalities {unknown}, this "
                             f"dataset serves {self.modalities}")

    def read(self, plan: BatchPlan, pin_memory: bool = False,
             device: torch.device | None = None) -> FeatureBatch:
        """Returns the batch of a plan: its clips' stored rows read into fresh CPU tensors.

        Args:
            plan: a plan from :meth:`__getitems__` of this split.
            pin_memory: allocate the rows in page-locked memory (needs a GPU), for faster and
                asynchronous host-to-device copies.
            device: the device the batch is for; for an accelerator the pooling windows are
                computed now, on the host (the rows stay on the CPU for the caller to move).

        Raises:
            StoreError: the plan is of another split or holds modalities this dataset does not
                serve.
        """
        self._check(plan)
        shapes = {m: (int(c.sum()), self.view.dims[m]) for m, c in plan.lengths.items()}
        rows = dict(zip(shapes, batch_buffers(list(shapes.values()), pin_memory), strict=True))
        for m, out in rows.items():
            self.view.read_rows(m, plan.indices, out=out.numpy())
        return _batch(rows, plan, torch.device("cpu") if device is None else device)


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
        return _batch(rows, plan, self.device).to(self.device)
