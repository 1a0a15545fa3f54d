"""K folds of the labelled clips, and the union of splits they are cut from.

What winning EMI entries do after a paper's config: cross-validation over train + valid (every
labelled clip in exactly one validation fold, for out-of-fold predictions that ensembles are
weighted on) and a final *refit* on train + valid. :class:`UnionView` reads several splits of a
store as one; :func:`fold_of` cuts it into folds with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emimimic.data.store import SplitView, StoreError


def fold_of(count: int, folds: int, seed: int = 0) -> np.ndarray:
    """Returns the fold (0 .. folds - 1) of each of ``count`` clips: a seeded shuffle cut into
    near-equal parts (sizes differ by at most one), the same for the same arguments.

    Raises:
        StoreError: fewer than two folds, or more folds than clips.
    """
    if folds < 2 or folds > count:
        raise StoreError(f"folds={folds}: expected 2 <= folds <= the {count} labelled clips")
    order = np.random.default_rng(seed).permutation(count)
    out = np.empty(count, dtype=np.int64)
    out[order] = np.arange(count) % folds
    return out


class UnionView:
    """Several splits of one store read as one split (the same interface as a SplitView).

    Clips keep their order: the first split's, then the next's. Every clip must have labels when
    any has; sample weights are served when every split has them.

    Args:
        views: the splits, of one store.
        name: the union's name (``train+valid``).
    """

    def __init__(self, views: Sequence[SplitView], name: str) -> None:
        if not views:
            raise StoreError("a union of splits needs at least one split")
        self.views = list(views)
        self.name = name
        self.root = self.views[0].root
        self.folder = self.root
        self.dims = dict(self.views[0].dims)
        self.ids = [clip for v in self.views for clip in v.ids]
        self.labelled = all(v.labelled for v in self.views)
        self.labels = (np.concatenate([v.labels for v in self.views]) if self.labelled
                       else None)
        self.weights = (np.concatenate([v.weights for v in self.views])
                        if all(v.weights is not None for v in self.views) else None)
        self._first = np.cumsum([0] + [len(v) for v in self.views])

    def __len__(self) -> int:
        return len(self.ids)

    def _parts(self, indices: Sequence[int] | np.ndarray
               ) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Returns (view, positions in ``indices``, positions in the view) per view used."""
        idx = np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self._first, idx, side="right") - 1
        return [(k, np.flatnonzero(which == k), idx[which == k] - self._first[k])
                for k in np.unique(which)]

    def _column(self, method: str, m: str) -> np.ndarray:
        return np.concatenate([getattr(v, method)(m) for v in self.views])

    def present(self, m: str) -> np.ndarray:
        """Returns a bool [N] array: True where clip i has data for modality ``m``."""
        return self._column("present", m)

    def stored_rows(self, m: str) -> np.ndarray:
        """Returns the int64 [N] stored row counts of ``m``."""
        return self._column("stored_rows", m)

    def raw_lengths(self, m: str) -> np.ndarray:
        """Returns the int64 [N] raw sequence lengths of ``m``."""
        return self._column("raw_lengths", m)

    def row_starts(self, m: str) -> np.ndarray:
        """Returns each clip's first row in :meth:`all_rows` (the splits' rows back to back)."""
        rows = [0] + [int(v.stored_rows(m).sum()) for v in self.views[:-1]]
        return np.concatenate([v.row_starts(m) + offset
                               for v, offset in zip(self.views, np.cumsum(rows), strict=True)])

    def all_rows(self, m: str) -> np.ndarray:
        """Returns every stored row of ``m``, the splits' rows back to back (reads them)."""
        return np.concatenate([v.all_rows(m) for v in self.views])

    def preload(self, modalities: Sequence[str] | None = None) -> None:
        """Reads the splits' rows of the given modalities into RAM."""
        for v in self.views:
            v.preload(modalities)

    def prefetch(self, modalities: Sequence[str], indices: Sequence[int] | np.ndarray) -> int:
        """Asks the kernel to read ahead the clips' bytes (see :meth:`SplitView.prefetch`)."""
        return sum(self.views[k].prefetch(modalities, local)
                   for k, _, local in self._parts(indices))

    def read_rows(self, m: str, indices: Sequence[int] | np.ndarray,
                  out: np.ndarray | None = None) -> np.ndarray:
        """Returns the stored rows of clips ``indices`` back to back, in their order."""
        idx = np.asarray(indices, dtype=np.int64)
        counts = self.stored_rows(m)[idx]
        total, dim = int(counts.sum()), self.dims[m]
        if out is None:
            out = np.empty((total, dim), dtype=np.float16)
        elif out.shape != (total, dim) or out.dtype != np.float16:
            raise StoreError(f"{self.root}: read_rows needs a float16 [{total}, {dim}] output, "
                             f"got {out.dtype} {tuple(out.shape)}")
        starts = np.cumsum(counts) - counts
        for k, positions, local in self._parts(idx):
            rows = self.views[k].read_rows(m, local)
            # the output rows of these clips, in the order the view returned them
            where = np.concatenate([np.arange(starts[p], starts[p] + counts[p])
                                    for p in positions]) if len(positions) else []
            out[where] = rows
        return out


__all__ = ["UnionView", "fold_of"]
