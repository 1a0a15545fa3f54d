"""The LightningModule that trains a network: the paper's :class:`~emimimic.models.EMINetwork` or
any ``nn.Module`` that follows :mod:`emimimic.contract`."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.plugins.precision import MixedPrecision
from torchmetrics import MeanSquaredError, MetricCollection

from emimimic.constants import EMOTIONS
from emimimic.contract import EMIOutput, FeatureBatch
from emimimic.errors import ConfigError, UserError
from emimimic.models import EMINetwork
from emimimic.models.spec import NetworkFactory, build_network
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


def fast_adam(optimizer: torch.optim.Optimizer, fused: bool = True) -> torch.optim.Optimizer:
    """Returns a plain Adam or AdamW rebuilt with torch's fused (or foreach) kernels.

    Left to itself torch steps Adam on the CPU with a loop over the parameters: 8.2 ms a step for
    the paper model's 61 tensors on two cores, against 1.5 ms for the fused kernels and 4.5 ms
    for the foreach ones (the results differ by float rounding). ``fused=False`` picks foreach:
    Lightning's mixed-precision plugin refuses to clip the gradients of a fused optimizer. An
    optimizer whose ``foreach``, ``fused``, ``capturable`` or ``differentiable`` was set, a
    subclass, or parameters the kernels do not take (not floating point, not on a CPU or CUDA
    device) keep what was built.
    """
    cls = type(optimizer)
    chosen = optimizer.defaults
    if (cls not in (torch.optim.Adam, torch.optim.AdamW) or chosen.get("foreach") is not None
            or chosen.get("fused") is not None or chosen.get("capturable")
            or chosen.get("differentiable")):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return optimizer
    accepted = inspect.signature(cls).parameters
    options = {k: v for k, v in chosen.items() if k in accepted and k not in ("foreach", "fused")}
    groups = [{k: v for k, v in group.items() if k not in ("foreach", "fused")}
              for group in optimizer.param_groups]
    return cls(groups, **options, **({"fused": True} if fused else {"foreach": True}))


class EMIModule(LightningModule):
    """Trains a network; owns losses, metrics, optimisation and logging.

    The network is an argument: any ``nn.Module`` built as ``cls(dims, targets, **options)``
    that takes a :class:`~emimimic.contract.FeatureBatch` and returns an
    :class:`~emimimic.contract.EMIOutput` (:mod:`emimimic.contract`). It is built here, from
    the dims and targets the data module links, and kept in ``self.net``; its class path and
    options are saved in every checkpoint, so ``EMIModule.load_from_checkpoint(path)`` alone
    rebuilds it (a class of your own too, when its module is importable).

    Args:
        dims: feature dimension per modality; its keys choose the modalities (linked from the
            data module by the CLI).
        targets: names of the regression targets (linked from the data module by the CLI).
        network: the network's class, ``functools.partial(cls, **options)``, or in YAML
            ``class_path``/``init_args``; default the paper's :class:`~emimimic.models.EMINetwork`.
        loss: loss weights (:class:`~emimimic.training.losses.LossOptions`).
        optimizer: optimizer factory, called with the network's parameter groups (default AdamW
            with torch's defaults; the paper's lr 1e-4 and weight decay 1e-4 are in its configs).
        scheduler: LR-scheduler factory called with the optimizer; None anneals the learning rate
            with a cosine over ``max_epochs``, stepped per epoch.
        lr_multipliers: per-part learning rates: network submodule name -> factor on the
            optimizer's learning rate, e.g. ``{branches.visual: 0.1}`` (for ``EMINetwork`` the
            parts are ``branches.<modality>``, ``fusion`` and ``head``); each names at least one
            parameter; the rest keep the base rate.
    """

    #: Metric and direction that EarlyStopping and ModelCheckpoint follow.
    monitor = "val/pearson"
    mode = "max"

    def __init__(
        self,
        dims: dict[str, int] | None = None,
        targets: Sequence[str] = EMOTIONS,
        network: NetworkFactory = EMINetwork,
        loss: LossOptions = LossOptions(),  # noqa: B008 (an immutable-in-use default)
        optimizer: OptimizerCallable = torch.optim.AdamW,
        scheduler: LRSchedulerCallable | None = None,
        lr_multipliers: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        if not dims:
            raise ValueError(
                "EMIModule needs `dims`, the feature dimension per modality, e.g. "
                "{'visual': 768, 'audio': 1024, 'text': 4096}; "
                "the CLI links it from the data module."
            )
        loss = _options(LossOptions, loss)
        self.targets = list(targets)
        self.net, spec = build_network(network, dict(dims), self.targets)
        self.lr_multipliers = dict(lr_multipliers or {})
        self._param_groups()  # checks the names now, not at the first step
        self.save_hyperparameters({"dims": dict(dims), "targets": self.targets, "network": spec,
                                   "loss": asdict(loss), "lr_multipliers": self.lr_multipliers})
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.criterion = EMILoss(loss)
        metrics = MetricCollection({
            "pearson": EMIPearson(num_targets=len(self.targets), target_names=self.targets),
            "mse": MeanSquaredError(),
        })
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        #: the loss parts' names, clip-weighted sums and clips of this training epoch
        self._parts: tuple[list[str], torch.Tensor, int] | None = None

    def _param_groups(self) -> list[dict[str, Any]]:
        """Returns the parameter groups: one per ``lr_multipliers`` entry, then the rest.

        Raises:
            ConfigError: a name matches no parameter, or a parameter matches two names.
        """
        groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in self.lr_multipliers}
        rest = []
        for pname, param in self.net.named_parameters():
            owners = [n for n in groups if pname == n or pname.startswith(f"{n}.")]
            if len(owners) > 1:
                raise ConfigError(f"lr_multipliers: parameter {pname!r} is in both {owners}")
            (groups[owners[0]] if owners else rest).append(param)
        empty = [n for n, params in groups.items() if not params]
        if empty:
            parts = sorted({n.rsplit(".", 1)[0] for n, _ in self.net.named_parameters()})
            raise ConfigError(f"lr_multipliers: {empty} name no part of the network; its parts "
                              f"with parameters include {parts[:12]}")
        out = [{"params": params, "lr_multiplier": float(self.lr_multipliers[n]), "part": n}
               for n, params in groups.items()]
        return [*out, {"params": rest, "lr_multiplier": 1.0, "part": "rest"}] if rest else out

    def forward(self, batch: FeatureBatch) -> EMIOutput:
        """Returns the network's :class:`~emimimic.models.EMIOutput` for a batch."""
        return self.net(batch)

    def training_step(self, batch: FeatureBatch, batch_idx: int) -> torch.Tensor:
        if batch.target is None:
            raise ValueError(f"training needs a labelled split; the batch with clips "
                             f"{batch.ids[:3]}... has no targets")
        present = {m: batch.present(m) for m in batch.modalities}
        terms = self.criterion(self(batch), batch.target, present, epoch=self.current_epoch,
                               weight=batch.weight)
        self.log("train/loss", terms["loss"].detach(), batch_size=len(batch), on_step=True,
                 on_epoch=True)
        self._log_parts(terms, len(batch))
        return terms["loss"]

    def _log_parts(self, terms: dict[str, torch.Tensor], clips: int) -> None:
        """Logs the loss's parts under the names ``log(on_step=True, on_epoch=True)`` gives.

        ``train/<part>_step`` on the steps Lightning writes to the loggers, and at the end of the
        epoch ``train/<part>_epoch`` (and ``train/<part>``), the mean over the epoch's clips. The
        epoch sums are kept here on the device: Lightning's bookkeeping of one logged value took
        0.4 ms a step on the CPU, 3.4 ms for the nine terms of the paper's loss.
        """
        names = [name for name in terms if name != "loss"]
        if not names:
            return
        values = torch.stack([terms[name].detach().float() for name in names])
        if self._parts is None:
            self._parts = (names, values * clips, clips)
        else:
            _, sums, seen = self._parts
            self._parts = (names, sums + values * clips, seen + clips)
        connector = getattr(self.trainer, "_logger_connector", None)
        if getattr(connector, "should_update_logs", True) or self.trainer.fast_dev_run:
            self.log_dict({f"train/{name}_step": v for name, v in zip(names, values, strict=True)},
                          batch_size=clips, on_step=True, on_epoch=False)

    def on_train_epoch_start(self) -> None:
        self._parts = None

    def on_train_epoch_end(self) -> None:
        if self._parts is not None:
            names, sums, clips = self._parts
            means = dict(zip(names, sums / clips, strict=True))
            self.log_dict({f"train/{n}_epoch": v for n, v in means.items()}, on_epoch=True)
            self.log_dict({f"train/{n}": v for n, v in means.items()}, on_epoch=True,
                          logger=False)

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
        """The optimizer factory's optimizer; cosine annealing over ``max_epochs`` by default.

        The optimizer gets one parameter group per ``lr_multipliers`` entry, its learning rate
        the factory's times the multiplier (set before the scheduler records the base rates).
        """
        groups = self._param_groups()
        # Lightning's mixed precision cannot clip a fused optimizer's gradients: foreach there
        mixed = self._trainer is not None and isinstance(self.trainer.precision_plugin,
                                                         MixedPrecision)
        optimizer = fast_adam(self.optimizer_factory([{"params": g["params"]} for g in groups]),
                              fused=not mixed)
        for group, spec in zip(optimizer.param_groups, groups, strict=True):
            group["lr"] = group["lr"] * spec["lr_multiplier"]
        if self.scheduler_factory is not None:
            scheduler = self.scheduler_factory(optimizer)
        else:
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else 1
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler,
                                                         "interval": "epoch"}}
