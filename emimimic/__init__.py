"""emimimic: Emotional Mimicry Intensity estimation with PyTorch Lightning."""

from __future__ import annotations

from emimimic.constants import EMOTIONS, MODALITIES, STEPS
from emimimic.lazy import lazy_names

__version__ = "0.2.0"

#: Public classes, imported on first use so ``import emimimic`` stays light.
_LAZY = {
    "EMIDataModule": "emimimic.data",
    "FeatureStore": "emimimic.data",
    "EMIModule": "emimimic.training",
    "EMINetwork": "emimimic.models",
}

__all__ = ["EMOTIONS", "MODALITIES", "STEPS", "__version__", *_LAZY]


__getattr__ = lazy_names(__name__, _LAZY)
