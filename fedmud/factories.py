"""User factories named by an import string, ``package.module:factory``.

``model`` and ``dataset`` take a built-in name or such a string. :func:`load_factory`
imports the factory, :func:`call_factory` calls it with the keyword arguments it
declares among those on offer (all of them when it takes ``**kwargs``). Anything that
goes wrong stops with one :class:`~fedmud.errors.ConfigError` naming the key, the
value and what is expected, like every other bad configuration value.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import ConfigError, is_import_string

BUILTINS: dict[str, tuple[str, ...]] = {}  # key -> its built-in names, each registry's own


def register_builtins(key: str, names: tuple[str, ...]) -> None:
    """Name ``key``'s built-ins in this module's messages (``fedmud.models`` and ``fedmud.data`` do)."""
    BUILTINS[key] = names


def expected(key: str) -> str:
    """What ``key`` takes, for error messages."""
    names = BUILTINS.get(key)
    builtin = f"a built-in name ({', '.join(names)}) or " if names else ""
    return f"{builtin}'package.module:factory'"


def refusal(key: str, value: str, reason: str, wanted: str | None = None) -> ConfigError:
    """The error for a factory that cannot be used: key, value, why, and what is expected."""
    return ConfigError(f"{key}={value!r} is not allowed: {reason}; expected {wanted or expected(key)}")


def load_factory(key: str, value: str) -> Callable[..., Any]:
    """Import the callable that ``value`` (``package.module:factory``) names."""
    if not is_import_string(value):
        raise refusal(key, value, "it is not of the form 'package.module:factory'")
    module_name, _, attribute = value.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module's own code raised
        raise refusal(key, value, f"cannot import module {module_name!r} ({_describe(err)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise refusal(key, value, f"module {module_name!r} has no attribute {attribute!r}") from None
        target = getattr(target, part)
    if not callable(target):
        raise refusal(key, value, f"{value} is {type_phrase(target)}, not callable")
    return target


def _parameters(factory: Callable[..., Any]) -> list[inspect.Parameter] | None:
    """``factory``'s parameters, or None when it has no signature (some builtins): call it bare."""
    try:
        return list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return None


def accepted_kwargs(factory: Callable[..., Any], available: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``available`` that ``factory``'s signature declares (all of it for ``**kwargs``)."""
    parameters = _parameters(factory)
    if parameters is None:
        return {}
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return dict(available)
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in available.items() if k in named}


def _missing_arguments(factory: Callable[..., Any], available: dict[str, Any]) -> list[str]:
    """Required parameters of ``factory`` that are not on offer (the call would fail)."""
    parameters = _parameters(factory)
    if parameters is None:
        return []
    required = [p for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return [p.name for p in required if p.kind is p.POSITIONAL_ONLY or p.name not in available]


def call_factory(key: str, value: str, factory: Callable[..., Any], **available_kwargs: Any) -> Any:
    """Call ``factory`` with the arguments it declares among ``available_kwargs``.

    A factory needing an argument not on offer, or raising, becomes a ConfigError
    naming key and value (a ConfigError it raises itself passes through unchanged).
    """
    missing = _missing_arguments(factory, available_kwargs)
    if missing:
        offered = ", ".join(available_kwargs) or "none"
        needs = ", ".join(map(repr, missing))
        reason = f"the factory requires argument(s) {needs}, which are not passed (on offer: {offered})"
        raise refusal(key, value, reason)
    try:
        return factory(**accepted_kwargs(factory, available_kwargs))
    except ConfigError:
        raise
    except Exception as err:
        raise refusal(key, value, f"the factory raised {_describe(err)}") from err


def type_phrase(value: object) -> str:
    """``a dict``, ``an int``, ``a tuple of 3``: what a value is, for messages."""
    name = type(value).__name__
    size = f" of {len(value)}" if isinstance(value, (tuple, list)) else ""
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}{size}"


def _describe(err: BaseException) -> str:
    """``Type: message`` on one line, short enough for a log line."""
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


def class_labels(dataset: str, split: str, values: object, length: int, allowed: str) -> np.ndarray:
    """``values`` (a ``.targets`` attribute, a label tensor or column) as int64 class labels,
    checked: one integer >= 0 per item; the refusal names ``dataset`` and says what is ``allowed``."""
    labels = np.asarray(values.numpy() if hasattr(values, "numpy") and not isinstance(values, np.ndarray) else values)
    if labels.ndim != 1 or len(labels) != length or labels.dtype.kind not in "iu" or (labels < 0).any():
        raise refusal(
            "dataset", dataset, f"the {split} set's labels are not one integer >= 0 per item (found {labels.dtype})", allowed
        )
    return labels.astype(np.int64)


def class_count(dataset: str, declared: object, observed: int) -> int:
    """How many classes: ``declared`` (a dataset's ``num_classes``, a ClassLabel's) when it is an
    integer, refused when a label is past it; else ``observed``, the largest label + 1."""
    if not isinstance(declared, (int, np.integer)) or isinstance(declared, bool):
        return int(observed)
    if declared < observed:
        raise refusal(
            "dataset", dataset, f"the train set declares {declared} classes but a label is {observed - 1}",
            "labels below the declared number of classes",
        )
    return int(declared)

