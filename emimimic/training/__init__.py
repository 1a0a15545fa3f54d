"""Training: the LightningModule, its losses and metrics, and the callbacks it runs with."""

from emimimic.training.callbacks import EMA, EpochSeed, LastCheckpoint
from emimimic.training.losses import EMILoss, LossOptions, pearson_loss
from emimimic.training.metrics import EMIPearson, pearson_dict
from emimimic.training.module import EMIModule
from emimimic.training.report import TargetPearson
from emimimic.training.submission import SubmissionWriter

__all__ = [
    "EMA",
    "EMILoss",
    "EMIModule",
    "EMIPearson",
    "EpochSeed",
    "LastCheckpoint",
    "LossOptions",
    "SubmissionWriter",
    "TargetPearson",
    "pearson_dict",
    "pearson_loss",
]
