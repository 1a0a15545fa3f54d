"""Hostile checkpoints and options: one line naming the file, exit status 2, nothing written.

Class 1: every way a checkpoint can be wrong, given as a file or reached through
``--ckpt_path last``/``best``. Class 3: an explicit option that conflicts with the
checkpoint is refused whatever form ``--ckpt_path`` takes. Class 7: a config file with a YAML
syntax error, a folder given as a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from support.reference import QUICKSTART

from emimimic.__main__ import main
from emimimic.cli import cli_main


@pytest.fixture(scope="module")
def trained(demo_store, tmp_path_factory) -> Path:
    """A run folder with a one-epoch fit of the quickstart (average fusion)."""
    root = tmp_path_factory.mktemp("trained")
    cli_main(["fit", "-c", str(QUICKSTART), "--data.store", str(demo_store),
              "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
              "--trainer.enable_progress_bar", "false", "--model.network.fusion", "average"])
    return root


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(capsys, tmp_path: Path, argv: list[str]) -> str:
    """Runs ``emimimic ARGV``; returns its one stderr line after checking the exit and files."""
    before = _files(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert _files(tmp_path) == before  # nothing written, here or in the run folder
    return err


class Evil:
    """Pickles to a call of os.system: loading it unchecked would run a command."""

    def __reduce__(self):
        return os.system, ("echo pwned > /tmp/emimimic_pwned",)


def _make(kind: str, trained: Path, folder: Path) -> Path:
    """Writes a bad checkpoint of ``kind`` into ``folder``; returns its path."""
    good = sorted((trained / "checkpoints").glob("best-*.ckpt"))[0]
    path = folder / "model.ckpt"
    if kind == "truncated":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "code reference":
        state = torch.load(good, weights_only=True)
        state["hyper_parameters"]["evil"] = Evil()
        with open(path, "wb") as f:
            torch.save(state, f)
    elif kind == "plain pickle":
        path.write_bytes(pickle.dumps({"state_dict": {}}))
    elif kind == "text file":
        path.write_text("these are not the weights you are looking for\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "not emimimic's":
        torch.save({"state_dict": {}, "epoch": 0, "hyper_parameters": {"lr": 0.1}}, path)
    elif kind == "not a checkpoint dict":
        torch.save(torch.zeros(3), path)
    elif kind == "damaged zip":
        data = bytearray(good.read_bytes())
        with zipfile.ZipFile(good) as z:
            first = z.infolist()[0]
        start = first.header_offset + 30 + len(first.filename)
        data[start:start + 64] = b"\x00" * 64
        path.write_bytes(bytes(data))
    else:
        raise AssertionError(kind)
    return path


CASES = {
    "truncated": "truncated checkpoint",
    "code reference": "refused, it holds a code reference (posix.system)",
    "plain pickle": "not a checkpoint of `emimimic fit` (not a torch zip archive)",
    "text file": "not a checkpoint of `emimimic fit` (not a torch zip archive)",
    "empty": "empty file, not a checkpoint",
    "not emimimic's": "not a checkpoint of an EMIModule (no dims in its hyper-parameters)",
    "not a checkpoint dict": "not a checkpoint of `emimimic fit` (no state_dict in it)",
    "damaged zip": "damaged checkpoint, torch cannot read it",
}


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("form", ["file", "last"])
def test_a_damaged_or_foreign_checkpoint_is_one_line(kind, form, trained, demo_store, tmp_path,
                                                     capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    bad = _make(kind, trained, run / "checkpoints")
    if form == "last":  # reached through --ckpt_path last: the file is the run's last.ckpt
        bad = bad.rename(run / "checkpoints" / "last.ckpt")
    argv = ["validate", "-c", str(QUICKSTART), "--data.store", str(demo_store),
            "--trainer.default_root_dir", str(run), "--ckpt_path",
            str(bad) if form == "file" else "last"]
    err = _refused(capsys, tmp_path, argv)
    assert f"{bad}: {CASES[kind]}" in err
    assert not Path("/tmp/emimimic_pwned").exists()


def test_best_from_a_damaged_last_is_one_line(trained, demo_store, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    err = _refused(capsys, tmp_path, ["predict", "-c", str(QUICKSTART), "--data.store",
                                      str(demo_store), "--trainer.default_root_dir", str(run),
                                      "--ckpt_path", "best"])
    assert f"{last}: truncated checkpoint" in err


@pytest.mark.parametrize(("option", "value", "theirs"), [
    ("--model.network.fusion", "concat", "'average'"),
    ("--model.network.pooling", "lstm", "'mean'"),
    ("--model.loss.lambda_ccc", "0.5", "0.0"),
    ("--data.modalities", "[text]", "['visual', 'audio', 'text']"),
])
@pytest.mark.parametrize("form", ["file", "best", "last"])
def test_an_option_that_conflicts_with_the_checkpoint_is_refused_in_every_form(
        option, value, theirs, form, trained, demo_store, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = str(sorted((run / "checkpoints").glob("best-*.ckpt"))[0]) if form == "file" else form
    err = _refused(capsys, tmp_path, ["validate", "-c", str(QUICKSTART), "--data.store",
                                      str(demo_store), "--trainer.default_root_dir", str(run),
                                      "--ckpt_path", ckpt, option, value])
    assert "conflicts with the checkpoint's" in err and theirs in err


def test_a_folder_given_as_a_checkpoint_is_called_a_folder(trained, demo_store, tmp_path,
                                                          capsys):
    for folder in (trained, trained / "checkpoints"):
        err = _refused(capsys, tmp_path, ["validate", "-c", str(QUICKSTART), "--data.store",
                                          str(demo_store), "--ckpt_path", str(folder),
                                          "--trainer.default_root_dir", str(tmp_path / "x")])
        assert f"{folder}: a folder, not a checkpoint file" in err and "exist" not in err


@pytest.mark.parametrize("text", ["trainer:\n  max_epochs: [1,\n", "model:\n\t- x\n",
                                  "data: {store: demo/store\n"])
def test_a_yaml_syntax_error_names_the_config_file(text, tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text(text)
    for command in (["fit", "-c"], ["pack", "-c"], ["table", "x.yaml", "--base"]):
        err = _refused(capsys, tmp_path, [*command, str(config)])
        assert f"{config}: not valid YAML (" in err and "line" in err
