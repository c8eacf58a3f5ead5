"""User errors of every layer: bad configs, missing data, malformed data files.

This module imports nothing from the package, so every layer (configs, data, attention, training,
command lines) can raise these. Each error is a :class:`UserError`: the command lines print its
message as one line on stderr and exit with status 2 (a traceback only with ``--verbosity=1``).
Messages name the field or file, the value found and what is allowed or how to fix it.
"""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """Something the user can fix: the message says what and how, in one line."""


class ConfigError(UserError):
    """A config field holds a value that is not allowed. The message names field, value, allowed."""


class DataNotFoundError(UserError):
    """The data of a task is missing. The message says what to download, from where, to where."""


class DataFormatError(UserError):
    """A data file is malformed. The message names the file and the line (or record, or member)."""


def config_error(field: str, value: Any, allowed: str) -> ConfigError:
    """The one-line error every validator raises: ``config.<field>=<value> is not allowed: ...``.

    Args:
      field: dotted field name below ``config`` (e.g. ``'model.num_heads'``).
      value: the value found.
      allowed: what is allowed, or how to fix it.
    """
    return ConfigError(f'config.{field}={value!r} is not allowed: {allowed}.')


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raises :func:`config_error` ``(field, value, allowed)`` unless ``ok``."""
    if not ok:
        raise config_error(field, value, allowed)


__all__ = ['ConfigError', 'DataFormatError', 'DataNotFoundError', 'UserError', 'check',
           'config_error']
