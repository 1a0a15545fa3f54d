"""emimimic: Emotional Mimicry Intensity estimation with PyTorch Lightning."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from emimimic.constants import EMOTIONS, MODALITIES, STEPS

__version__ = "0.1.0"

#: Public classes, imported on first use so ``import emimimic`` stays light.
_LAZY = {
    "EMIDataModule": "emimimic.data",
    "FeatureStore": "emimimic.data",
    "EMIModule": "emimimic.training",
    "EMINetwork": "emimimic.models",
}

__all__ = ["EMOTIONS", "MODALITIES", "STEPS", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'emimimic' has no attribute {name!r}")
