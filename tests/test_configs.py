"""Every shipped config parses and instantiates model, data and trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from support.reference import REPO

from emimimic.cli import cli_main
from emimimic.errors import ConfigError

PAPER_BASE = REPO / "configs" / "paper" / "base.yaml"
EXPERIMENTS = sorted(
    [p for p in (REPO / "configs" / "paper").rglob("*.yaml") if p != PAPER_BASE]
    + list((REPO / "configs" / "peers").glob("*.yaml"))
    + list((REPO / "configs" / "overlays").glob("*.yaml"))
)


def _build(configs: list[Path], store: str, *extra: str):
    args = [a for c in configs for a in ("-c", str(c))]
    return cli_main([*args, "--data.store", str(store), *extra], run=False)


def test_quickstart_instantiates(demo_store):
    cli = _build([REPO / "configs" / "quickstart.yaml"], demo_store)
    network = cli.model.hparams.network["init_args"]
    assert network["fusion"] == "concat" and network["vad"]
    assert cli.model.hparams.dims == cli.datamodule.dims
    assert cli.trainer.max_epochs == 12


@pytest.mark.parametrize(
    "experiment", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "configs"))
)
def test_experiment_instantiates(demo_store, experiment):
    spec = yaml.safe_load(experiment.read_text())
    # The paper runs on a GPU in 16-bit; here the trainer is built for the CPU.
    cli = _build(
        [PAPER_BASE, experiment],
        demo_store,
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
    )
    network = spec["model"].get("network", {})
    for key, value in network.get("init_args", network).items():
        assert cli.model.hparams.network["init_args"][key] == value, key
    for key, value in spec["model"].get("loss", {}).items():
        assert cli.model.hparams.loss[key] == value, key
    assert cli.model.hparams.lr_multipliers == spec["model"].get("lr_multipliers", {})
    if "modalities" in spec.get("data", {}):
        assert list(cli.model.hparams.dims) == spec["data"]["modalities"]
    assert cli.trainer.max_epochs == 30
    assert cli.trainer.gradient_clip_val == 1.0
    ema = [c for c in cli.trainer.callbacks if type(c).__name__ == "EMA"]
    assert ema and ema[0].decay == 0.999


def test_wandb_logger_config_instantiates(demo_store, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cli = _build(
        [REPO / "configs" / "quickstart.yaml", REPO / "configs" / "logger" / "wandb.yaml"],
        demo_store,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
    )
    # W&B, with the CSV log kept beside it
    assert [type(lg).__name__ for lg in cli.trainer.loggers] == ["CSVLogger", "WandbLogger"]


def test_optimizer_and_scheduler_overridable_from_the_cli(demo_store):
    cli = _build(
        [REPO / "configs" / "quickstart.yaml"],
        demo_store,
        "--model.optimizer",
        "torch.optim.SGD",
        "--model.optimizer.lr",
        "0.05",
        "--model.scheduler",
        "torch.optim.lr_scheduler.StepLR",
        "--model.scheduler.step_size",
        "3",
    )
    cli.model.trainer = cli.trainer
    config = cli.model.configure_optimizers()
    assert type(config["optimizer"]).__name__ == "SGD"
    assert config["optimizer"].param_groups[0]["lr"] == 0.05
    assert type(config["lr_scheduler"]["scheduler"]).__name__ == "StepLR"


def test_default_optimizer_is_adamw_with_cosine(demo_store):
    cli = _build(
        [REPO / "configs" / "paper" / "base.yaml"],
        demo_store,
        "--trainer.accelerator",
        "cpu",
        "--trainer.precision",
        "32-true",
    )
    cli.model.trainer = cli.trainer
    config = cli.model.configure_optimizers()
    group = config["optimizer"].param_groups[0]
    assert type(config["optimizer"]).__name__ == "AdamW"
    assert (group["lr"], group["weight_decay"]) == (1e-4, 1e-4)
    scheduler = config["lr_scheduler"]["scheduler"]
    assert type(scheduler).__name__ == "CosineAnnealingLR" and scheduler.T_max == 30


PEERS = sorted((REPO / "configs" / "peers").glob("*.yaml"))


@pytest.mark.parametrize("peer", PEERS, ids=lambda p: p.stem)
def test_peer_config_trains_on_the_demo_protocol(demo_store, peer, tmp_path):
    """Each peer's parts run: a fast_dev_run fit over the quickstart protocol."""
    cli = _build([REPO / "configs" / "quickstart.yaml", peer], demo_store,
                 "--trainer.fast_dev_run", "2", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false")
    before = {n: p.detach().clone() for n, p in cli.model.net.named_parameters()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    moved = [n for n, p in cli.model.net.named_parameters() if not torch.equal(p, before[n])]
    assert moved and cli.trainer.global_step == 2


def test_lr_multipliers_give_each_part_its_learning_rate(demo_store):
    cli = _build([REPO / "configs" / "quickstart.yaml", REPO / "configs" / "peers" /
                  "netease_fuxi.yaml"], demo_store)
    cli.model.trainer = cli.trainer
    optimizer = cli.model.configure_optimizers()["optimizer"]
    names = {id(p): n for n, p in cli.model.net.named_parameters()}
    base = 1e-3  # the quickstart's AdamW rate
    seen = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            slow = name.startswith(("branches.visual.", "head."))
            assert group["lr"] == pytest.approx(base * (0.01 if slow else 1.0)), name
            seen += 1
    assert seen == len(names)
    with pytest.raises(ConfigError, match="name no part of the network"):
        _build([REPO / "configs" / "quickstart.yaml"], demo_store,
               "--model.lr_multipliers", "{branches.face: 0.1}")


def test_debug_config_runs_one_batch_and_saves_nothing(demo_store, tmp_path):
    cli = cli_main(["fit", "-c", str(REPO / "configs" / "quickstart.yaml"), "-c",
                    str(REPO / "configs" / "debug.yaml"), "--data.store", str(demo_store),
                    "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.global_step == 1 and cli.trainer.fast_dev_run
    assert not (tmp_path / "checkpoints").exists()
