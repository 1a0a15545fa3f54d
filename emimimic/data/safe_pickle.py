"""Loading of untrusted feature pickles: only numpy arrays (or torch tensors) can come out.

Plain ``pickle.load`` runs whatever callable a file names; a feature file downloaded with a dataset
must not be able to do that. Two formats are accepted:

* a pickle of a numpy array: unpickled with :class:`ArrayUnpickler`, which resolves only the few
  numpy names an ndarray pickle needs and refuses every other global before anything is called;
* a ``torch.save`` zip file holding a tensor: loaded with ``torch.load(weights_only=True)``, torch's
  own restricted unpickler.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from emimimic.data.store import StoreError
from emimimic.data.store.format import file_start

#: The globals an ndarray pickle refers to (numpy 1.x module names and numpy 2.x ones).
_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class ArrayUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the numpy globals needed to rebuild an ndarray."""

    def find_class(self, module: str, name: str) -> Any:
        """Returns the allowed numpy global ``module.name``; refuses anything else."""
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a feature pickle")

    def persistent_load(self, pid: Any) -> Any:
        """Refuses persistent ids (used by tensors pickled with plain pickle)."""
        raise pickle.UnpicklingError("persistent ids are not allowed in a feature pickle")


def load_pickle(path: str | Path) -> np.ndarray:
    """Returns the numeric array stored in a feature pickle, without running code from the file.

    Raises:
        StoreError: the file holds anything but one numeric numpy array or torch tensor (message
            names the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{path}: missing feature file") from None
    except OSError as err:
        raise StoreError(f"{path}: cannot read the feature file ({err.strerror})") from None
    _check_kind(path, data)
    if zipfile.is_zipfile(io.BytesIO(data)):
        import torch  # only for torch.save files

        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises several types for refused or corrupt files
            raise StoreError(f"{path}: refused torch file ({type(err).__name__}: {err}); "
                             "expected a torch.save'd tensor") from err
        if not isinstance(obj, torch.Tensor):
            raise StoreError(f"{path}: expected a tensor, the torch file holds "
                             f"{type(obj).__name__}")
        if obj.is_floating_point():
            obj = obj.float()  # numpy has no bfloat16
        return obj.detach().numpy()
    try:
        obj = ArrayUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as err:
        raise StoreError(f"{path}: refused pickle ({type(err).__name__}: {err}); expected a "
                         "pickled numpy array") from err
    if not isinstance(obj, np.ndarray):
        raise StoreError(f"{path}: expected a pickled numpy array, got {type(obj).__name__}")
    if obj.dtype.kind not in "fiu":
        raise StoreError(f"{path}: expected a real numeric array, got dtype {obj.dtype}")
    return obj


def _check_kind(path: Path, data: bytes) -> None:
    """Refuses, saying what the file is, bytes that are no pickle nor ``torch.save`` zip at all.

    A pickle of protocol 2 or later starts with the PROTO opcode (``\\x80``); protocol 0 and 1
    pickles of an array start with the GLOBAL opcode naming numpy's reconstructor
    (``cnumpy``); a ``torch.save`` file is a zip (``PK``). Anything else (a text file, a
    ``.npy`` file with the wrong suffix) is named for what it is rather than left to the
    unpickler's opcode errors.
    """
    if not data:
        raise StoreError(f"{path}: empty file; expected a pickled numpy array")
    if data.startswith(np.lib.format.MAGIC_PREFIX):
        raise StoreError(f"{path}: a .npy file (it starts with {file_start(data[:6], 6)}), not a "
                         "pickle; rename it to .npy")
    if not data.startswith((b"\x80", b"cnumpy", b"PK")):
        raise StoreError(f"{path}: not a pickle (it starts with {file_start(data)}); expected a "
                         "pickled numpy array")
