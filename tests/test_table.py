"""`emimimic table`: config × seed runs through the real CLI; the CSV, the Markdown, the PNG."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from scipy import stats as sps
from support.reference import QUICKSTART

from emimimic.cli import cli_main
from emimimic.constants import EMOTIONS
from emimimic.data.store import FeatureStore
from emimimic.data.synth import synth
from emimimic.errors import UserError
from emimimic.experiments.runs import split_argv
from emimimic.experiments.table import main

SEEDS = (0, 1)
ROWS = ("concat", "average")


def test_split_argv_passes_dotted_options_and_the_rest_after_dashes():
    rows, own, passed = split_argv(["a.yaml", "b.yaml+o.yaml", "--data.store", "S", "--seeds",
                                    "2", "--trainer.max_epochs=2",
                                    "--trainer.enable_progress_bar", "false", "--", "--model.x",
                                    "1"])
    assert rows == ["a.yaml", "b.yaml+o.yaml"]
    assert own == ["--seeds", "2"]
    assert passed == ["--data.store", "S", "--trainer.max_epochs=2",
                      "--trainer.enable_progress_bar", "false", "--model.x", "1"]
    for option in ("--trainer.default_root_dir", "--data.predict_split=test"):
        with pytest.raises(UserError, match="is set by `emimimic table`"):
            split_argv(["a.yaml", option, "X"])


def test_only_runs_validated_on_the_scored_split_are_checked_against_their_val_pearson():
    """Scored on test, a run's Pearson and its best checkpoint's val/pearson measure different
    clips: no note; on the split it validated on they must agree (a fold or a refit did not)."""
    from emimimic.experiments.table import _validated_on

    settings = {"plain": {"data": {"val_split": "valid"}}, "default": {"data": {}},
                "folded": {"data": {"val_split": "valid", "folds": 5, "fold": 0}},
                "refit": {"data": {"refit": True}}, "other": {"data": {"val_split": "dev"}}}
    assert _validated_on(settings, "valid") == {"plain", "default"}
    assert _validated_on(settings, "test") == set()
    assert _validated_on(settings, "dev") == {"other"}


def test_refuses_rows_it_cannot_name(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "same.yaml").write_text("{}\n")
    with pytest.raises(UserError, match="both name the row 'same'"):
        main([str(tmp_path / "x/same.yaml"), str(tmp_path / "y/same.yaml"), "--base",
              str(QUICKSTART)])
    with pytest.raises(UserError, match="--reference 'nope' is not a row"):
        main([str(tmp_path / "x/same.yaml"), "--base", str(QUICKSTART), "--reference", "nope"])
    with pytest.raises(UserError, match="no such config file"):
        main([str(tmp_path / "missing.yaml"), "--base", str(QUICKSTART)])


def _ckpt_mtimes(out: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(out.glob("*/checkpoints/*.ckpt"))}


def _status(output: str) -> dict[str, str]:
    """Returns run folder name -> the word the command printed for it (started, skipped...)."""
    return dict(re.findall(r"^\[\d+/\d+\] (\S+): (started|skipped|resumed|predicting)",
                           output, flags=re.M))


@pytest.mark.slow
def test_table_two_rows_two_seeds(tmp_path, capsys, monkeypatch):
    # the runs are tiny: one thread each, or intra-op threads spin against each other (and any
    # other job on a small shared machine), ~20x slower here
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    store = synth(tmp_path / "store", seed=0, counts={"train": 96, "valid": 64, "test": 32})
    concat, average = tmp_path / "concat.yaml", tmp_path / "average.yaml"
    concat.write_text(yaml.safe_dump({"model": {"network": {"fusion": "concat"}}}))
    average.write_text(yaml.safe_dump({"model": {"network": {"fusion": "average"}}}))
    # the second row is the first with an overlay on top, named after both
    configs, rows = [str(concat), f"{concat}+{average}"], ("concat", "concat+average")
    fusion = {"concat": "concat", "concat+average": "average"}
    out = tmp_path / "table"
    argv = [*configs, "--base", str(QUICKSTART), "--seeds", "2", "--out", str(out),
            "--resamples", "500", "--jobs", "2", "--data.store", str(store),
            "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary", "false"]
    main(argv)
    printed = capsys.readouterr().out
    runs = [f"{name}-seed{s}" for name in rows for s in SEEDS]
    assert _status(printed) == dict.fromkeys(runs, "started")
    # a line per finished run: its time, score and best epoch, and what is left
    done = re.findall(r"^\[\d+/4\] (\S+): done in \d+ s, best val/pearson (-?\d\.\d{4}) at "
                      r"epoch (\d)(; .* left for (\d) run\(s\))?$", printed, flags=re.M)
    assert sorted(d[0] for d in done) == sorted(runs)
    assert [int(d[4]) for d in done if d[4]] == [3, 2, 1]

    # runs.csv: one row per run, every number recomputed here from the predictions and the store
    table = pd.read_csv(out / "runs.csv")
    assert list(table.columns) == ["config", "seed", "run", "best_epoch", "fit_val_pearson",
                                   "wall_s", "mean_pearson", *EMOTIONS]
    assert list(zip(table.config, table.seed, strict=True)) == [
        (name, s) for name in rows for s in SEEDS]
    assert (table.wall_s > 1).all()
    view = FeatureStore(store).split("valid")
    labels = pd.DataFrame(view.labels, index=view.ids, columns=list(EMOTIONS))
    for _, row in table.iterrows():
        folder = out / f"{row.config}-seed{row.seed}"
        assert Path(row.run) == folder and (folder / "checkpoints" / "last.ckpt").is_file()
        resolved = yaml.safe_load(next(folder.glob("logs/*/config.yaml")).read_text())
        assert resolved["seed_everything"] == row.seed
        assert resolved["model"]["network"]["init_args"]["fusion"] == fusion[row.config]
        preds = pd.read_csv(folder / "valid_predictions.csv", dtype={"Filename": str})
        preds = preds.set_index("Filename").loc[labels.index]  # match by Filename
        r = [sps.pearsonr(preds[t], labels[t]).statistic for t in EMOTIONS]
        np.testing.assert_allclose(row[list(EMOTIONS)].to_numpy(float), r, atol=2e-6)
        assert row.mean_pearson == pytest.approx(np.mean(r), abs=2e-6)
        # predictions come from the best (EMA) checkpoint: they reproduce its logged val/pearson
        assert row.mean_pearson == pytest.approx(row.fit_val_pearson, abs=1e-3)
        assert row.best_epoch in (0, 1)
    for name in rows:
        assert table.loc[table.config == name, "mean_pearson"].nunique() == 2  # seeds differ
    # a CONFIG+OVERLAY row trains what `fit -c BASE -c CONFIG -c OVERLAY` resolves
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
        cli_main(["fit", "-c", str(QUICKSTART), "-c", str(concat), "-c", str(average),
                  "--data.store", str(store), "--print_config"])
    direct = yaml.safe_load(printed.getvalue())
    overlaid = yaml.safe_load(next((out / "concat+average-seed0").glob("logs/*/config.yaml"))
                              .read_text())
    assert overlaid["model"] == direct["model"] and overlaid["data"] == direct["data"]

    # table.md: the paper's layout, mean ± std over seeds, the reference and the intervals
    md = (out / "table.md").read_text()
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0] == ("| Method | Seeds | Mean Pearson | Δ vs concat [95% CI] | "
                        + " | ".join(EMOTIONS) + " |")
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(rows)
    for line, name in zip(lines[2:], rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        scores = table.loc[table.config == name, "mean_pearson"]
        assert cells[1] == "2"
        assert cells[2] == f"{scores.mean():.4f} ± {scores.std(ddof=1):.4f}"
        joy = table.loc[table.config == name, "Joy"]
        assert cells[-1] == f"{joy.mean():.4f} ± {joy.std(ddof=1):.4f}"
    assert lines[2].split("|")[4].strip() == "reference"
    diff, low, high = map(float, re.findall(r"[+-]\d\.\d{4}", lines[3].split("|")[4]))
    expected = (table.loc[table.config == "concat+average", "mean_pearson"].mean()
                - table.loc[table.config == "concat", "mean_pearson"].mean())
    assert diff == pytest.approx(expected, abs=1e-4) and low <= diff <= high
    assert "SYNTHETIC" in md and "64 clips" in md and "500 resamples" in md
    # the protocol and the overrides are recorded: a 2-epoch table cannot pass for 12 epochs
    assert "2 epochs, batch 32, 32-true, AdamW lr 0.001" in md
    assert "`--trainer.max_epochs` `2`" in md and "Joy" in md.split("targets")[1]

    with Image.open(out / "table.png") as img:
        assert img.format == "PNG" and img.size == (900, round(100 * (1.2 + 0.45 * 2)))

    # a re-run trains nothing: every run is skipped and no checkpoint is touched
    before, csv_before = _ckpt_mtimes(out), (out / "runs.csv").read_text()
    main(argv)
    assert _status(capsys.readouterr().out) == dict.fromkeys(runs, "skipped")
    assert _ckpt_mtimes(out) == before and len(before) >= 8
    assert (out / "runs.csv").read_text() == csv_before  # seeded bootstrap, same table

    # the same table from a config file: --print_config writes the options, -c reads them; it
    # names the same runs (all skipped, none refused as made with other settings)
    with pytest.raises(SystemExit):
        main([*argv, "--print_config"])
    saved = tmp_path / "table.yaml"
    saved.write_text(capsys.readouterr().out)
    main(["-c", str(saved)])
    assert _status(capsys.readouterr().out) == dict.fromkeys(runs, "skipped")
    assert (out / "runs.csv").read_text() == csv_before

    # an interrupted run (checkpoints, no predictions) resumes from last.ckpt; the rest is skipped
    victim = out / "concat+average-seed1"
    (victim / "fit.done").unlink()
    (victim / "valid_predictions.csv").unlink()
    others = {k: v for k, v in before.items() if not k.startswith(str(victim))}
    main(argv)
    status = _status(capsys.readouterr().out)
    assert status.pop("concat+average-seed1") == "resumed"
    assert status == dict.fromkeys([r for r in runs if r != "concat+average-seed1"], "skipped")
    assert "--ckpt_path last" in (victim / "fit.log").read_text()
    assert (victim / "valid_predictions.csv").is_file()
    assert {k: v for k, v in _ckpt_mtimes(out).items() if k in others} == others

    # a changed setting is refused instead of mixing runs of two protocols in one table
    with pytest.raises(UserError, match="was run with other settings"):
        main([a if a != "2" else "3" for a in argv])
