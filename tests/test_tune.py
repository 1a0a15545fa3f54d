"""emimimic tune through the real command: shared studies, pruning, kill -9 and the best config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.reference import QUICKSTART, REPO

from emimimic.errors import ConfigError
from emimimic.experiments.tune import as_overrides, read_space

optuna = pytest.importorskip("optuna")

SPACE = "model.optimizer.init_args.lr: {type: log_float, low: 3.0e-4, high: 3.0e-3}\n"


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    from emimimic.data.synth import synth

    return synth(tmp_path_factory.mktemp("tune") / "store",
                 counts={"train": 64, "valid": 32, "test": 8})


def _tune(store: Path, out: Path, space: Path, trials: int, epochs: int, *extra: str
          ) -> list[str]:
    return [sys.executable, "-m", "emimimic", "tune", str(QUICKSTART), "--space", str(space),
            "--trials", str(trials), "--out", str(out), "--data.store", str(store),
            "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def _env() -> dict[str, str]:
    # tiny runs: one thread each, or the processes spin against each other on 2 cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}


def _study(out: Path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name=out.name, storage=storage)


def _epochs(folder: str | Path) -> list[dict]:
    path = Path(folder) / "epochs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_search_space_is_checked_and_drawn_as_cli_options(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE + "model.network.init_args.pooling: {type: categorical, "
                     "choices: [mean, lstm]}\ndata.batch_size: {type: int, low: 8, high: 32, "
                     "step: 8}\nmodel.network.init_args.fusion_args: {type: categorical, "
                     "choices: [{heads: 2}, {heads: 4}]}\n")
    drawn = read_space(space)
    assert set(drawn) == {"model.optimizer.init_args.lr", "model.network.init_args.pooling",
                          "data.batch_size", "model.network.init_args.fusion_args"}
    trial = optuna.trial.FixedTrial({"model.optimizer.init_args.lr": 1e-3,
                                     "model.network.init_args.pooling": "lstm",
                                     "data.batch_size": 16,
                                     "model.network.init_args.fusion_args": '{"heads": 4}'})
    from emimimic.experiments.tune import suggest

    params = suggest(trial, drawn)
    assert params["model.network.init_args.fusion_args"] == {"heads": 4}
    assert as_overrides(params) == [
        "--model.optimizer.init_args.lr=0.001", "--model.network.init_args.pooling=lstm",
        "--data.batch_size=16", '--model.network.init_args.fusion_args={"heads": 4}']
    for bad, message in (("seed_everything: {type: int, low: 0, high: 3}", "only options of"),
                         ("data.batch_size: {type: int, low: 8}", r"needs \['high'\]"),
                         ("model.optimizer.init_args.lr: {type: log_float, low: 0, high: 1}",
                          "low > 0"),
                         ("data.batch_size: {type: normal}", "expected {type")):
        space.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=message):
            read_space(space)


@pytest.mark.slow
def test_two_processes_share_one_study_and_the_best_refits_to_its_score(tiny_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "study"
    argv = _tune(tiny_store, out, space, 2, 2, "--pruner", "none")
    procs = [subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = _study(out).get_trials()
    states = optuna.trial.TrialState
    finished = [t for t in trials if t.state in (states.COMPLETE, states.PRUNED)]
    assert len(finished) == 2 and len(trials) == 2  # the asked number, in total
    assert sorted(t.number for t in trials) == [0, 1]
    folders = [t.user_attrs["folder"] for t in trials]
    assert len(set(folders)) == 2 and all(Path(f).is_dir() for f in folders)
    assert len({t.user_attrs["pid"] for t in trials}) == 2  # both processes ran trials
    for t in trials:  # each trial folder is a normal run of its settings
        record = json.loads((Path(t.user_attrs["folder"]) / "run.json").read_text())
        assert record["params"] == t.params
        assert [e["epoch"] for e in _epochs(t.user_attrs["folder"])] == [0, 1]
        assert (Path(t.user_attrs["folder"]) / "checkpoints" / "last.ckpt").is_file()
    study = _study(out)
    assert (out / "history.png").is_file() and (out / "trials.csv").is_file()
    # the best trial's config, run as it is with its seed, gives its score
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["optimizer"]["init_args"]["lr"] == pytest.approx(
        study.best_params["model.optimizer.init_args.lr"])
    refit = tmp_path / "refit"
    done = subprocess.run([sys.executable, "-m", "emimimic", "fit", "-c", str(out / "best.yaml"),
                           "--trainer.default_root_dir", str(refit)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    from emimimic.experiments.summary import best_of

    assert best_of(refit / "checkpoints")[1] == pytest.approx(study.best_value, abs=1e-6)
    assert yaml.safe_load((out / "refit.yaml").read_text())["data"]["refit"] is True


@pytest.mark.slow
def test_the_pruner_stops_a_weak_trial_after_fewer_epochs(tiny_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("model.optimizer.init_args.lr: {type: categorical, "
                     "choices: [3.0e-3, 1.0e-12]}\n")
    out = tmp_path / "study"
    out.mkdir()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.create_study(study_name="study", direction="maximize", storage=JournalStorage(
        JournalFileBackend(str(out / "study.journal"))))
    study.enqueue_trial({"model.optimizer.init_args.lr": 3.0e-3})  # learns
    study.enqueue_trial({"model.optimizer.init_args.lr": 1.0e-12})  # cannot learn
    done = subprocess.run(_tune(tiny_store, out, space, 2, 10, "--pruner_startup", "1",
                                "--pruner_warmup", "0", "--early_stopping.patience", "100"),
                          cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    good, weak = sorted(_study(out).get_trials(), key=lambda t: t.number)
    assert good.state.name == "COMPLETE" and weak.state.name == "PRUNED"
    assert len(_epochs(good.user_attrs["folder"])) == 10
    assert 1 <= len(_epochs(weak.user_attrs["folder"])) < 10  # it logged fewer epochs
    assert "[trial 1] pruned" in done.stdout


def _running_fits(folder: Path) -> list[int]:
    """Returns the pids of processes whose command line names ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if proc.name.isdigit() and str(folder) in cmd and " fit " in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_a_study_killed_with_sigkill_resumes_and_counts_no_trial_twice(tiny_store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "study"
    argv = _tune(tiny_store, out, space, 1, 4, "--pruner", "none")
    proc = subprocess.Popen(argv, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    first = out / "trial-0000"
    deadline = time.time() + 300
    while not (first / "checkpoints" / "last.ckpt").is_file():  # an epoch done, more to go
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    assert _running_fits(first) == []  # the trial's fit died with its search
    done = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "[trial 0] its process is gone: marked failed, enqueued again" in done.stdout
    trials = sorted(_study(out).get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # the asked 1, not twice
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state.name == "COMPLETE" and retry.params == trials[0].params
    assert retry.user_attrs["folder"] == str(first)  # the same run folder, resumed
    assert "--ckpt_path last" in (first / "fit.log").read_text()
    assert [e["epoch"] for e in _epochs(first)][-1] == 3
