"""The network as a part: building it from a factory or a stored spec, and the spec it leaves.

A *spec* is what a checkpoint keeps of the network: ``{"class_path": "pkg.module.Class",
"init_args": {...}}`` with every init argument but ``dims`` and ``targets`` as plain values
(defaults filled in, so a later change of a default does not change an old checkpoint's model).
A *factory* is what code passes: the class itself, ``functools.partial(cls, **options)``, or the
callable the YAML's ``class_path``/``init_args`` becomes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from emimimic.errors import ConfigError

#: What builds a network: called with the data's dims and target names.
NetworkFactory = Callable[[dict[str, int], list[str]], nn.Module]

_PLAIN = (str, int, float, bool, type(None))


def class_path(cls: type) -> str:
    """Returns the import path ``module.QualName`` of a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def import_class(path: str, what: str = "network") -> type:
    """Returns the class an import path names.

    Raises:
        ConfigError: the path does not import or does not name a class.
    """
    module_name, _, name = str(path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{what} class {path!r} cannot be imported ({err}); put the module "
                          "that defines it on PYTHONPATH") from None
    if not isinstance(cls, type):
        raise ConfigError(f"{what} class path {path!r} does not name a class")
    return cls


def _plain(value: Any, where: str) -> Any:
    """Returns ``value`` as plain data (what a checkpoint and a YAML file can hold)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(f"network option {where} is a {type(value).__name__}; a network's options "
                      "must be plain values (numbers, strings, lists, dicts) so that its "
                      "checkpoint can rebuild it: name parts by string (e.g. fusion: gated)")


def _filled(cls: type, options: Mapping[str, Any]) -> dict[str, Any]:
    """Returns every init argument of ``cls`` but the first two, defaults filled in, as plain data.

    Raises:
        ConfigError: an option the class does not take, or one without a plain value.
    """
    try:
        bound = inspect.signature(cls).bind_partial({}, [], **options)
    except TypeError as err:
        raise ConfigError(f"{class_path(cls)}{inspect.signature(cls)}: {err}") from None
    bound.apply_defaults()
    names = list(bound.arguments)[2:]
    return {n: _plain(bound.arguments[n], n) for n in names
            if inspect.signature(cls).parameters[n].kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                                 inspect.Parameter.VAR_KEYWORD)}


def _factory_parts(network: Any) -> tuple[type | None, dict[str, Any]]:
    """Returns the class (if known before building) and the options of a factory or spec."""
    if isinstance(network, Mapping):
        if "class_path" not in network:
            raise ConfigError(f"network spec {dict(network)} lacks a class_path")
        return import_class(network["class_path"]), dict(network.get("init_args") or {})
    if isinstance(network, type):
        return network, {}
    if isinstance(network, functools.partial):
        cls = network.func if isinstance(network.func, type) else None
        return cls, dict(network.keywords)
    if isinstance(network, nn.Module):
        raise ConfigError("pass the network's class (or functools.partial(cls, **options)), not "
                          "a built module: EMIModule builds it from the data's dims and targets "
                          "and records how, so its checkpoint can rebuild it")
    if callable(network):
        return None, {}
    raise ConfigError(f"network must be a class, a factory or a spec, got {network!r}")


def build_network(network: NetworkFactory | Mapping[str, Any], dims: Mapping[str, int],
                  targets: Sequence[str]) -> tuple[nn.Module, dict[str, Any]]:
    """Returns the network built for ``dims`` and ``targets``, and its spec.

    Args:
        network: a class, a ``functools.partial`` of one, the factory a YAML ``class_path``
            becomes, or a spec (``{"class_path", "init_args"}``, what a checkpoint holds).
        dims: modality -> feature dimension.
        targets: target names.

    Raises:
        ConfigError: the class cannot be imported, does not take the options, returns no
            ``nn.Module``, or has options that are not plain values.
    """
    cls, options = _factory_parts(network)
    if cls is not None:
        _filled(cls, options)  # refuses options the class does not take, before building
    if isinstance(network, Mapping):
        built = cls(dict(dims), list(targets), **options)  # type: ignore[misc]
    else:
        built = network(dict(dims), list(targets))
    if not isinstance(built, nn.Module):
        raise ConfigError(f"the network factory returned {type(built).__name__}, not an nn.Module")
    cls = type(built)
    return built, {"class_path": class_path(cls), "init_args": _filled(cls, options)}


__all__ = ["NetworkFactory", "build_network", "class_path", "import_class"]
