"""Entry point of the ``emimimic`` console script and of ``python -m emimimic``."""

from __future__ import annotations

import sys

#: Subcommands that build or inspect feature stores; everything else goes to LightningCLI.
DATA_COMMANDS = ("pack", "synth", "info")


def main(argv: list[str] | None = None) -> None:
    """Dispatches to the data commands or to the LightningCLI (fit/validate/test/predict)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DATA_COMMANDS:
        from emimimic.data import commands

        commands.main(argv)
        return
    from emimimic.cli import cli_main

    cli_main(argv)


if __name__ == "__main__":
    main()
