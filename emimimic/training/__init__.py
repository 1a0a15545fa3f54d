"""Training: the LightningModule and the callbacks that configure Lightning's own machinery."""

from emimimic.training.callbacks import EMA, SubmissionWriter
from emimimic.training.module import EMIModule

__all__ = ["EMA", "EMIModule", "SubmissionWriter"]
