"""The LightningModule that trains an :class:`~emimimic.models.EMINetwork`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanSquaredError, MetricCollection

from emimimic.constants import EMOTIONS
from emimimic.data.batches import FeatureBatch
from emimimic.errors import UserError
from emimimic.models import EMINetwork, EMIOutput, NetworkOptions
from emimimic.training.losses import EMILoss, LossOptions
from emimimic.training.metrics import EMIPearson


@dataclass
class StepPredictions:
    """What the evaluation and predict steps return for a batch (for callbacks and writers).

    Attributes:
        ids: the B clip ids.
        pred: float32 [B, K] predictions (clamped to [0, 1] in ``predict_step``).
        target: float32 [B, K] labels, or None in ``predict_step``.
    """

    ids: list[str]
    pred: torch.Tensor
    target: torch.Tensor | None = None


def _options(cls: type, value: Any) -> Any:
    """Returns ``value`` as a ``cls`` dataclass (checkpoints store the options as plain dicts)."""
    return cls(**value) if isinstance(value, dict) else value


class EMIModule(LightningModule):
    """Trains the paper's multimodal regressor; owns losses, metrics, optimisation and logging.

    The network is a plain :class:`~emimimic.models.EMINetwork` in ``self.net``, built from the
    hyper-parameters saved in every checkpoint, so ``EMIModule.load_from_checkpoint(path)`` alone
    rebuilds the model.

    Args:
        dims: feature dimension per modality; its keys choose the modalities (linked from the
            data module by the CLI).
        targets: names of the regression targets (linked from the data module by the CLI).
        network: architecture options (:class:`~emimimic.models.NetworkOptions`).
        loss: loss weights (:class:`~emimimic.training.losses.LossOptions`).
        optimizer: optimizer factory, called with the network's parameters (default AdamW with
            torch's defaults; the paper's lr 1e-4 and weight decay 1e-4 are set in its configs).
        scheduler: LR-scheduler factory called with the optimizer; None anneals the learning rate
            with a cosine over ``max_epochs``, stepped per epoch.
    """

    #: Metric and direction that EarlyStopping and ModelCheckpoint follow.
    monitor = "val/pearson"
    mode = "max"

    def __init__(
        self,
        dims: dict[str, int] | None = None,
        targets: Sequence[str] = EMOTIONS,
        network: NetworkOptions = NetworkOptions(),  # noqa: B008 (an immutable-in-use default)
        loss: LossOptions = LossOptions(),  # noqa: B008
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError(
                "EMIModule needs `dims`, the feature dimension per modality, e.g. "
                "{'visual': 768, 'audio': 1024, 'text': 4096}; "
                "the CLI links it from the data module."
            )
        network, loss = _options(NetworkOptions, network), _options(LossOptions, loss)
        self.targets = list(targets)
        self.save_hyperparameters({"dims": dict(dims), "targets": self.targets,
                                   "network": asdict(network), "loss": asdict(loss)})
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = EMINetwork(dims=dict(dims), num_targets=len(self.targets), options=network)
        self.criterion = EMILoss(loss)
        metrics = MetricCollection({
            "pearson": EMIPearson(num_targets=len(self.targets), target_names=self.targets),
            "mse": MeanSquaredError(),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, batch: FeatureBatch) -> EMIOutput:
        """Returns the network's :class:`~emimimic.models.EMIOutput` for a batch."""
        return self.net(batch)

    def training_step(self, batch: FeatureBatch, batch_idx: int) -> torch.Tensor:
        if batch.target is None:
            raise ValueError(f"training needs a labelled split; the batch with clips "
                             f"{batch.ids[:3]}... has no targets")
        present = {m: batch.present(m) for m in batch.modalities}
        terms = self.criterion(self(batch), batch.target, present, epoch=self.current_epoch)
        self.log_dict({f"train/{name}": value.detach() for name, value in terms.items()},
                      batch_size=len(batch), on_step=True, on_epoch=True)
        return terms["loss"]

    def _eval_step(self, batch: FeatureBatch, metrics: MetricCollection) -> StepPredictions:
        """Updates the stage's metrics; returns the batch's ids, predictions and targets."""
        if batch.target is None:
            raise UserError(
                f"{metrics.prefix.rstrip('/')} needs a labelled split, but the batch with clips "
                f"{batch.ids[:3]}... has no targets; choose a labelled split (--data.val_split, "
                "--data.test_split)"
            )
        # Metrics take float32 whatever the training precision: fp16/bf16 lose 1e-3..1e-2 of r.
        pred, target = self(batch).pred.float(), batch.target.float()
        metrics.update(pred, target)
        return StepPredictions(list(batch.ids), pred.detach(), target)

    def _log_eval(self, metrics: MetricCollection) -> None:
        """Logs the mean Pearson (per-target values: the TargetPearson callback) and the MSE."""
        stage = metrics.prefix.rstrip("/")
        r = metrics["pearson"].compute()
        self.log(f"{stage}/pearson", r.mean(), prog_bar=True)
        self.log(f"{stage}/mse", metrics["mse"].compute())
        metrics.reset()

    def validation_step(self, batch: FeatureBatch, batch_idx: int) -> StepPredictions:
        return self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval(self.val_metrics)

    def test_step(self, batch: FeatureBatch, batch_idx: int) -> StepPredictions:
        return self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval(self.test_metrics)

    def predict_step(self, batch: FeatureBatch, batch_idx: int) -> StepPredictions:
        """Returns the clip ids and their float32 predictions, clamped to [0, 1] (only here)."""
        return StepPredictions(list(batch.ids), self(batch).pred.float().clamp(0.0, 1.0))

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer factory's optimizer; cosine annealing over ``max_epochs`` by default."""
        optimizer = self.optimizer_factory(self.net.parameters())
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "epoch"}}
