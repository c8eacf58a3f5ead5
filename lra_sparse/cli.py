"""Command-line entry points: flags, configs, user errors as one line.

Every command (``lra_sparse.main``, ``sweep``, ``report``, ``throughput``) defines its body as
``run(argv) -> int`` decorated with :func:`command` and its console entry point as
``main() = cli.main(run)``. A :class:`~lra_sparse.errors.UserError` raised anywhere (while the
flags are parsed, while the config is loaded, in the body: a config field, missing or malformed
data, a sweep or report that cannot be built, a missing flag) is printed as ``error: <message>``
on stderr and the command exits with status 2; with ``--verbosity=1`` (or higher) the traceback is
printed too. A malformed flag (unknown name, a value of the wrong type) is one such line as well.

Commands that take a config define it with :func:`define_config`: ``--config=path:options`` (the
options after ``:`` are listed in ``--help``) and ``--config.<field>=value`` for any field, parsed
by the field's type with :func:`lra_sparse.config_lib.set_field` (the same parser as sweeps,
notebooks and tests use; ``--config.<field> value``, ``--config.<bool field>`` and
``--noconfig.<bool field>`` work too).
"""

from __future__ import annotations

import functools
import re
import sys
import traceback
from collections.abc import Callable

import ml_collections
from absl import app, flags

from lra_sparse import config_lib, metrics
from lra_sparse.errors import ConfigError, UserError

_OVERRIDE = re.compile(r'^--?(no)?config\.([^=]*)(=(.*))?$', re.DOTALL)
_VERBOSITY = re.compile(r'^--?(verbosity|v)=(-?\d+)$')

flags.disclaim_key_flags()  # flags defined here belong to the calling command (its --help)


class UsageError(UserError):
    """A required command-line flag is missing or flags contradict each other."""


class ConfigFlag:
    """``--config=path:options`` (once, or repeated with ``multi``) and its field overrides.

    Attributes:
      overrides: the ``(field, text)`` pairs of ``--config.<field>=text``, in order (a boolean
        field given as ``--config.<field>`` / ``--noconfig.<field>`` has the text True / False).
      configs: one locked ConfigDict per spec with every override applied, once
        :meth:`load` ran (``cli.command`` runs it before the body).
    """

    def __init__(self, holder: flags.FlagHolder, multi: bool):
        self._holder = holder
        self._multi = multi
        self.overrides: list[tuple[str, str]] = []
        self.configs: list[ml_collections.ConfigDict] = []

    @property
    def specs(self) -> list[str]:
        """The ``path:options`` texts given (empty when ``--config`` is not given)."""
        value = self._holder.value
        return list(value or []) if self._multi else [value] if value else []

    @property
    def spec(self) -> str | None:
        """The (first) ``path:options`` text, or None when ``--config`` is not given."""
        return self.specs[0] if self.specs else None

    @property
    def value(self) -> ml_collections.ConfigDict | None:
        """The (first) loaded config, or None when ``--config`` is not given."""
        return self.configs[0] if self.configs else None

    def load(self) -> None:
        """Loads every spec, applies the overrides in order and locks the configs.

        Raises:
          ConfigError: a bad file, option, field name or value (one line naming it).
          UsageError: overrides without ``--config``.
        """
        if self.overrides and not self.specs:
            raise UsageError(f'--config.{self.overrides[0][0]} needs --config=path:options '
                             'first, e.g. --config=configs/listops.py:tiny')
        self.configs = []
        for spec in self.specs:
            config = config_lib.load(spec)
            config.lock()
            for dotted, text in self.overrides:
                _set_override(config, dotted, text)
            self.configs.append(config)


_CONFIG_FLAG: ConfigFlag | None = None


def define_config(*, multi: bool = False, help_text: str | None = None) -> ConfigFlag:
    """Defines ``--config`` for the calling command module (shown in its ``--help``).

    Args:
      multi: ``--config`` may be repeated (one config per occurrence; overrides apply to each).
      help_text: what the config is for; the options after ``:`` are appended.

    Returns:
      The ConfigFlag; its ``configs`` are loaded before the command body runs.
    """
    global _CONFIG_FLAG
    text = (f'{help_text or "Config file and options"}: path[:options], e.g. '
            'configs/listops.py:attention=dsa,tiny. Options after ":": '
            f'{config_lib.options_help()}. Override any field with --config.<field>=value, e.g. '
            '--config.attention.sparsity=0.95.')
    define = flags.DEFINE_multi_string if multi else flags.DEFINE_string
    holder = define('config', None, text + (' Repeat --config to run several.' if multi else ''))
    _CONFIG_FLAG = ConfigFlag(holder, multi)
    return _CONFIG_FLAG


def check_output_dir(path: str, flag: str) -> None:
    """Raises UsageError unless ``path`` is (or can be created as) a writable directory.

    Args:
      path: the directory a command writes to.
      flag: the flag that gave it (named in the message), e.g. ``'--workdir'``.
    """
    problem = config_lib.directory_problem(path)
    if problem:
        raise UsageError(f'{flag}={path!r} {problem}: give a directory you can write to')


def command(body: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Wraps a CLI body ``body(argv) -> exit status`` as the command's ``run(argv)``.

    The wrapped function quiets library logs (unless ``--verbosity`` is given), loads the
    command's ``--config`` (if it defines one), runs ``body`` and turns a UserError into one line
    on stderr and exit status 2.
    """
    @functools.wraps(body)
    def run(argv: list[str]) -> int:
        metrics.quiet_library_logs()
        try:
            if _CONFIG_FLAG is not None and flags.FLAGS.is_parsed():
                _CONFIG_FLAG.load()
            return body(argv)
        except UserError as error:
            _print_error(error, traceback_wanted=_verbose())
            return 2

    return run


def main(run: Callable[[list[str]], int]) -> None:
    """Console entry point: parses the flags, calls ``run(argv)`` and exits with its status."""
    app.run(lambda argv: sys.exit(run(argv)), flags_parser=_parse_flags)


def no_arguments(argv: list[str]) -> None:
    """Raises UsageError if positional arguments are left after the flags (a flag without --)."""
    if len(argv) > 1:
        raise UsageError(f'unexpected argument {argv[1]!r}: every input of this command is a '
                         'flag (--name=value); see --help')


def _parse_flags(argv: list[str]) -> list[str]:
    """Parses the flags with absl, keeping ``--config.<field>`` apart; errors are one line.

    Returns:
      The positional arguments (program name first), as absl gives them to ``main``.
    """
    try:
        rest, overrides = _split_overrides(argv)
        if overrides and _CONFIG_FLAG is None:
            raise UsageError(f'--config.{overrides[0][0]}: this command takes no config flags')
        if _CONFIG_FLAG is not None:
            _CONFIG_FLAG.overrides = overrides
        return flags.FLAGS(rest)
    except (flags.Error, UserError) as error:
        verbose = any((m := _VERBOSITY.match(arg)) and int(m.group(2)) >= 1 for arg in argv)
        _print_error(error, traceback_wanted=verbose)
        sys.exit(2)


def _split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates ``--config.<field>[=value]`` (and ``--noconfig.<field>``) from absl's flags.

    ``--config.<field>`` without ``=`` takes the next argument as its value unless that starts
    with ``-``; then it is the boolean True (``--noconfig.<field>``: False).

    Returns:
      (the other arguments, the ``(field, text)`` overrides in order).
    """
    rest, overrides = [], []
    args = iter(enumerate(argv))
    for i, arg in args:
        if arg == '--':  # absl's end of flags: the rest are positional arguments
            rest.extend(argv[i:])
            break
        match = _OVERRIDE.match(arg) if i else None
        if match is None:
            rest.append(arg)
            continue
        negated, dotted, has_value, value = match.groups()
        if not dotted:
            raise ConfigError(f'{arg!r} names no field: write --config.<field>=value')
        if negated and has_value:
            raise ConfigError(f'{arg!r}: --noconfig.<field> takes no value; write '
                              f'--config.{dotted}=False')
        if has_value is None and not negated and i + 1 < len(argv) and not \
                argv[i + 1].startswith('-'):
            value = next(args)[1]
        elif has_value is None:
            value = _BOOLEAN_FALSE if negated else _BOOLEAN_TRUE
        overrides.append((dotted, value))
    return rest, overrides


class _BooleanText(str):
    """'True' / 'False' from ``--config.<field>`` / ``--noconfig.<field>`` (boolean fields only)."""


_BOOLEAN_TRUE, _BOOLEAN_FALSE = _BooleanText('True'), _BooleanText('False')


def _set_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """``config_lib.set_field``; a bare ``--config.<field>`` must name a boolean field."""
    if isinstance(text, _BooleanText):
        if config_lib.field_type(config, dotted) is not bool:
            raise ConfigError(f'--{"no" if text == "False" else ""}config.{dotted} needs a '
                              f'value: write --config.{dotted}=VALUE')
    config_lib.set_field(config, dotted, str(text))


def _print_error(error: Exception, *, traceback_wanted: bool) -> None:
    """``error: <message>`` on stderr (the traceback first when wanted)."""
    if traceback_wanted:
        traceback.print_exception(error)
    print(f'error: {_one_line(error)}', file=sys.stderr)


def _one_line(error: Exception) -> str:
    """The message of the UserError behind ``error`` (absl wraps parser errors), on one line."""
    cause = error
    while cause is not None and not isinstance(cause, UserError):
        cause = cause.__cause__ or cause.__context__
    message = str(cause if cause is not None else error)
    return ' '.join(message.split())


def _verbose() -> bool:
    verbosity = flags.FLAGS['verbosity']
    return bool(verbosity.present) and verbosity.value >= 1


__all__ = ['ConfigFlag', 'UsageError', 'check_output_dir', 'command', 'define_config', 'main',
           'no_arguments']
