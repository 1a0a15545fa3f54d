"""Messages of the libraries emimimic runs on that mislead or repeat, silenced where they start.

Each is named and says why; nothing else is hidden (Lightning's own notes, a user's warnings,
ours). Called once by the commands that run a Trainer.
"""

from __future__ import annotations

import logging
import warnings

#: Warning messages (regular expressions) that are wrong or useless for an emimimic run.
WARNINGS = (
    # a resumed fit keeps its metrics log: emimimic writes the rows up to the resumed epoch back
    r"Experiment logs directory .* exists and is not empty",
    # a resumed fit's checkpoint folder holds its own last.ckpt, by design
    r"Checkpoint directory .* exists and is not empty",
    # torch 2.13 deprecates a name Lightning 2.6 still uses; nothing a user can do about it
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # jsonargparse deprecations triggered inside LightningCLI, not by emimimic's own calls
    r".*skip_none parameter was deprecated",
    # the summary counts parameters right and only guesses their bytes in mixed precision
    r"Precision .* is not supported by the model summary",
)

#: Log lines of Lightning that advertise other products on every run.
ADVERTS = ("💡 Tip:",)


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(ADVERTS)


def quiet_dependencies() -> None:
    """Installs the filters (idempotent)."""
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoAdverts) for f in logger.filters):
            logger.addFilter(_NoAdverts())
