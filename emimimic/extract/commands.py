"""The ``emimimic extract`` and ``emimimic convert-chatglm3`` subcommands.

Their options are :class:`~emimimic.extract.pipeline.ExtractOptions` (with each stage's own
dataclass nested in it) and the signature of
:func:`~emimimic.extract.chatglm3.convert_chatglm3` (:mod:`emimimic.commandline`)::

    emimimic extract --splits.train train_split.csv --splits.valid valid_split.csv \\
        --raw raw/ --work work/ --store store/ \\
        --visual.model VIT --audio.model microsoft/wavlm-large \\
        --asr.model openai/whisper-large-v3 --text.model chatglm3-6b-glm
    emimimic extract --print_config > extract.yaml   # edit, then: emimimic extract -c extract.yaml
    emimimic convert-chatglm3 THUDM/chatglm3-6b-folder chatglm3-6b-glm
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from emimimic.errors import UserError

#: Import names of what only extraction needs, with the distribution that provides each.
EXTRA_MODULES = {"transformers": "transformers", "av": "av", "cv2": "opencv-python-headless"}
INSTALL_HINT = 'pip install -e ".[extract]"'


def require_extra() -> None:
    """Checks that the ``extract`` extra is installed.

    Raises:
        UserError: naming what is missing and the install command.
    """
    lacking = [dist for module, dist in EXTRA_MODULES.items()
               if importlib.util.find_spec(module) is None]
    if lacking:
        raise UserError(f"emimimic extract needs the 'extract' extra (missing: "
                        f"{', '.join(lacking)}); install it with {INSTALL_HINT}")


def main(argv: Sequence[str]) -> None:
    """Runs ``emimimic extract`` with ``argv`` (the arguments after the subcommand)."""
    require_extra()
    from emimimic.commandline import parse_command
    from emimimic.extract.pipeline import ExtractOptions, extract

    summary = extract(ExtractOptions(**parse_command(ExtractOptions, argv, "emimimic extract")))
    for line in summary.lines():
        print(line)


def convert_chatglm3_main(argv: Sequence[str]) -> None:
    """Runs ``emimimic convert-chatglm3`` with ``argv``."""
    require_extra()
    from emimimic.commandline import run_command
    from emimimic.extract.chatglm3 import convert_chatglm3

    args = list(argv)
    out = run_command(convert_chatglm3, args, "emimimic convert-chatglm3", positional=True)
    print(f"converted to {out} (load it with AutoModel.from_pretrained)")
