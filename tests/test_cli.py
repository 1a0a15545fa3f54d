"""The LightningCLI as a user drives it: fit, then validate/test/predict in fresh processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from support.reference import QUICKSTART as QUICKSTART_PATH
from support.reference import REPO

import emimimic
from emimimic.__main__ import COMMANDS, main
from emimimic.cli import best_checkpoint, cli_main
from emimimic.errors import UserError

QUICKSTART = str(QUICKSTART_PATH)


def _run(
    *args: str, env: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "emimimic", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests"), **(env or {})},
    )
    assert not check or proc.returncode == 0, (
        f"emimimic {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _quickstart(command: str, store: str, root: Path | str, *extra: str) -> list[str]:
    """Arguments of an `emimimic COMMAND` on the quickstart config, quiet, in run folder `root`."""
    return [
        command,
        "-c",
        QUICKSTART,
        "--data.store",
        store,
        "--trainer.default_root_dir",
        str(root),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    ]


def _metrics(root: Path, stage: str) -> pd.DataFrame:
    """Returns the metrics of a run folder's latest `emimimic STAGE` (logs/STAGE/metrics.csv)."""
    return pd.read_csv(root / "logs" / stage / "metrics.csv")


@pytest.fixture(scope="module")
def store(demo_store) -> str:
    return str(demo_store)


@pytest.fixture(scope="module")
def fitted(store, tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    cli_main(_quickstart("fit", store, root, "--trainer.max_epochs", "3"))
    return root


def test_fit_writes_best_and_last_checkpoints(fitted):
    best = best_checkpoint(str(fitted / "checkpoints"))
    assert Path(best).is_file() and Path(best).name.startswith("best-epoch")
    ckpt = torch.load(best, weights_only=True)
    # The EMA callback stores the averaged weights as state_dict and the raw ones beside them.
    assert "current_model_state" in ckpt
    assert any(
        not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k])
        for k in ckpt["state_dict"]
    )
    history = _metrics(fitted, "fit")
    scores = history["val/pearson"].dropna()
    assert len(scores) == 3
    assert ckpt["callbacks"]
    recorded = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert float(recorded["best_model_score"]) == pytest.approx(scores.max(), abs=1e-6)


@pytest.mark.slow
def test_validate_best_in_fresh_process_reproduces_fit_score(fitted, store):
    root = fitted
    _run(*_quickstart("validate", store, root, "--ckpt_path", "best"))
    validated = _metrics(root, "validate")["val/pearson"].dropna().iloc[-1]
    assert validated == pytest.approx(_metrics(root, "fit")["val/pearson"].max(), abs=1e-5)


@pytest.mark.slow
def test_predict_best_writes_submission_once_per_clip(fitted, store, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    args = _quickstart(
        "predict", store, fitted, "--ckpt_path", "best", "--submission.path", str(out)
    )
    _run(*args)
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    # The header exactly as the challenge's label files spell it.
    header = "Filename,Admiration,Amusement,Determination,Empathic Pain,Excitement,Joy"
    assert rows[0] == header.split(",")
    from emimimic.data.store import FeatureStore

    expected = FeatureStore(store).split("test").ids
    ids = [r[0] for r in rows[1:]]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    values = torch.tensor([[float(v) for v in r[1:]] for r in rows[1:]])
    assert values.min() >= 0 and values.max() <= 1 and values.std(0).min() > 0

    # A second predict must not overwrite the user's file (asked in this process: the same CLI).
    before = out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert refused.value.code != 0 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.slow
def test_ddp_validate_and_predict_match_one_process(fitted, tmp_path):
    from emimimic.data.synth import synth

    # Odd split sizes: 2 ranks get uneven shards, which padding samplers would even out by
    # repeating clips. Same (default) dims as the store the checkpoint was trained on.
    odd = str(synth(tmp_path / "odd", seed=3, counts={"train": 8, "valid": 63, "test": 31}))
    best = best_checkpoint(str(fitted / "checkpoints"))
    common = [
        "-c",
        QUICKSTART,
        "--data.store",
        odd,
        "--trainer.enable_progress_bar",
        "false",
        "--ckpt_path",
        best,
        "--data.batch_size",
        "7",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    # the one-process runs in this process (a fresh one is another test's point), DDP's in two
    cli_main(["validate", *common, "--trainer.default_root_dir", str(one)])
    ddp = _run(
        "validate",
        *common,
        "--trainer.default_root_dir",
        str(two),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        timeout=600,
    )
    assert "Starting with 2 processes" in ddp.stdout + ddp.stderr
    r1 = _metrics(one, "validate")["val/pearson"].dropna().iloc[-1]
    r2 = _metrics(two, "validate")["val/pearson"].dropna().iloc[-1]
    assert r2 == pytest.approx(r1, abs=1e-6)

    sub1, sub2 = tmp_path / "one.csv", tmp_path / "two.csv"
    cli_main(["predict", *common, "--trainer.default_root_dir", str(one), "--submission.path",
              str(sub1)])
    _run(
        "predict",
        *common,
        "--trainer.default_root_dir",
        str(two),
        "--submission.path",
        str(sub2),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        timeout=600,
    )
    a, b = pd.read_csv(sub1, dtype={"Filename": str}), pd.read_csv(sub2, dtype={"Filename": str})
    assert len(a) == 31 and list(a["Filename"]) == list(b["Filename"])
    assert (a.drop(columns="Filename") - b.drop(columns="Filename")).abs().max().max() < 1e-5


def test_best_without_fit_names_the_missing_file(tmp_path):
    with pytest.raises(UserError, match="last.ckpt"):
        best_checkpoint(str(tmp_path))


@pytest.mark.slow
def test_wandb_offline_runs_hold_metrics_and_pictures(store, tmp_path):
    pytest.importorskip("wandb")
    from support.wandb_log import logged

    args = [
        "fit", "-c", QUICKSTART, "-c", str(REPO / "configs/logger/wandb.yaml"),
        "--data.store", store, "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb"),
        "--trainer.max_epochs", "2", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb"),
           "EMIMIMIC_WANDB_GROUP": "sweep-a"}
    # Two runs (own checkpoint folders) logging into one W&B folder, as a sweep would.
    for seed in ("1", "2"):
        _run(*args, "--seed_everything", seed, "--trainer.default_root_dir",
             str(tmp_path / f"run{seed}"), env=env)
        # the CSV log is kept beside W&B
        assert (tmp_path / f"run{seed}" / "logs" / "fit" / "metrics.csv").is_file()
    assert len(list((tmp_path / "wandb" / "configs").glob("*.yaml"))) == 2
    runs = sorted((tmp_path / "wandb").glob("wandb/offline-run-*"))
    assert len(runs) == 2
    names = set()
    for run in runs:
        keys = logged(next(run.glob("run-*.wandb")))
        names |= {k for k in keys["run"] if k.startswith("name=")}
        assert {"group=sweep-a", "tag=quickstart"} <= keys["run"]
        history = keys["history"]
        targets = [f"val/pearson/{t}" for t in emimimic.EMOTIONS]
        for key in ("val/pearson", *targets, "lr-AdamW", "train/loss_step", "train/mse_step",
                    "train/pearson_step", "train/aux_step", "train/vad_prior_step"):
            assert key in history, key
        for media in ("best/pearson_bars", "best/scatter", "best/predictions"):
            assert f"{media}/_type" in history, media
        assert {"best/pearson", "best/epoch"} <= keys["summary"]
        assert {"network", "loss", "dims"} <= keys["config"]
        images = sorted(p.name.split("_")[0] for p in run.glob("files/media/images/best/*.png"))
        assert images == ["pearson", "scatter"]
        assert list(run.glob("files/media/table/best/predictions_*.table.json"))
    assert names == {"name=quickstart-seed1", "name=quickstart-seed2"}


def test_second_fit_refuses_then_resumes_from_last(store, tmp_path):
    root = tmp_path / "run"
    args = _quickstart("fit", store, root, "--trainer.log_every_n_steps", "1")
    first = cli_main([*args, "--trainer.max_epochs", "2"]).trainer.global_step
    before = sorted(p.name for p in (root / "checkpoints").iterdir())
    with pytest.raises(UserError, match="--ckpt_path last"):
        cli_main([*args, "--trainer.max_epochs", "2"])
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == before

    cli = cli_main([*args, "--trainer.max_epochs", "4", "--ckpt_path", "last"])
    # Epochs 0-1 come from the checkpoint, only epochs 2-3 run now.
    assert cli.trainer.current_epoch == 4 and cli.trainer.global_step == 2 * first
    steps = _metrics(root, "fit").dropna(subset=["train/loss_step"])["step"]
    # one continuous log: the first run's steps, then the resumed run's, none twice
    assert steps.tolist() == list(range(steps.min(), steps.min() + len(steps)))
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3
    assert Path(best_checkpoint(str(root / "checkpoints"))).is_file()


def test_submission_writer_refuses_duplicated_or_missing_clips(tmp_path):
    from types import SimpleNamespace

    from emimimic.training import SubmissionWriter

    trainer = SimpleNamespace(datamodule=SimpleNamespace(predict_ids=["00001", "00002"]))
    writer = SubmissionWriter(path=str(tmp_path / "s.csv"))
    with pytest.raises(RuntimeError, match="more than once"):
        writer._write(writer.path, ["Joy"], [("00001", [0.1]), ("00001", [0.2])], trainer)
    with pytest.raises(RuntimeError, match="no prediction for clips \\['00002'\\]"):
        writer._write(writer.path, ["Joy"], [("00001", [0.1])], trainer)
    assert not (tmp_path / "s.csv").exists()
    writer._write(writer.path, ["Joy"], [("00002", [1.0]), ("00001", [0.25])], trainer)
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "Filename,Joy",
        "00001,0.250000",
        "00002,1.000000",
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _main_error(capsys, *argv: str) -> str:
    """Runs `emimimic ARGV` in this process; returns its stderr, asserting exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing store", "nowhere: feature store does not exist"),
        ("missing config", "absent.yaml: no such config file"),
        ("bad yaml", "bad.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at "
                     "line 3, column 1)"),
        ("negative batch size", "data.batch_size"),
        ("unknown fusion", "fusion 'foo' is not a built-in fusion (average, concat, gated, "
                            "text_query) nor a class path"),
        ("existing destination", "destination already exists"),
        # Lightning's own optimizer options are off: AdamW + cosine cannot be silently replaced
        ("lightning optimizer", "unrecognized arguments: --optimizer Adam"),
        ("lightning scheduler", "unrecognized arguments: --lr_scheduler StepLR"),
        # an option prefix is an unknown option, not max_epochs
        ("option prefix", "unrecognized arguments: --trainer.max_epoch 1"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(case, expected, store, tmp_path, capsys):
    argv = {
        "missing store": ["fit", "-c", QUICKSTART, "--data.store", str(tmp_path / "nowhere")],
        "missing config": ["fit", "-c", str(tmp_path / "absent.yaml")],
        "bad yaml": ["fit", "-c",
                     str(_write(tmp_path / "bad.yaml", "trainer:\n  devices: [1, 2\n"))],
        "negative batch size": ["fit", "-c", QUICKSTART, "--data.store", store,
                                "--data.batch_size", "-1",
                                "--trainer.default_root_dir", str(tmp_path / "run")],
        "unknown fusion": ["fit", "-c", QUICKSTART, "--data.store", store,
                           "--model.network.fusion", "foo"],
        "existing destination": ["synth", store],
        **{case: ["fit", "-c", QUICKSTART, "--data.store", store, "--trainer.default_root_dir",
                  str(tmp_path / "run"), *extra.split()]
           for case, extra in [("lightning optimizer", "--optimizer Adam"),
                               ("lightning scheduler", "--lr_scheduler StepLR"),
                               ("option prefix", "--trainer.max_epoch 1")]},
    }[case]
    lines = [line for line in _main_error(capsys, *argv).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert lines[0].startswith(f"emimimic {argv[0]}: error: ") and expected in lines[0]
    # refused before any work: no run folder, no logs
    assert not (tmp_path / "run").exists()


def test_debug_shows_the_traceback(store, tmp_path, monkeypatch):
    monkeypatch.setenv("EMIMIMIC_DEBUG", "1")
    with pytest.raises(UserError, match="destination already exists"):
        main(["synth", store])


def test_help_lists_every_subcommand_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert {"fit", "validate", "test", "predict", "pack", "synth", "info"} <= set(listed)
    main(["--version"])
    assert capsys.readouterr().out.strip() == f"emimimic {emimimic.__version__}"


def test_fit_tells_the_story_and_it_matches_the_log(store, tmp_path, capsys):
    root = tmp_path / "run"
    # lr 0: the score cannot improve (beyond EMA rounding noise, hence min_delta), so early
    # stopping ends the run after `patience` epochs
    cli = cli_main(_quickstart("fit", store, root, "--trainer.max_epochs", "6",
                               "--early_stopping.patience", "2",
                               "--early_stopping.min_delta", "0.001",
                               "--model.optimizer.init_args.lr", "0"))
    out = capsys.readouterr().out
    assert "val/pearson" in cli.trainer.progress_bar_metrics
    log = _metrics(root, "fit").dropna(subset=["val/pearson"]).set_index("epoch")
    best = int(log["val/pearson"].idxmax())
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("best epoch "))
    assert lines[head].startswith(f"best epoch {best} of {len(log)}: val/pearson ")
    assert float(lines[head].split()[-1]) == pytest.approx(log.loc[best, "val/pearson"], abs=1e-4)
    for line, target in zip(lines[head + 1:head + 7], emimimic.EMOTIONS, strict=True):
        name, value = line.rsplit(maxsplit=1)
        assert name.strip() == target
        assert float(value) == pytest.approx(log.loc[best, f"val/pearson/{target}"], abs=1e-4)
    assert lines[head + 7] == f"best checkpoint: {best_checkpoint(str(root / 'checkpoints'))}"
    assert "early stopping at epoch 2: val/pearson did not improve for 2 epochs" in out

    cli_main(_quickstart("validate", store, root, "--ckpt_path", "best"))
    out = capsys.readouterr().out
    assert f"validation: val/pearson {log.loc[best, 'val/pearson']:.4f}" in out


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(command, store, tmp_path, capsys):
    err = _main_error(capsys, *_quickstart(command, store, tmp_path / "run"))
    assert f"`emimimic {command}` needs the weights to evaluate: pass --ckpt_path" in err
    assert not (tmp_path / "run" / "submission.csv").exists()


def test_allow_untrained_evaluates_fresh_weights_on_purpose(store, tmp_path):
    cli = cli_main(_quickstart("validate", store, tmp_path / "run", "--allow_untrained", "true"))
    assert "val/pearson" in cli.trainer.callback_metrics


def test_the_checkpoint_decides_the_model(store, tmp_path, capsys):
    root = tmp_path / "run"
    cli_main(_quickstart("fit", store, root, "--trainer.max_epochs", "1",
                         "--model.network.pooling", "attention", "--data.modalities", "[text]",
                         "--model.network.vad", "false"))
    # no structure options repeated: they come from the checkpoint
    out = tmp_path / "sub.csv"
    cli = cli_main(_quickstart("predict", store, root, "--ckpt_path", "best",
                               "--submission.path", str(out)))
    assert cli.model.hparams.network["init_args"]["pooling"] == "attention"
    assert list(cli.model.hparams.dims) == ["text"] and out.is_file()
    # an explicit option that contradicts the checkpoint is refused, naming both values, for
    # every form of --ckpt_path (a file path too, which Lightning itself would merge silently)
    for form in ("best", "last", best_checkpoint(str(root / "checkpoints"))):
        err = _main_error(capsys, *_quickstart("validate", store, root, "--ckpt_path", form,
                                               "--model.network.temporal", "true"))
        assert ("--model.network.init_args.temporal True conflicts with the checkpoint's "
                "False") in err
        err = _main_error(capsys, *_quickstart("validate", store, root, "--ckpt_path", form,
                                               "--model.network.fusion", "average"))
        assert "fusion 'average' conflicts with the checkpoint's 'concat'" in err


USER_NETWORK = '''
import torch
from emimimic.contract import EMIOutput


class MeanNet(torch.nn.Module):
    """Each modality's time mean, projected, concatenated, one linear head."""

    def __init__(self, dims, targets, width: int = 8):
        super().__init__()
        self.names = sorted(dims)
        self.proj = torch.nn.ModuleDict({m: torch.nn.Linear(d, width) for m, d in dims.items()})
        self.head = torch.nn.Linear(width * len(dims), len(targets))

    def forward(self, batch):
        parts = [self.proj[m](batch.dense(m).float().mean(1)) for m in self.names]
        return EMIOutput(pred=torch.sigmoid(self.head(torch.cat(parts, -1))), aux={})
'''


@pytest.mark.slow
def test_a_network_of_ones_own_trains_and_predicts_from_its_checkpoint_alone(store, tmp_path,
                                                                           monkeypatch):
    package = tmp_path / "mine"
    package.mkdir()
    (package / "usernet.py").write_text(USER_NETWORK)
    config = tmp_path / "user.yaml"
    config.write_text("model:\n  network:\n    class_path: usernet.MeanNet\n"
                      "    init_args: {width: 5}\n")
    env = {"PYTHONPATH": f"{package}{os.pathsep}{REPO / 'tests'}"}
    root = tmp_path / "run"
    _run(*_quickstart("fit", store, root, "-c", str(config), "--trainer.max_epochs", "1"),
         env=env)
    best = best_checkpoint(str(root / "checkpoints"))
    out = tmp_path / "sub.csv"
    # predict with no config at all: the checkpoint names the network and its options
    _run("predict", "--data.store", store, "--ckpt_path", best, "--submission.path", str(out),
         "--trainer.default_root_dir", str(tmp_path / "elsewhere"), env=env)
    written = pd.read_csv(out, dtype={"Filename": str}).set_index("Filename")

    monkeypatch.syspath_prepend(str(package))
    from emimimic.data import EMIDataModule
    from emimimic.training import EMIModule

    model = EMIModule.load_from_checkpoint(best, map_location="cpu").eval()
    assert type(model.net).__name__ == "MeanNet" and model.net.head.in_features == 5 * 3
    assert model.hparams.network == {"class_path": "usernet.MeanNet", "init_args": {"width": 5}}
    data = EMIDataModule(store, batch_size=64)
    plan = data.dataset("test").__getitems__(list(range(len(data.dataset("test")))))
    with torch.no_grad():
        expected = model(data.prepare_batch(plan)).pred.numpy()
    np.testing.assert_allclose(written.loc[plan.ids].to_numpy(), expected, atol=1e-6)


def test_standard_callbacks_are_yaml_sections_that_can_change_or_go(store, tmp_path):
    config = tmp_path / "callbacks.yaml"
    config.write_text("ema:\n  decay: 0.99\nlr_monitor: null\ndashboard: null\n")
    cli = cli_main(["-c", QUICKSTART, "-c", str(config), "--data.store", store,
                    "--trainer.default_root_dir", str(tmp_path), "--early_stopping.patience", "3"],
                   run=False)
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "LearningRateMonitor" not in names and "WandbDashboard" not in names
    assert {"TargetPearson", "EpochSeed", "EMA", "EarlyStopping", "SubmissionWriter",
            "ModelCheckpoint", "LastCheckpoint"} <= set(names)
    ema = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EMA")
    stop = next(c for c in cli.trainer.callbacks if type(c).__name__ == "EarlyStopping")
    assert ema.decay == 0.99 and ema.warmup  # the file's decay over the quickstart's warm-up
    assert stop.patience == 3 and stop.monitor == "val/pearson"
    folders = {c.dirpath for c in cli.trainer.callbacks if type(c).__name__.endswith("Checkpoint")}
    assert folders == {os.path.realpath(tmp_path / "checkpoints")}
