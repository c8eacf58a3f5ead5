"""Command-line entry points: quiet library logs, run the body, user errors as one line.

Every command (``lra_sparse.main``, ``sweep``, ``report``, ``throughput``) defines its body as
``run(argv) -> int`` decorated with :func:`command` and its console entry point as
``main() = cli.main(run)``. A :class:`~lra_sparse.errors.UserError` raised anywhere in the body (a
config field, missing or malformed data, a sweep or report that cannot be built, a missing flag)
is printed as ``error: <message>`` on stderr and the command exits with status 2; with
``--verbosity=1`` (or higher) the traceback is printed too.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable

from absl import app, flags

from lra_sparse import metrics
from lra_sparse.errors import UserError


class UsageError(UserError):
    """A required command-line flag is missing or flags contradict each other."""


def command(body: Callable[[list[str]], int]) -> Callable[[list[str]], int]:
    """Wraps a CLI body ``body(argv) -> exit status`` as the command's ``run(argv)``.

    The wrapped function quiets library logs (unless ``--verbosity`` is given), runs ``body`` and
    turns a UserError into one line on stderr and exit status 2.
    """
    @functools.wraps(body)
    def run(argv: list[str]) -> int:
        metrics.quiet_library_logs()
        try:
            return body(argv)
        except UserError as error:
            if _verbose():
                traceback.print_exc()
            print(f'error: {error}', file=sys.stderr)
            return 2

    return run


def main(run: Callable[[list[str]], int]) -> None:
    """Console entry point: parses the absl flags, calls ``run(argv)`` and exits with its status."""
    app.run(lambda argv: sys.exit(run(argv)))


def _verbose() -> bool:
    verbosity = flags.FLAGS['verbosity']
    return bool(verbosity.present) and verbosity.value >= 1


__all__ = ['UsageError', 'command', 'main']
