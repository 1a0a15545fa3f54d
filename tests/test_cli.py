"""The LightningCLI as a user drives it: fit, then validate/test/predict in fresh processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from emimimic.cli import best_checkpoint, cli_main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def _run(
    *args: str, env: dict | None = None, timeout: int = 300, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "emimimic", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
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


def _metrics(root: Path) -> pd.DataFrame:
    files = sorted(root.glob("logs/version_*/metrics.csv"), key=os.path.getmtime)
    assert files, f"no metrics.csv under {root}"
    return pd.read_csv(files[-1])


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
    history = _metrics(fitted)
    scores = history["val/pearson"].dropna()
    assert len(scores) == 3
    assert ckpt["callbacks"]
    recorded = [v for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheckpoint")][0]
    assert float(recorded["best_model_score"]) == pytest.approx(scores.max(), abs=1e-6)


def test_validate_best_in_fresh_process_reproduces_fit_score(fitted, store):
    root = fitted
    _run(*_quickstart("validate", store, root, "--ckpt_path", "best"))
    fit_best = _metrics(root)  # the newest metrics file is the validate run's
    fit_runs = sorted(root.glob("logs/version_*/metrics.csv"), key=os.path.getmtime)
    fit_scores = pd.read_csv(fit_runs[0])["val/pearson"].dropna()
    assert fit_best["val/pearson"].dropna().iloc[-1] == pytest.approx(fit_scores.max(), abs=1e-5)


def test_predict_best_writes_submission_once_per_clip(fitted, store, tmp_path):
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

    # A second predict must not overwrite the user's file.
    before = out.read_bytes()
    proc = _run(*args, check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert out.read_bytes() == before


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
    _run("validate", *common, "--trainer.default_root_dir", str(one))
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
    r1 = _metrics(one)["val/pearson"].dropna().iloc[-1]
    r2 = _metrics(two)["val/pearson"].dropna().iloc[-1]
    assert r2 == pytest.approx(r1, abs=1e-6)

    sub1, sub2 = tmp_path / "one.csv", tmp_path / "two.csv"
    _run("predict", *common, "--trainer.default_root_dir", str(one), "--submission.path", str(sub1))
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
    with pytest.raises(FileNotFoundError, match="last.ckpt"):
        best_checkpoint(str(tmp_path))


def test_wandb_offline_twice_in_same_folder(store, tmp_path):
    pytest.importorskip("wandb")
    args = [
        "fit",
        "-c",
        QUICKSTART,
        "-c",
        str(REPO / "configs/logger/wandb.yaml"),
        "--data.store",
        store,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "wandb"),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "wandb")}
    # Two runs (own checkpoint folders) logging into one W&B folder, as a sweep would.
    _run(*args, "--trainer.default_root_dir", str(tmp_path / "run1"), env=env)
    _run(*args, "--trainer.default_root_dir", str(tmp_path / "run2"), env=env)
    configs = list((tmp_path / "wandb" / "configs").glob("*.yaml"))
    assert len(configs) == 2
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*"))
    assert len(runs) == 2


def test_second_fit_refuses_then_resumes_from_last(store, tmp_path):
    root = tmp_path / "run"
    args = _quickstart("fit", store, root, "--trainer.log_every_n_steps", "1")
    first = cli_main([*args, "--trainer.max_epochs", "2"]).trainer.global_step
    before = sorted(p.name for p in (root / "checkpoints").iterdir())
    with pytest.raises(FileExistsError, match="--ckpt_path last"):
        cli_main([*args, "--trainer.max_epochs", "2"])
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == before

    cli = cli_main([*args, "--trainer.max_epochs", "4", "--ckpt_path", "last"])
    # Epochs 0-1 come from the checkpoint, only epochs 2-3 run now.
    assert cli.trainer.current_epoch == 4 and cli.trainer.global_step == 2 * first
    steps = _metrics(root).dropna(subset=["train/loss_step"])["step"]  # the resumed run's log
    assert steps.min() > 0  # it did not start again from scratch
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
