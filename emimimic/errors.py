"""The exceptions the command line turns into a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave (a path, an option, an input file).

    The message says what is wrong and how to fix it, naming the file, the clip and the rule.
    ``emimimic`` prints it as one line and exits with status 2; ``EMIMIMIC_DEBUG=1`` (or
    ``--debug``) shows the traceback too.
    """


class ConfigError(UserError, ValueError):
    """A configuration that cannot be built: an unknown part, an option a part does not take."""
