"""The ``emimimic`` command: one table of subcommands, each with its own ``--help``.

User errors (:class:`~emimimic.errors.UserError`, a refused option value) end in one line on
stderr and exit status 2; ``EMIMIMIC_DEBUG=1`` or ``--debug`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module
from typing import NamedTuple

from emimimic import __version__
from emimimic.errors import UserError


class Command(NamedTuple):
    """A subcommand: ``target`` (``module:function``) is called with the arguments after its name,
    or, for LightningCLI's subcommands (``lightning``), with the name first."""

    target: str
    summary: str
    lightning: bool = False


COMMANDS: dict[str, Command] = {
    "fit": Command("emimimic.cli:cli_main", "train a model on a feature store", True),
    "validate": Command("emimimic.cli:cli_main", "score a checkpoint on the validation split",
                        True),
    "test": Command("emimimic.cli:cli_main", "score a checkpoint on the test split", True),
    "predict": Command("emimimic.cli:cli_main", "write a challenge submission CSV", True),
    "synth": Command("emimimic.data.commands:synth_main", "write a SYNTHETIC demo store"),
    "pack": Command("emimimic.data.commands:pack_main",
                    "build a feature store from split CSVs and per-clip feature files"),
    "info": Command("emimimic.data.commands:info_main", "print a summary of a feature store"),
    "extract": Command("emimimic.extract.commands:main",
                       "extract features from raw clips into a feature store (extra: extract)"),
    "score-clips": Command("emimimic.extract.score:main",
                           "score new raw clips with a checkpoint, extracted as its store was"),
    "convert-chatglm3": Command("emimimic.extract.commands:convert_chatglm3_main",
                                "convert ChatGLM3-6B weights to transformers' GLM classes"),
    "table": Command("emimimic.experiments.table:main",
                     "train configs x seeds; write the comparison table with bootstrap CIs"),
    "ensemble": Command("emimimic.experiments.ensemble:main",
                        "ensemble checkpoints: mean or fitted weights; submission and its gain"),
    "tune": Command("emimimic.experiments.tune:main",
                    "search a config's settings with Optuna, pruning weak trials (extra: tune)"),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: emimimic [--version] [--debug] COMMAND [ARGS...]",
             "",
             "Emotional Mimicry Intensity estimation with PyTorch Lightning.",
             "",
             "commands:"]
    lines += [f"  {name:<{width}}  {cmd.summary}" for name, cmd in COMMANDS.items()]
    lines += ["", "Run `emimimic COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> None:
    """Runs ``emimimic`` with ``argv`` (default ``sys.argv[1:]``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("EMIMIMIC_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        print(f"emimimic {__version__}")
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"emimimic: error: unknown command {name!r}; run `emimimic --help` for the list",
              file=sys.stderr)
        raise SystemExit(2)
    command = COMMANDS[name]
    module, function = command.target.split(":")
    try:
        from emimimic.commandline import check_config_file, config_files

        for file in config_files(rest):  # a YAML mistake names its file, before any import
            check_config_file(file)
        target = getattr(import_module(module), function)
        target([name, *rest] if command.lightning else rest)
    except (UserError, argparse.ArgumentError) as err:
        if debug:
            raise
        hint = f" (see `emimimic {name} --help`)" if isinstance(err, argparse.ArgumentError) else ""
        print(f"emimimic {name}: error: {_one_line(err)}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
