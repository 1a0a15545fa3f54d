"""EMIModule under a real Trainer: EMA weights in evaluation, early stopping, learning."""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from support.reference import QUICKSTART

from emimimic.data.datamodule import EMIDataModule
from emimimic.training import EMA, EMIModule, LossOptions
from emimimic.training.module import fast_adam


def adamw(lr: float):
    """The paper's optimizer (AdamW, weight decay 1e-4) at learning rate ``lr``."""
    return partial(torch.optim.AdamW, lr=lr, weight_decay=1e-4)


def _trainer(**kwargs) -> Trainer:
    """A quiet single-process CPU Trainer; ``kwargs`` override or add Trainer arguments."""
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    return Trainer(**{**defaults, **kwargs})


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


class WeightRecorder(Callback):
    """Records raw weights after every optimizer step and the weights each evaluation runs on."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []
        self.validation: list[tuple[int, torch.Tensor]] = []
        self.predict: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append(_flat(pl_module))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.validation.append((len(self.steps), _flat(pl_module)))

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0:
            self.predict.append(_flat(pl_module))


def _reference_ema(steps: list[torch.Tensor], decay: float, warmup: bool) -> list[torch.Tensor]:
    """EMA written out independently: e_1 = w_1, e_k = d_k e_{k-1} + (1 - d_k) w_k."""
    out = [steps[0].double()]
    for k, w in enumerate(steps[1:], start=2):
        d = min(decay, k / (9.0 + k)) if warmup else decay
        out.append(d * out[-1] + (1.0 - d) * w.double())
    return out


@pytest.mark.parametrize("warmup", [False, True])
def test_evaluation_and_predict_use_ema_weights(demo_store, tmp_path, warmup):
    seed_everything(0)
    decay = 0.9
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(3e-3))
    recorder = WeightRecorder()
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, monitor="val/pearson", mode="max", save_last=True
    )
    trainer = _trainer(
        max_epochs=3, callbacks=[EMA(decay=decay, warmup=warmup), recorder, checkpoint]
    )
    trainer.fit(model, datamodule=data)
    ema = _reference_ema(recorder.steps, decay, warmup)
    assert len(recorder.validation) == 3
    for n_steps, weights in recorder.validation:
        torch.testing.assert_close(weights.double(), ema[n_steps - 1], rtol=0, atol=1e-5)
        # The raw weights differ from the EMA ones, so the check above can tell them apart.
        assert (recorder.steps[n_steps - 1] - weights).abs().max() > 1e-4

    trainer.predict(model, datamodule=data)
    torch.testing.assert_close(recorder.predict[-1].double(), ema[-1], rtol=0, atol=1e-5)

    # Lightning's stock callback reloads the RAW weights here; ours must keep the EMA ones.
    best_epoch_steps = torch.load(checkpoint.best_model_path, weights_only=True)["global_step"]
    trainer.predict(model, datamodule=data, ckpt_path="best")
    torch.testing.assert_close(
        recorder.predict[-1].double(), ema[best_epoch_steps - 1], rtol=0, atol=1e-5
    )
    trainer.validate(model, datamodule=data, ckpt_path="best")
    torch.testing.assert_close(
        recorder.validation[-1][1].double(), ema[best_epoch_steps - 1], rtol=0, atol=1e-5
    )


def test_early_stopping_stops(demo_store):
    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=32)
    # lr = 0: the validation score cannot improve, so patience runs out.
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(0.0))
    stopper = EarlyStopping(monitor="val/pearson", mode="max", patience=2)
    trainer = _trainer(
        max_epochs=20, enable_checkpointing=False, limit_train_batches=1, callbacks=[stopper]
    )
    trainer.fit(model, datamodule=data)
    assert stopper.stopped_epoch == 2
    assert trainer.current_epoch == 3  # epochs 0, 1, 2 ran; 17 were skipped


def _time_mean(view, modalities) -> np.ndarray:
    cols = []
    for m in modalities:
        feats = view.read_batch(m, np.arange(len(view))).astype(np.float32).mean(axis=1)
        cols.append(feats * view.present(m)[:, None])
    return np.concatenate(cols, axis=1)


def _mean_pearson(pred: np.ndarray, y: np.ndarray) -> float:
    pc = pred - pred.mean(0)
    yc = y - y.mean(0)
    r = (pc * yc).sum(0) / np.sqrt((pc**2).sum(0) * (yc**2).sum(0))
    return float(np.nan_to_num(r).mean())


@pytest.fixture(scope="module")
def quickstart_store(tmp_path_factory) -> str:
    """The store the README's demo trains on: `emimimic synth` with its defaults."""
    from emimimic.data.synth import synth

    return str(synth(tmp_path_factory.mktemp("quickstart") / "store", seed=0))


def test_short_fit_beats_ridge_on_time_averaged_features(quickstart_store):
    from emimimic.data.store import FeatureStore

    store = FeatureStore(quickstart_store)
    train, valid = store.split("train"), store.split("valid")
    modalities = list(store.dims)
    x_tr, x_va = _time_mean(train, modalities), _time_mean(valid, modalities)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_va = (x_tr - mu) / sd, (x_va - mu) / sd
    x_tr = np.hstack([x_tr, np.ones((len(x_tr), 1))])
    x_va = np.hstack([x_va, np.ones((len(x_va), 1))])
    # Generous to the baseline: the ridge strength is picked on the validation split itself.
    ridge = max(
        _mean_pearson(
            x_va
            @ np.linalg.solve(x_tr.T @ x_tr + a * np.eye(x_tr.shape[1]), x_tr.T @ train.labels),
            valid.labels,
        )
        for a in (0.1, 1.0, 10.0, 100.0, 1000.0)
    )

    seed_everything(0)
    data = EMIDataModule(quickstart_store, batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(1e-3),
                      loss=LossOptions(corr_warmup_epochs=2))
    trainer = _trainer(
        max_epochs=12, enable_checkpointing=False, callbacks=[EMA(decay=0.999, warmup=True)]
    )
    trainer.fit(model, datamodule=data)
    ours = trainer.validate(model, datamodule=data, verbose=False)[0]["val/pearson"]
    print(f"demo store, valid mean Pearson: EMIModule {ours:.4f} vs ridge {ridge:.4f}")
    assert ours > ridge


def test_bf16_mixed_precision_on_cpu_trains_and_scores_in_float32(demo_store):
    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(1e-3))
    trainer = _trainer(max_epochs=2, precision="bf16-mixed", enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    mixed = trainer.validate(model, datamodule=data, verbose=False)[0]
    full = _trainer(precision="32-true").validate(model, datamodule=data, verbose=False)[0]
    assert np.isfinite(mixed["val/pearson"]) and abs(mixed["val/pearson"]) > 0
    # bf16 matmuls perturb the predictions slightly; the metric itself runs in float32.
    assert mixed["val/pearson"] == pytest.approx(full["val/pearson"], abs=0.02)


def test_weights_only_checkpoints_are_refused_with_ema(demo_store, tmp_path):
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets)
    trainer = _trainer(
        max_epochs=1, callbacks=[EMA(), ModelCheckpoint(dirpath=tmp_path, save_weights_only=True)]
    )
    with pytest.raises(ValueError, match="save_weights_only"):
        trainer.fit(model, datamodule=data)
    assert not list(tmp_path.iterdir())


def test_score_raw_logs_the_raw_weights_pearson(demo_store, tmp_path):
    from emimimic.training import LastCheckpoint

    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(3e-3))
    trainer = _trainer(max_epochs=2, callbacks=[EMA(decay=0.9, score_raw=True),
                                                LastCheckpoint(dirpath=str(tmp_path))])
    trainer.fit(model, datamodule=data)
    raw, ema = (float(trainer.callback_metrics[k]) for k in ("val/pearson_raw", "val/pearson"))
    # the raw weights at the last validation are the checkpoint's current_model_state
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    fresh = EMIModule(dims=data.dims, targets=data.targets)
    fresh.load_state_dict(last["current_model_state"])
    scored = _trainer().validate(fresh, datamodule=data, verbose=False)[0]["val/pearson"]
    assert raw == pytest.approx(scored, abs=1e-6)
    assert abs(raw - ema) > 1e-4  # the EMA weights score differently: two things were measured


def test_default_callbacks_give_a_plain_trainer_what_the_cli_has(demo_store, tmp_path, capsys):
    """A notebook's Trainer(callbacks=default_callbacks(...)) writes last.ckpt, the best
    checkpoint and the per-target report, with the very callbacks the CLI runs."""
    from lightning.pytorch.loggers import CSVLogger

    from emimimic.cli import cli_main
    from emimimic.training import default_callbacks
    from emimimic.training.checkpoints import best_checkpoint, load_checkpoint

    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(1e-3))
    callbacks = default_callbacks(tmp_path, ema=EMA(0.999, warmup=True))
    names = [type(c).__name__ for c in callbacks]
    trainer = _trainer(max_epochs=2, callbacks=callbacks, default_root_dir=str(tmp_path),
                       logger=CSVLogger(str(tmp_path), name="logs", version="fit"))
    trainer.fit(model, datamodule=data)
    printed = capsys.readouterr().out
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    best = best_checkpoint(str(tmp_path / "checkpoints"))
    assert Path(best).name.startswith("best-epoch")
    # the per-target report: logged each epoch, printed at the end
    metrics = pd.read_csv(tmp_path / "logs" / "fit" / "metrics.csv")
    assert metrics["val/pearson/Joy"].notna().sum() == 2
    assert re.search(r"^best epoch \d of 2: val/pearson -?\d\.\d{4}$", printed, flags=re.M)
    assert f"best checkpoint: {best}" in printed
    # last.ckpt carries the exact-resume state and the EMA (the CLI's set, not a subset)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert "current_model_state" in state
    assert any(k.startswith("TargetPearson") for k in state["callbacks"])
    cli = cli_main(["-c", str(QUICKSTART), "--data.store", str(demo_store),
                    "--trainer.default_root_dir", str(tmp_path / "cli")], run=False)
    assert len(names) == 9
    assert [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ in names] \
        == [type(c).__name__ for c in trainer.callbacks if type(c).__name__ in names]
    with pytest.raises(TypeError, match="unknown callbacks \\['emaa'\\]"):
        default_callbacks(tmp_path, emaa=None)
    without = default_callbacks(tmp_path, dashboard=None, lr_monitor=None)
    assert len(without) == 7


# --- the fused optimizer and the foreach EMA ---------------------------------------------------


def test_adam_left_to_torch_is_fused_and_steps_as_the_loop_does():
    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    fused = fast_adam(torch.optim.AdamW(nets[0].parameters(), lr=1e-2, weight_decay=1e-2))
    loop = torch.optim.AdamW(nets[1].parameters(), lr=1e-2, weight_decay=1e-2, foreach=False)
    assert isinstance(fused, torch.optim.AdamW) and fused.defaults["fused"] is True
    assert all(g["fused"] is True and g["lr"] == 1e-2 for g in fused.param_groups)
    assert fast_adam(loop) is loop  # an implementation the user chose is kept
    for step in range(20):
        x = torch.randn(16, 7, generator=torch.Generator().manual_seed(step))
        for net, opt in zip(nets, (fused, loop), strict=True):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert (a - b).abs().max() < 1e-6
    assert (nets[0][0].weight - torch.nn.Linear(7, 5).weight).abs().max() > 1e-3  # it moved
    sgd = torch.optim.SGD(nets[0].parameters(), lr=0.1)
    assert fast_adam(sgd) is sgd
    foreach = fast_adam(torch.optim.Adam(nets[0].parameters(), lr=1e-3), fused=False)
    assert foreach.defaults["foreach"] is True and not foreach.defaults["fused"]


def test_mixed_precision_with_clipping_steps_a_foreach_adamw(demo_store):
    # Lightning's mixed-precision plugin refuses to clip a fused optimizer's gradients
    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(1e-3))
    before = _flat(model)
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                       enable_checkpointing=False, precision="bf16-mixed",
                       gradient_clip_val=1.0)
    trainer.fit(model, datamodule=data)
    (optimizer,) = trainer.optimizers
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert trainer.global_step == 2 and (_flat(model) - before).abs().max() > 1e-5


def test_the_module_steps_a_fast_adamw_with_its_lr_multipliers(demo_store):
    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=32)
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(1e-3),
                      lr_multipliers={"branches.text": 0.1})
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                       enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    (optimizer,) = trainer.optimizers
    assert optimizer.defaults["fused"] is True
    assert [g["initial_lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-3])
    assert all(len(optimizer.state[p]) for p in model.parameters())  # every parameter stepped


def test_the_ema_update_is_one_lerp_of_floats_and_copies_integer_buffers():
    from emimimic.training.callbacks import _EMADecay

    averaged = [torch.zeros(3), torch.ones(2, 2)]
    current = [torch.full((3,), 2.0), torch.full((2, 2), 3.0)]
    _EMADecay(0.9, warmup=False)(averaged, current, torch.tensor(5))
    torch.testing.assert_close(averaged[0], torch.full((3,), 0.2))
    torch.testing.assert_close(averaged[1], torch.full((2, 2), 1.2))
    # with warm-up the decay after t updates is min(decay, (1 + t) / (10 + t)): 0.5 at t = 8
    averaged = [torch.zeros(2)]
    _EMADecay(0.9, warmup=True)(averaged, [torch.ones(2)], torch.tensor(8))
    torch.testing.assert_close(averaged[0], torch.full((2,), 0.5))
    counters = [torch.tensor([1, 2])]
    _EMADecay(0.9, warmup=False)(counters, [torch.tensor([5, 7])], torch.tensor(3))
    assert counters[0].tolist() == [5, 7]


@pytest.mark.parametrize("every", [1, 3])
def test_loss_parts_are_logged_as_lightning_names_them_with_clip_weighted_epoch_means(
        demo_store, tmp_path, every):
    from lightning.pytorch.loggers import CSVLogger

    seed_everything(0)
    data = EMIDataModule(str(demo_store), batch_size=40)  # 96 training clips: 40, 40, 16
    model = EMIModule(dims=data.dims, targets=data.targets, optimizer=adamw(1e-3),
                      loss=LossOptions(lambda_corr=0.1, lambda_aux=0.03))
    sizes = []
    model.on_train_batch_start = lambda batch, idx: sizes.append(len(batch))
    trainer = _trainer(max_epochs=2, limit_val_batches=0, enable_checkpointing=False,
                       logger=CSVLogger(tmp_path), log_every_n_steps=every)
    trainer.fit(model, datamodule=data)
    log = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv")
    parts = sorted(c[len("train/"):-len("_epoch")] for c in log.columns
                   if c.endswith("_epoch") and c != "train/loss_epoch")
    assert {"mse", "pearson", "aux"} <= set(parts)
    steps = log.dropna(subset=["train/loss_step"])
    per_epoch = len(sizes) // 2
    # the parts are written on the steps Lightning writes train/loss_step on, and only there
    assert steps["step"].tolist() == [s for s in range(2 * per_epoch) if (s + 1) % every == 0]
    for part in parts:
        assert log.dropna(subset=[f"train/{part}_step"])["step"].tolist() \
            == steps["step"].tolist()
        assert f"train/{part}" in trainer.callback_metrics
    if every == 1:  # every step written: the epoch value is the clip-weighted mean of them
        for epoch in (0, 1):
            rows = steps[steps["epoch"] == epoch]
            clips = np.array(sizes[epoch * per_epoch:(epoch + 1) * per_epoch], dtype=float)
            assert len(rows) == len(clips) and clips.min() < clips.max()
            ends = log.dropna(subset=["train/loss_epoch"])
            ends = ends[ends["epoch"] == epoch]
            for part in [*parts, "loss"]:
                expected = np.sum(rows[f"train/{part}_step"].to_numpy() * clips) / clips.sum()
                assert ends[f"train/{part}_epoch"].item() == pytest.approx(expected, abs=1e-6)
