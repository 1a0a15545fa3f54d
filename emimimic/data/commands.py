"""The data subcommands of ``emimimic``: ``pack``, ``synth`` and ``info``.

Usage::

    emimimic pack DEST --split train=train_split.csv --split valid=valid_split.csv \\
        --split test=test_ids.csv --modality visual=feat/vit --modality audio=feat/wavlm \\
        --modality text=feat/chatglm3 [--missing error|absent] [--targets emi|header|A,B,...] \\
        [--provenance KEY=VALUE ...] [--workers N]
    emimimic synth DEST [--seed 0] [--train 384 --valid 256 --test 128] \\
        [--dims visual=32,audio=48,text=64 | --paper-dims] [--targets A,B,...]
    emimimic info STORE

Errors in the inputs are :class:`~emimimic.data.store.StoreError` s, which ``emimimic`` prints
as one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from emimimic.constants import EMOTIONS
from emimimic.data.pack import MISSING_POLICIES, pack
from emimimic.data.store import FeatureStore, StoreError, human_bytes
from emimimic.data.synth import DEFAULT_COUNTS, DEMO_DIMS, PAPER_DIMS, synth


def parse_pairs(values: Sequence[str], option: str) -> dict[str, str]:
    """Returns ``NAME=VALUE`` arguments of a repeated option as a dict.

    Raises:
        StoreError: a value without ``=``, or a name given twice (naming the option).
    """
    out: dict[str, str] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key or not rest:
            raise StoreError(f"{option} {value!r}: expected NAME=VALUE")
        if key in out:
            raise StoreError(f"{option} {key!r} given twice")
        out[key] = rest
    return out


def _dims(text: str) -> dict[str, int]:
    pairs = parse_pairs(text.split(","), "--dims")
    try:
        dims = {m: int(d) for m, d in pairs.items()}
    except ValueError as err:
        raise StoreError(f"--dims {text!r}: dims must be integers ({err})") from None
    if any(d < 1 for d in dims.values()):
        raise StoreError(f"--dims {text!r}: dims must be >= 1")
    return dims


def _targets(text: str) -> list[str] | None:
    if text == "emi":
        return list(EMOTIONS)
    if text == "header":
        return None
    return [t.strip() for t in text.split(",")]


def _pack_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="emimimic pack",
                                description="Build a feature store from split CSVs and per-clip "
                                            "feature files.")
    p.add_argument("dest",
                   help="store folder to create (an interrupted run resumes from DEST.partial)")
    p.add_argument("--split", action="append", required=True, metavar="NAME=CSV",
                   help="split CSV (Filename + targets, or Filename only if unlabelled); repeat")
    p.add_argument("--modality", action="append", required=True, metavar="NAME=DIR",
                   help="folder of {id}.npy / {id}.pkl files with [T, D] features; repeat")
    p.add_argument("--missing", choices=MISSING_POLICIES, default="error",
                   help="a missing feature file is an error (default) or a recorded absence")
    p.add_argument("--targets", default="emi",
                   help="'emi' (the six EMI emotions, default), 'header' (take them from the "
                        "CSV header) or a comma-separated list")
    p.add_argument("--provenance", action="append", default=[], metavar="KEY=VALUE",
                   help="recorded in the manifest, e.g. visual_extractor=ViT-AffectNet; repeat")
    p.add_argument("--weight-column", default=None, metavar="COLUMN",
                   help="CSV column of per-clip sample weights (e.g. sqrt of the annotator "
                        "count), stored with each split and used by every training loss term")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that read and validate feature files (default 1); the store "
                        "is byte-identical whatever the number")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _synth_parser() -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(prog="emimimic synth",
                                description="Write a SYNTHETIC store (not real data) for demos "
                                            "and tests.")
    s.add_argument("dest", help="store folder to create")
    s.add_argument("--seed", type=int, default=0, help="same seed -> byte-identical store")
    for split, count in DEFAULT_COUNTS.items():
        s.add_argument(f"--{split}", type=int, default=count, help=f"{split} clips (0: none)")
    dims = s.add_mutually_exclusive_group()
    dims.add_argument("--dims", type=_dims, default=None, metavar="visual=32,audio=48,text=64",
                      help=f"modality dims (default {DEMO_DIMS})")
    dims.add_argument("--paper-dims", action="store_true", help=f"the paper's dims {PAPER_DIMS}")
    s.add_argument("--targets", default="emi", help="'emi' or a comma-separated list of names")
    s.add_argument("--sample-weights", action="store_true",
                   help="store sqrt(annotator count) sample weights with the labelled splits")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    return s


def pack_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic pack`` and prints a summary of the new store."""
    args = _pack_parser().parse_args(list(argv))
    dest = pack(args.dest, parse_pairs(args.split, "--split"),
                parse_pairs(args.modality, "--modality"),
                missing=args.missing, targets=_targets(args.targets),
                provenance=parse_pairs(args.provenance, "--provenance"), progress=not args.quiet,
                workers=args.workers, weight_column=args.weight_column)
    print(info(str(dest)))


def synth_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic synth`` and prints a summary of the new store."""
    args = _synth_parser().parse_args(list(argv))
    dims = PAPER_DIMS if args.paper_dims else (args.dims or DEMO_DIMS)
    counts = {split: getattr(args, split) for split in DEFAULT_COUNTS}
    targets = _targets(args.targets) or list(EMOTIONS)
    dest = synth(args.dest, seed=args.seed, counts=counts, dims=dims, targets=targets,
                 progress=not args.quiet, sample_weights=args.sample_weights)
    print(info(str(dest)))


def info_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic info STORE``."""
    p = argparse.ArgumentParser(prog="emimimic info", description="Print a summary of a store.")
    p.add_argument("store", help="store folder")
    print(info(p.parse_args(list(argv)).store))


def info(path: str) -> str:
    """Returns a short summary of a store: splits, counts, dims, targets, presence, size."""
    store = FeatureStore(path)
    prov = store.provenance
    lines = [f"store      {store.path}  ({human_bytes(store.nbytes())} on disk)",
             f"targets    {len(store.targets)}: {', '.join(store.targets)}",
             f"modalities {', '.join(f'{m} (D={d})' for m, d in store.dims.items())}"]
    if prov.get("synthetic"):
        lines.append("provenance SYNTHETIC DATA (emimimic synth, seed "
                     f"{prov.get('seed')}): not real features")
    else:
        lines.append(f"provenance {', '.join(f'{k}={v}' for k, v in prov.items())}")
    for name, spec in store.manifest["splits"].items():
        present = ", ".join(f"{m} {100 * spec['present'][m] / max(spec['count'], 1):.1f}%"
                            for m in store.dims)
        kind = "labelled" if spec["labelled"] else "unlabelled"
        kind += ", sample weights" if spec.get("weighted") else ""
        lines.append(f"split      {name}: {spec['count']} clips, {kind}; present: {present}")
    return "\n".join(lines)
