"""Defaults that fit the machine: precision from the CPU's or GPU's bfloat16, loader workers."""

from __future__ import annotations

import os

import pytest
import torch
from support.reference import CONFIGS

from emimimic import hardware
from emimimic.cli import cli_main
from emimimic.data import EMIDataModule

CPUINFO = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nprocessor\t: 1\n"


def test_bf16_flags_are_read_from_cpuinfo():
    assert hardware.cpu_bf16_flags(CPUINFO.format(extra="")) == ()
    assert hardware.cpu_bf16_flags(CPUINFO.format(extra="avx512_bf16")) == ("avx512_bf16",)
    assert hardware.cpu_bf16_flags(CPUINFO.format(extra="amx_bf16 avx512_bf16")) == (
        "avx512_bf16", "amx_bf16")


@pytest.mark.parametrize(("flags", "expected"), [((), "32-true"),
                                                 (("avx512_bf16",), "bf16-mixed")])
def test_auto_precision_uses_bf16_only_on_a_cpu_with_bf16(monkeypatch, demo_store, flags,
                                                          expected, caplog):
    monkeypatch.setattr(hardware, "cpu_bf16_flags", lambda: flags)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    precision, why = hardware.auto_precision("auto")
    assert precision == expected
    assert ("no bfloat16 instructions" in why) == (not flags)
    caplog.set_level("INFO")
    cli = cli_main(["-c", str(CONFIGS / "paper" / "base.yaml"), "-c",
                    str(CONFIGS / "paper" / "final.yaml"), "--data.store", str(demo_store),
                    "--trainer.accelerator", "cpu"], run=False)
    assert cli.trainer.precision == expected
    assert f"precision {expected} (trainer.precision null: " in caplog.text
    # an explicit precision is kept as given
    cli = cli_main(["-c", str(CONFIGS / "quickstart.yaml"), "--data.store", str(demo_store)],
                   run=False)
    assert cli.trainer.precision == "32-true"


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 1), (3, 2), (16, 4)])
def test_auto_workers_leave_a_core_to_the_main_process(monkeypatch, cores, workers):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    assert hardware.auto_workers() == workers


def test_the_data_module_never_asks_for_more_workers_than_cores(monkeypatch, demo_store):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert EMIDataModule(str(demo_store), num_workers=None).num_workers == 1
    assert EMIDataModule(str(demo_store), num_workers=8).num_workers == 2
    assert EMIDataModule(str(demo_store), num_workers=0).num_workers == 0


@pytest.mark.parametrize(("cores", "jobs", "threads"), [(2, 2, "1"), (8, 3, "2"), (2, 4, "1"),
                                                        (16, 2, "8")])
def test_runs_side_by_side_share_the_cores(monkeypatch, cores, jobs, threads):
    monkeypatch.setattr(os, "cpu_count", lambda: cores)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    env = hardware.side_by_side_env(jobs)
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == threads
    assert env["PATH"] == os.environ["PATH"]  # the rest of the environment is kept
    assert hardware.side_by_side_env(1) is None  # one run: inherited as it is
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own choice wins
    assert hardware.side_by_side_env(jobs) is None


def test_a_run_folder_starts_its_commands_with_its_share_of_the_cores(monkeypatch, tmp_path):
    """The environment reaches the child process that ``table --jobs`` and ``tune --workers``
    start (through ``run_logged``), and is not part of the run's identity."""
    import sys

    from emimimic.experiments.runs import RunFolder, run_logged

    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    one, two = (RunFolder([], 0, tmp_path / "run", side_by_side=n) for n in (1, 2))
    assert one.identity() == two.identity()
    log = tmp_path / "child.log"
    show = [sys.executable, "-c", "import os; print('threads', os.environ.get('OMP_NUM_THREADS'))"]
    run_logged(show, log, "show", tmp_path, two.env())
    run_logged(show, log, "show", tmp_path, one.env())
    assert [line for line in log.read_text().splitlines() if line.startswith("threads")] == [
        "threads 2", "threads None"]
