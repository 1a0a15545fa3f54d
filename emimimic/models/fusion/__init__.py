"""Fusions: how the branches' outputs become the head's input, one module per fusion.

A fusion is chosen by name or by class path (``model.network.init_args.fusion``):

* a name ``NAME`` is the module ``emimimic/models/fusion/NAME.py``, whose ``FUSION`` is the class
  (``concat``, ``average``, ``gated``, ``text_query``); a new built-in fusion is a new file;
* a class path ``my_package.module.MyFusion`` names a user's own :class:`Fusion` subclass.

Its own options come from ``fusion_args`` (a dict of plain values).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any

from emimimic.errors import ConfigError
from emimimic.models.fusion.base import Fusion, FusionInput, FusionOutput


def available_fusions() -> list[str]:
    """Returns the names of the built-in fusions (the modules of this package)."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def fusion_class(name: str) -> type[Fusion]:
    """Returns the :class:`Fusion` subclass a name or class path names.

    Raises:
        ConfigError: no such fusion, or the class is not a :class:`Fusion`.
    """
    if "." in name:
        module_name, _, attr = name.rpartition(".")
    else:
        if name not in available_fusions():
            raise ConfigError(f"fusion {name!r} is not a built-in fusion "
                              f"({', '.join(available_fusions())}) nor a class path "
                              "(package.module.Class)")
        module_name, attr = f"{__name__}.{name}", "FUSION"
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"fusion {name!r}: cannot import it ({err}); is its module on "
                          "PYTHONPATH?") from None
    if not (isinstance(cls, type) and issubclass(cls, Fusion)):
        raise ConfigError(f"fusion {name!r} is {cls!r}, not a subclass of "
                          "emimimic.models.fusion.Fusion")
    return cls


def build_fusion(name: str, modalities: list[str], hidden: int, num_targets: int,
                 dropout: float, options: Mapping[str, Any] | None = None) -> Fusion:
    """Returns the fusion ``name`` built for the network's modalities and sizes.

    Raises:
        ConfigError: unknown fusion, or options it does not take.
    """
    cls = fusion_class(name)
    options = dict(options or {})
    try:
        inspect.signature(cls).bind(modalities, hidden, num_targets, dropout, **options)
    except TypeError as err:
        raise ConfigError(f"fusion {name!r} takes {inspect.signature(cls)}: {err} (check "
                          "model.network.init_args.fusion_args)") from None
    return cls(modalities, hidden, num_targets, dropout, **options)


__all__ = ["Fusion", "FusionInput", "FusionOutput", "available_fusions", "build_fusion",
           "fusion_class"]
