"""The data subcommands of ``emimimic``: ``pack``, ``synth`` and ``info``.

Their options are the signatures of :func:`~emimimic.data.pack.pack`,
:func:`~emimimic.data.synth.synth` and :func:`info` (:mod:`emimimic.commandline`)::

    emimimic pack --dest DEST --splits.train train_split.csv --splits.valid valid_split.csv \\
        --splits.test test_ids.csv --modalities.visual feat/vit --modalities.audio feat/wavlm \\
        --modalities.text feat/chatglm3 [--missing absent] [--workers N] [-c pack.yaml]
    emimimic synth DEST [--seed 0] [--counts.train 384] [--dims paper]
    emimimic info STORE

Errors in the inputs are :class:`~emimimic.data.store.StoreError` s, which ``emimimic`` prints
as one line. These commands import neither Lightning nor torch before they need them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from emimimic.commandline import run_command


def pack_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic pack`` and prints a summary of the new store."""
    from emimimic.data.pack import pack

    print(info(run_command(pack, argv, "emimimic pack")))


def synth_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic synth`` and prints a summary of the new store."""
    from emimimic.data.synth import synth

    print(info(run_command(synth, argv, "emimimic synth", positional=True)))


def info_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic info STORE``."""
    print(run_command(info, argv, "emimimic info", positional=True))


def _provenance_lines(provenance: dict, indent: str = "           ") -> list[str]:
    """Returns a store's provenance as short lines: one per key, nested records indented."""
    lines = []
    for key, value in provenance.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines += _provenance_lines(value, indent + "  ")
        else:
            text = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"{indent}{key}: {text if len(text) <= 90 else text[:87] + '...'}")
    return lines


def info(store: Path) -> str:
    """Returns a short summary of a feature store: splits, counts, dims, targets, presence, size.

    Args:
        store: the store folder.
    """
    from emimimic.data.store import FeatureStore, human_bytes

    opened = FeatureStore(store)
    for name in opened.splits:  # opening a split checks its files against the manifest
        opened.split(name)
    prov = opened.provenance
    lines = [f"store      {opened.path}  ({human_bytes(opened.nbytes())} on disk)",
             f"targets    {len(opened.targets)}: {', '.join(opened.targets)}",
             f"modalities {', '.join(f'{m} (D={d})' for m, d in opened.dims.items())}"]
    if prov.get("synthetic"):
        lines.append("provenance SYNTHETIC DATA (emimimic synth, seed "
                     f"{prov.get('seed')}): not real features")
    else:
        lines.append("provenance")
        lines += _provenance_lines(prov)
    for name, spec in opened.manifest["splits"].items():
        present = ", ".join(f"{m} {100 * spec['present'][m] / max(spec['count'], 1):.1f}%"
                            for m in opened.dims)
        kind = "labelled" if spec["labelled"] else "unlabelled"
        kind += ", sample weights" if spec.get("weighted") else ""
        lines.append(f"split      {name}: {spec['count']} clips, {kind}; present: {present}")
    return "\n".join(lines)
