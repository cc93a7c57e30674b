"""The errors of bad input, and the shape of a user factory's name: what every module that checks
a value needs, with no imports of its own (``config`` declares its keys from the registries in
``data``, ``models`` and ``methods``, which raise these errors too)."""

from __future__ import annotations

import re

IMPORT_STRING = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names key, value and what is allowed."""


class PayloadError(ValueError):
    """A payload that must not reach the model; the message says why."""


def is_import_string(value: object) -> bool:
    """Whether ``value`` reads as ``package.module:factory`` (the import itself is checked later)."""
    return isinstance(value, str) and IMPORT_STRING.fullmatch(value) is not None
