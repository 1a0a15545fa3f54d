"""Package hygiene: light top-level import, entry points, README commands that CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.reference import REPO

from emimimic.__main__ import main


def test_top_level_import_is_light_and_exposes_the_main_classes():
    code = (
        "import sys, emimimic; assert 'lightning' not in sys.modules; "
        "from emimimic import EMIModule, EMIDataModule, FeatureStore, EMINetwork; "
        "print(EMIModule.__module__, EMIDataModule.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["emimimic.training.module", "emimimic.data.datamodule"]


def test_python_dash_m_and_console_script_dispatch_the_same_commands():
    data = subprocess.run([sys.executable, "-m", "emimimic", "synth", "--help"],
                          capture_output=True, text=True)
    assert data.returncode == 0 and "--counts" in data.stdout and "default: demo" in data.stdout
    script = str(Path(sys.executable).parent / "emimimic")
    train = subprocess.run([script, "fit", "--help"], capture_output=True, text=True)
    assert train.returncode == 0 and "--ema.help" in train.stdout
    assert "--model.network.help" in train.stdout
    # the network's options reach --help from its signature, with their choices
    network = subprocess.run([script, "fit", "--model.network.help", "EMINetwork"],
                             capture_output=True, text=True)
    assert "--model.network.pooling {mean,attention,lstm}" in network.stdout
    assert "--model.network.modality_dropout" in network.stdout


def test_readme_starts_with_the_demo_job_and_the_tests_which_ci_runs():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```$", readme, flags=re.S | re.M)
    demo, tests = blocks[0], blocks[1]
    for step in (
        "pip install torch==2.13.0",
        "emimimic synth demo/store",
        "emimimic fit -c configs/quickstart.yaml",
        "emimimic validate -c configs/quickstart.yaml --ckpt_path best",
        "emimimic predict -c configs/quickstart.yaml --ckpt_path best",
    ):
        assert step in demo, step
    assert "pytest" in tests
    # Nothing but a title and one line stand before the first command.
    assert readme.index("```bash") < 400
    ci = (REPO / ".ci" / "run").read_text()
    assert "README.md" in ci and "block1.sh" in ci and "block2.sh" in ci


@pytest.mark.parametrize(("argv", "expected"), [
    (["pack", "--dest", "x", "--workers", "0"], "emimimic pack: error: Parser key \"workers\""),
    (["pack", "--dest", "x", "--splits.train"], "emimimic pack: error:"),
    (["synth", "x", "--dims", "huge"], "emimimic synth: error: Parser key \"dims\""),
    (["info", "no/such/store"],
     "emimimic info: error: no/such/store: feature store does not exist"),
    (["extract", "--work", "w"], "emimimic extract: error:"),
    (["table", "a.yaml", "--seedz", "2"], "emimimic table: error: unrecognized arguments: --seedz"),
    (["table", "--print_confg"], "emimimic table: error: unrecognized arguments"),
])
def test_every_command_refuses_bad_options_in_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["info", "STORE"],
                                  ["synth", "--help"], ["pack", "--help"], ["table", "--help"],
                                  ["tune", "--help"], ["ensemble", "--help"]],
                         ids=lambda a: " ".join(a))
def test_commands_that_train_nothing_import_neither_lightning_nor_torch(argv, demo_store):
    argv = [str(demo_store) if a == "STORE" else a for a in argv]
    code = ("import sys\nfrom emimimic.__main__ import main\ntry:\n    main(" + repr(argv)
            + ")\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_cli_makes_its_callback_defaults_without_walking_a_deep_stack(monkeypatch, demo_store):
    """``jsonargparse.lazy_instance`` reads the source of every frame above it; inside the
    parser set-up of four subcommands that cost about 1 s of each command's start."""
    import inspect

    from emimimic.cli import cli_main

    real, depths = inspect.stack, []

    def counting(context: int = 1):
        frames = real(context)
        depths.append(len(frames))
        return frames

    monkeypatch.setattr(inspect, "stack", counting)
    from emimimic.training.callbacks import standard_callbacks

    cli = cli_main(["-c", str(REPO / "configs" / "quickstart.yaml"), "--data.store",
                    str(demo_store)], run=False)
    assert len(depths) >= len(standard_callbacks())  # one per standard callback
    assert max(depths) <= 8, depths
    # and they are the trainer's callbacks, each an instance of its class
    made = [c for c in cli.trainer.callbacks
            if any(isinstance(c, cls) for cls, _ in standard_callbacks().values())]
    assert len(made) >= len(standard_callbacks()) - 1  # the W&B dashboard needs a W&B logger
