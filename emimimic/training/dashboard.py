"""Predictions of a split with a trained network, and the W&B dashboard made from them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from emimimic.constants import ID_COLUMN
from emimimic.data.datamodule import EMIDataModule
from emimimic.training.checkpoints import load_checkpoint


@dataclass
class SplitPredictions:
    """A network's outputs over a whole split, in split order.

    Attributes:
        ids: the N clip ids.
        pred: float32 [N, K] predictions.
        target: float32 [N, K] labels, or None for an unlabelled split.
        vad: float32 [N, 3] audio VAD latents (NaN rows for clips without audio), or None.
        weights: modality -> float32 [N, K] weights a weighing fusion gave each modality
            (``gated``), or None.
    """

    ids: list[str]
    pred: np.ndarray
    target: np.ndarray | None
    vad: np.ndarray | None
    weights: dict[str, np.ndarray] | None = None

    def table(self, targets: list[str]) -> pd.DataFrame:
        """Returns one row per clip: id, each target's label (``true/…``) and prediction."""
        out = pd.DataFrame({ID_COLUMN: self.ids})
        for k, name in enumerate(targets):
            if self.target is not None:
                out[f"true/{name}"] = self.target[:, k]
            out[f"pred/{name}"] = self.pred[:, k]
        return out


@torch.no_grad()
def predict_split(net: torch.nn.Module, data: EMIDataModule, split: str,
                  device: torch.device | str = "cpu") -> SplitPredictions:
    """Returns ``net``'s predictions (eval mode) over every clip of ``split`` of ``data``."""
    was_training = net.training
    net.eval()
    dataset = data.dataset(split)
    ids, preds, targets, vads = [], [], [], []
    weights: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(dataset), data.batch_size):
        plan = dataset.__getitems__(range(start, min(start + data.batch_size, len(dataset))))
        batch = data.prepare_batch(plan, device)
        out = net(batch)
        ids += batch.ids
        preds.append(out.pred.float().cpu())
        if batch.target is not None:
            targets.append(batch.target.float().cpu())
        if out.vad is not None:
            vad = out.vad.float().cpu()
            vad[~batch.present("audio").cpu()] = float("nan")
            vads.append(vad)
        for m, w in (out.weights or {}).items():
            weights.setdefault(m, []).append(w.float().cpu())
    net.train(was_training)
    return SplitPredictions(ids=ids, pred=torch.cat(preds).numpy(),
                            target=torch.cat(targets).numpy() if targets else None,
                            vad=torch.cat(vads).numpy() if vads else None,
                            weights={m: torch.cat(w).numpy() for m, w in weights.items()}
                            or None)


class WandbDashboard(Callback):
    """At the end of fit, logs the best checkpoint's validation results to W&B as pictures.

    With the EMA weights of the best checkpoint: a per-target Pearson bar chart
    (``best/pearson_bars``), a predicted-vs-true scatter per target (``best/scatter``) and a table
    of the validation predictions (``best/predictions``: clip id, targets, predictions), plus
    ``best/pearson`` and ``best/epoch`` in the run summary; with a weighing fusion (``gated``)
    also each modality's weight per target and clip (``best/modality_weights``). Does nothing
    without a WandbLogger.
    """

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        best = getattr(trainer.checkpoint_callback, "best_model_path", "")
        if logger is None or not best or not trainer.is_global_zero:
            return
        import wandb

        from emimimic import plots
        from emimimic.experiments.stats import pearson

        checkpoint = load_checkpoint(best)
        net = copy.deepcopy(pl_module.net)
        net.load_state_dict({k[len("net."):]: v for k, v in checkpoint["state_dict"].items()
                             if k.startswith("net.")})
        data = trainer.datamodule
        result = predict_split(net, data, data.split_names["validate"], pl_module.device)
        targets = list(pl_module.targets)
        r = pearson(result.pred, result.target, targets)
        media = {
            "best/pearson_bars": wandb.Image(_rgb(plots.pearson_bars(r, targets))),
            "best/scatter": wandb.Image(_rgb(plots.scatter_grid(result.pred, result.target,
                                                                targets))),
            "best/predictions": wandb.Table(dataframe=result.table(targets)),
        }
        if result.weights:
            media["best/modality_weights"] = wandb.Image(
                _rgb(plots.modality_weights(result.weights, targets)))
        logger.experiment.log(media)
        logger.experiment.summary["best/pearson"] = float(np.mean(r))
        logger.experiment.summary["best/epoch"] = int(checkpoint["epoch"])


def _rgb(fig: Any) -> np.ndarray:
    """Returns a figure rendered as an RGB array (what ``wandb.Image`` takes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
