"""Shared data fixtures: small synthetic feature stores and raw inputs for ``emimimic pack``."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from support.state import restored_global_state

from emimimic.constants import EMOTIONS
from emimimic.data.synth import synth


@pytest.fixture(autouse=True)
def global_state():
    """Every test starts from the global state the last one found: seeds set by one test (e.g.
    ``seed_everything``, which also sets ``PL_GLOBAL_SEED`` that the samplers read) do not leak
    into the next."""
    with restored_global_state():
        yield


#: Clips per split of the ``demo_store`` fixture (small, default demo dims).
DEMO_COUNTS = {"train": 96, "valid": 64, "test": 32}


@pytest.fixture(scope="session")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Returns the path of a small synthetic store (96 train / 64 valid / 32 unlabelled test)."""
    return synth(tmp_path_factory.mktemp("demo") / "store", seed=0, counts=DEMO_COUNTS)


def write_csv(path: Path, ids: Sequence[int], labels: np.ndarray | None,
              targets: Sequence[str] = EMOTIONS) -> Path:
    """Writes an ABAW split CSV (integer Filename, as the challenge's) and returns its path."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Filename", *targets] if labels is not None else ["Filename"])
        for n, clip in enumerate(ids):
            w.writerow([clip] + ([] if labels is None else [f"{v:.6g}" for v in labels[n]]))
    return path


@pytest.fixture
def split_csv() -> Callable[..., Path]:
    """Returns :func:`write_csv`, which writes an ABAW split CSV (for tests that alter one)."""
    return write_csv


@pytest.fixture
def raw_inputs(tmp_path: Path) -> Callable[..., dict]:
    """Returns a factory of pack inputs: split CSVs plus per-clip ``.npy`` feature folders.

    ``make(train=6, valid=4, test=3, dims=..., lengths=..., targets=EMOTIONS)`` writes them under
    ``tmp_path`` and returns ``{"splits", "modalities", "raw", "labels", "root"}`` where ``raw``
    maps (modality, id) to the float16-representable float32 array written.
    """

    def make(train: int = 6, valid: int = 4, test: int = 3, dims: dict[str, int] | None = None,
             lengths: Sequence[int] = (1, 7, 127, 128, 129, 300),
             targets: Sequence[str] = EMOTIONS) -> dict:
        dims = dims or {"visual": 8, "audio": 12, "text": 16}
        rng = np.random.default_rng(123)
        root = tmp_path / "raw"
        root.mkdir(exist_ok=True)
        splits, raw, labels, first = {}, {}, {}, 0
        for name, n in (("train", train), ("valid", valid), ("test", test)):
            if n == 0:
                continue
            ids = list(range(first, first + n))
            first += n
            y = None if name == "test" else rng.integers(0, 4, (n, len(targets))) / 3
            labels[name] = y
            splits[name] = str(write_csv(root / f"{name}.csv", ids, y, targets))
        modalities = {}
        for m, d in dims.items():
            folder = root / m
            folder.mkdir(exist_ok=True)
            modalities[m] = str(folder)
            for clip in range(first):
                t = lengths[(clip + len(m)) % len(lengths)]
                arr = rng.standard_normal((t, d)).astype(np.float16).astype(np.float32)
                np.save(folder / f"{clip:05d}.npy", arr)
                raw[(m, f"{clip:05d}")] = arr
        return {"splits": splits, "modalities": modalities, "raw": raw, "labels": labels,
                "root": root}

    return make
