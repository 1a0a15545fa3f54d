"""Commands declared once: a typed function or dataclass becomes a command's options.

Every ``emimimic`` command that is not a Lightning subcommand takes its options from the
signature (or dataclass) of the code that uses them, through jsonargparse, as the training
commands do: types and choices are checked, help comes from the docstring (``Args:`` or
``Attributes:``) with the defaults, ``-c/--config FILE.yaml`` reads options from a file and
``--print_config`` writes the resolved options as such a file. Adding an option is adding a
parameter (or field) and its docstring line. Errors are ``argparse.ArgumentError`` s, which
``emimimic`` prints as one line.

Options are written as in the signature (``--weight_column``); nested dataclasses and dicts use
dots (``--visual.fps 5``, ``--splits.train train.csv``); lists are YAML (``--modalities
[audio, text]``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from emimimic.errors import UserError


def command_parser(target: Callable[..., Any], prog: str, positional: bool = False,
                   description: str | None = None) -> ArgumentParser:
    """Returns the parser of a command whose options are ``target``'s parameters (or fields).

    Args:
        target: a function (its parameters) or a dataclass (its fields).
        prog: the command as typed, e.g. ``"emimimic pack"``.
        positional: the required parameters are positional (``emimimic synth DEST``); otherwise
            every parameter is an option.
        description: the help's description (default the target docstring's first paragraph).
    """
    doc = inspect.getdoc(target) or ""
    parser = ArgumentParser(prog=prog, description=description or doc.split("\n\n")[0],
                            exit_on_error=False, default_env=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile,
                        help="a YAML file of options (what --print_config writes); later "
                             "options override it")
    if dataclasses.is_dataclass(target):
        parser.add_class_arguments(target, as_positional=positional)  # type: ignore[arg-type]
    else:
        parser.add_function_arguments(target, as_positional=positional)
    return parser


def check_config_file(path: str | Path) -> None:
    """Checks that a config file exists and is valid YAML.

    Raises:
        UserError: naming the file, and the line and column of a syntax error.
    """
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"{file}: no such config file")
    try:
        yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{file}: not valid YAML ({problem}{where})") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{file}: not a text file ({err.reason}); expected YAML") from None


def config_files(argv: Sequence[str]) -> list[str]:
    """Returns the files ``-c``/``--config`` name in ``argv``."""
    out = []
    for n, arg in enumerate(argv):
        if arg in ("-c", "--config") and n + 1 < len(argv):
            out.append(argv[n + 1])
        elif arg.startswith("--config="):
            out.append(arg.split("=", 1)[1])
    return out


def _plain(value: Any) -> Any:
    """Returns parsed values with Namespaces turned into dicts (for a function's keywords)."""
    if isinstance(value, Namespace):
        return {k: _plain(v) for k, v in vars(value).items()}
    return value


def parse_command(target: Callable[..., Any], argv: Sequence[str], prog: str,
                  positional: bool = False) -> dict[str, Any]:
    """Returns ``target``'s keyword arguments as ``argv`` gives them (nested classes built).

    Raises:
        argparse.ArgumentError: an unknown option, a value of the wrong type or choice, a
            missing required one (``emimimic`` prints it as one line).
    """
    parser = command_parser(target, prog, positional)
    config = parser.parse_args(list(argv))
    built = parser.instantiate(config)
    return {k: _plain(v) for k, v in vars(built).items() if k != "config"}


def run_command(target: Callable[..., Any], argv: Sequence[str], prog: str,
                positional: bool = False) -> Any:
    """Parses ``argv`` into ``target``'s arguments and calls it; returns its result."""
    return target(**parse_command(target, argv, prog, positional))


__all__ = ["check_config_file", "command_parser", "config_files", "parse_command",
           "run_command"]
