"""Reads an offline W&B run's transaction log (``run-<id>.wandb``) back, for the tests.

The file is W&B's record log: a 7-byte header, then 32 KiB blocks of LevelDB-log framed chunks
(crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each record a
``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32 * 1024
_HEADER = 7


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """Returns every record of a ``.wandb`` file in order."""
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    out, pending, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def logged(path: Path) -> dict[str, set[str]]:
    """Returns the keys a run logged: ``history``, ``summary`` and ``config`` keys, and its
    ``run`` name, group and tags."""
    keys: dict[str, set[str]] = {"history": set(), "summary": set(), "config": set(), "run": set()}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        items = {"history": lambda r: r.history.item, "summary": lambda r: r.summary.update,
                 "config": lambda r: r.config.update}.get(kind)
        if items is not None:
            keys[kind] |= {it.key or "/".join(it.nested_key) for it in items(record)}
        elif kind == "run":
            keys["run"] |= {f"name={record.run.display_name}", f"group={record.run.run_group}",
                            *(f"tag={t}" for t in record.run.tags)}
    return keys
