"""The LightningModule that trains an :class:`~emimimic.models.EMINetwork`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanSquaredError, MetricCollection

from emimimic.constants import EMOTIONS
from emimimic.losses import EMILoss
from emimimic.metrics import EMIPearson, pearson_dict
from emimimic.models import EMINetwork

Batch = dict[str, Any]


class EMIModule(LightningModule):
    """Trains the paper's multimodal regressor; owns losses, metrics, optimisation and logging.

    The network itself is a plain :class:`~emimimic.models.EMINetwork` in ``self.net``, built from
    this module's hyper-parameters so that a checkpoint alone is enough to rebuild it.

    Args:
        dims: feature dimension per modality; its keys choose the modalities (linked from the
            data module by the CLI).
        targets: names of the regression targets (linked from the data module by the CLI).
        fusion: ``"concat"`` (the paper's choice) or ``"average"``.
        pooling: ``"mean"`` (the authors' final run) or ``"attention"``.
        temporal: add the temporal-enhancement block (Conv1d + BiGRU) to every branch.
        vad: add the VAD-aware latent pathway to the audio branch.
        hidden: width of the branch embeddings and of the head.
        dropout: dropout ratio everywhere.
        lambda_corr: weight of the batch Pearson loss.
        corr_warmup_epochs: epochs over which ``lambda_corr`` ramps up linearly (0: no ramp).
        lambda_aux: weight of the auxiliary branch losses.
        aux_weights: per-modality weights inside the auxiliary loss.
        lambda_vad: weight of the VAD latent prior.
        lr: AdamW learning rate (used when ``optimizer`` is not given).
        weight_decay: AdamW weight decay (used when ``optimizer`` is not given).
        optimizer: optional optimizer factory overriding AdamW (e.g. from the CLI).
        scheduler: optional LR-scheduler factory overriding cosine annealing over ``max_epochs``.
    """

    #: Metric and direction that EarlyStopping and ModelCheckpoint follow.
    monitor = "val/pearson"
    mode = "max"

    def __init__(
        self,
        dims: dict[str, int] | None = None,
        targets: Sequence[str] = EMOTIONS,
        fusion: str = "concat",
        pooling: str = "mean",
        temporal: bool = False,
        vad: bool = True,
        hidden: int = 256,
        dropout: float = 0.2,
        lambda_corr: float = 0.1,
        corr_warmup_epochs: int = 8,
        lambda_aux: float = 0.03,
        aux_weights: dict[str, float] | None = None,
        lambda_vad: float = 0.01,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        optimizer: OptimizerCallable | None = None,
        scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError(
                "EMIModule needs `dims`, the feature dimension per modality, e.g. "
                "{'visual': 768, 'audio': 1024, 'text': 4096}; "
                "the CLI links it from the data module."
            )
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.targets = list(targets)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.net = EMINetwork(
            dims=dict(dims),
            num_targets=len(self.targets),
            fusion=fusion,
            pooling=pooling,
            temporal=temporal,
            vad=vad,
            hidden=hidden,
            dropout=dropout,
        )
        loss_kwargs: dict[str, Any] = {}
        if aux_weights is not None:
            loss_kwargs["aux_weights"] = dict(aux_weights)
        self.criterion = EMILoss(
            lambda_corr=lambda_corr,
            corr_warmup_epochs=corr_warmup_epochs,
            lambda_aux=lambda_aux,
            lambda_vad=lambda_vad,
            **loss_kwargs,
        )
        metrics = MetricCollection(
            {
                "pearson": EMIPearson(num_targets=len(self.targets), target_names=self.targets),
                "mse": MeanSquaredError(),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def forward(self, batch: Batch):
        """Returns the network's :class:`~emimimic.models.EMIOutput` for a batch."""
        return self.net(batch["features"], batch.get("present"))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        terms = self.criterion(out, batch["target"], batch.get("present"), epoch=self.current_epoch)
        batch_size = batch["target"].shape[0]
        self.log_dict(
            {f"train/{name}": value.detach() for name, value in terms.items()},
            batch_size=batch_size,
            on_step=True,
            on_epoch=True,
        )
        return terms["loss"]

    def _eval_step(self, batch: Batch, metrics: MetricCollection) -> None:
        if "target" not in batch:
            raise ValueError(
                f"{metrics.prefix.rstrip('/')} needs a labelled split, but the batch with clips "
                f"{batch['ids'][:3]}... has no targets"
            )
        # Metrics take float32 whatever the training precision: fp16/bf16 lose 1e-3..1e-2 of r.
        pred = self(batch).pred.float()
        metrics.update(pred, batch["target"].float())

    def _log_eval(self, metrics: MetricCollection) -> None:
        stage = metrics.prefix.rstrip("/")
        values = pearson_dict(metrics["pearson"].compute(), self.targets, prefix=f"{stage}/pearson")
        values[f"{stage}/mse"] = metrics["mse"].compute()
        self.log_dict(values)
        metrics.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_eval(self.val_metrics)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_eval(self.test_metrics)

    def predict_step(self, batch: Batch, batch_idx: int) -> dict[str, Any]:
        """Returns the clip ids and their float32 predictions in [0, 1]."""
        return {"ids": list(batch["ids"]), "pred": self(batch).pred.float().clamp(0.0, 1.0)}

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with cosine annealing over ``max_epochs`` unless factories were given."""
        params = self.net.parameters()
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            optimizer = torch.optim.AdamW(
                params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
            )
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
