"""Files that are never half-written: everything emimimic publishes goes through here.

A file (or folder) is written under a temporary name beside its destination, flushed to disk,
and renamed into place, so a killed process leaves either the old state or the new one, and a
reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it to ``path`` when the block succeeds.

    Write a file or a whole folder at the yielded path; on an exception the temporary is removed
    and ``path`` is left as it was. An existing file at ``path`` is replaced; a folder is not
    (renaming onto a folder fails), which callers check first.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Writes ``data`` (text as UTF-8) to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


__all__ = ["atomic_path", "write_atomic"]


#: Bytes hashed at each end of a file for its fingerprint.
_HASHED = 64 * 1024


def file_fingerprint(path: str | os.PathLike[str]) -> list[Any]:
    """Returns what a resume compares of a source file: name, size, mtime (ns) and a hash.

    The hash is BLAKE2b over the size and the first and last 64 KiB (cheap whatever the file's
    size; with the size and mtime it catches an edited or replaced file).

    Raises:
        OSError: the file cannot be read.
    """
    path = Path(path)
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        size, mtime = stat.st_size, stat.st_mtime_ns
        h = hashlib.blake2b(size.to_bytes(8, "little"), digest_size=16)
        h.update(f.read(_HASHED))
        if size > _HASHED:
            f.seek(max(_HASHED, size - _HASHED))
            h.update(f.read(_HASHED))
    return [path.name, size, mtime, h.hexdigest()]
