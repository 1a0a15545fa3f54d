"""Exact resume: a fit killed with SIGKILL and resumed with --ckpt_path last ends where an
uninterrupted fit with the same seed ends, with one continuous metrics log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from support.reference import REPO

EPOCHS = 4


def _fit(store: str, root: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "tests")}  # for support.kill
    return subprocess.run(
        [sys.executable, "-m", "emimimic", "fit", "-c", str(REPO / "configs" / "quickstart.yaml"),
         "--data.store", store, "--trainer.default_root_dir", str(root),
         "--trainer.max_epochs", str(EPOCHS), "--trainer.log_every_n_steps", "1",
         "--trainer.enable_progress_bar", "false", "--seed_everything", "7", *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


def _final(root: Path) -> tuple[dict, pd.Series]:
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    log = pd.read_csv(root / "logs" / "fit" / "metrics.csv")
    scores = log.dropna(subset=["val/pearson"]).set_index("epoch")["val/pearson"]
    return last, scores


@pytest.fixture(scope="module")
def reference(demo_store, tmp_path_factory) -> tuple[dict, pd.Series]:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = _fit(str(demo_store), root)
    assert done.returncode == 0, done.stderr[-3000:]
    return _final(root)


@pytest.mark.slow
@pytest.mark.parametrize(("hook", "epoch"), [("train_batch_end", 2), ("validation_end", 2),
                                             ("train_batch_end", 0)])
def test_killed_fit_resumes_to_the_uninterrupted_result(hook, epoch, demo_store, reference,
                                                        tmp_path):
    root = tmp_path / "run"
    killer = ["--trainer.callbacks+=support.kill.KillAt",
              f"--trainer.callbacks.hook={hook}", f"--trainer.callbacks.epoch={epoch}",
              "--trainer.callbacks.batch=1"]
    killed = _fit(str(demo_store), root, *killer)
    assert killed.returncode == -9, killed.stderr[-3000:]
    if epoch:
        interrupted = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
        assert interrupted["epoch"] == epoch - 1  # killed in epoch 2, before its checkpoint
    else:  # killed in the first epoch: nothing to resume, the fit starts over and says so
        assert not (root / "checkpoints" / "last.ckpt").exists()
    resumed = _fit(str(demo_store), root, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    starts_over = "ended before its first epoch did (no last.ckpt); starting it over"
    assert (starts_over in resumed.stdout) == (epoch == 0)
    last, scores = _final(root)
    ref_last, ref_scores = reference
    assert last["epoch"] == ref_last["epoch"] == EPOCHS - 1
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        for name, value in ref_last[key].items():
            torch.testing.assert_close(last[key][name], value, rtol=0, atol=1e-6, msg=name)
    # one score per epoch, each equal to the uninterrupted run's
    assert list(scores.index) == list(range(EPOCHS))
    pd.testing.assert_series_equal(scores, ref_scores, atol=1e-6, rtol=0)
    log = pd.read_csv(root / "logs" / "fit" / "metrics.csv")
    steps = log.dropna(subset=["train/loss_step"])["step"].tolist()
    assert steps == sorted(set(steps))  # no training step logged twice


def test_last_in_a_folder_where_no_fit_began_is_an_error(demo_store, tmp_path, capsys):
    """A mistyped run folder must not silently train from scratch."""
    from emimimic.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(REPO / "configs" / "quickstart.yaml"), "--data.store",
              str(demo_store), "--trainer.default_root_dir", str(tmp_path / "typo"),
              "--ckpt_path", "last"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("emimimic fit: error: --ckpt_path last:") and err.count("\n") == 1
    assert "does not exist" in err and not (tmp_path / "typo").exists()
