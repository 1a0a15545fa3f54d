"""Training: the LightningModule, its losses and metrics, and the callbacks it runs with.

Names are imported on first use, so the parts that need no Lightning (losses, correlation,
checkpoint reading) can be used without importing it.
"""

from __future__ import annotations

from emimimic.lazy import lazy_names

_LAZY = {
    "EMA": "emimimic.training.callbacks",
    "EpochSeed": "emimimic.training.callbacks",
    "LastCheckpoint": "emimimic.training.callbacks",
    "default_callbacks": "emimimic.training.callbacks",
    "EMILoss": "emimimic.training.losses",
    "LossOptions": "emimimic.training.losses",
    "pearson_loss": "emimimic.training.losses",
    "ccc_loss": "emimimic.training.losses",
    "EMIPearson": "emimimic.training.metrics",
    "pearson_dict": "emimimic.training.metrics",
    "EMIModule": "emimimic.training.module",
    "TargetPearson": "emimimic.training.report",
    "SubmissionWriter": "emimimic.training.submission",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_names(__name__, _LAZY)
