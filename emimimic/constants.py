"""Names and sizes fixed by the ABAW EMI task and the paper."""

from __future__ import annotations

from collections.abc import Sequence

#: The six EMI targets, in the order of the challenge's label files.
EMOTIONS: tuple[str, ...] = (
    "Admiration",
    "Amusement",
    "Determination",
    "Empathic Pain",
    "Excitement",
    "Joy",
)

#: Modalities served by the feature store, in fusion order.
MODALITIES: tuple[str, ...] = ("visual", "audio", "text")

#: Every clip's feature sequence is pooled to this many time steps.
STEPS: int = 128

#: Name of the id column in ABAW label files.
ID_COLUMN: str = "Filename"


def target_names(count: int, names: Sequence[str] | None = None) -> list[str]:
    """Returns the names of ``count`` targets: ``names`` if given, else the EMI emotions when
    there are six, else ``target 0``, ``target 1``, ...

    Raises:
        ValueError: ``names`` has another length than ``count``.
    """
    if names is not None:
        if len(names) != count:
            raise ValueError(f"{len(names)} target names for {count} targets")
        return list(names)
    return list(EMOTIONS) if count == len(EMOTIONS) else [f"target {k}" for k in range(count)]
