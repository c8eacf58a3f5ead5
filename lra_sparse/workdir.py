"""Run directories as records: an exclusive lock, the config's provenance, finished runs.

A workdir holds one run. :class:`RunDirectory` opens it for training and evaluation:

- **Lock.** ``workdir/lock`` is held with ``fcntl.flock`` while a run uses the workdir and names
  its holder (pid, host, start time). A second run on the same workdir stops with one line naming
  the holder. A lock file left by a killed run (no process holds it any more) is taken over with
  a warning. The lock is released, and its file removed, when the run ends, also by an error.
  Only process 0 of a multi-process run takes it.
- **Provenance.** A run continues only with the config it started with: the new config is
  compared with the saved ``config.json`` before anything is written. Only
  :data:`CHANGEABLE_FIELDS` may differ; any other difference stops the run with one line listing
  the fields (old -> new). Every start is appended to ``config_history.jsonl`` (time, command,
  host, pid, package versions, git commit, the step it starts from and the fields that changed).
- **Finished runs.** A workdir whose ``results.json`` belongs to the same config is finished:
  running it again returns those results and changes nothing.

``config.json`` and ``results.json`` are written atomically (:mod:`lra_sparse.files`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from lra_sparse import attention as attention_lib
from lra_sparse import config_lib, files
from lra_sparse import data as data_lib
from lra_sparse.errors import ConfigError, UserError
from lra_sparse.results import flatten

_log = logging.getLogger(__name__)

LOCK_FILE = 'lock'
CONFIG_FILE = 'config.json'
HISTORY_FILE = 'config_history.jsonl'
RESULTS_FILE = 'results.json'
METRICS_FILE = 'metrics.jsonl'
CHECKPOINTS_DIR = 'checkpoints'

# Fields a run may change when it continues in the same workdir: none alters what is computed.
CHANGEABLE_FIELDS = {
    'num_train_steps': 'more steps, or fewer but not below the step the run has reached',
    'log_every_steps': 'train-metric logging frequency',
    'eval_every_steps': 'evaluation frequency',
    'checkpoint_every_steps': 'checkpoint frequency',
    'max_checkpoints_to_keep': 'checkpoints kept',
    'eval_test_every_eval': 'also evaluate test at every evaluation',
    'cache_dir': 'where generated data is cached',
    'data_dir': 'raw data moved from one path to another (not to or from unset)',
}


MAX_LISTED = 12  # differing fields named in a refusal (the rest are counted)


class WorkdirError(UserError):
    """The workdir cannot hold this run (the message names the workdir and the reason)."""


class WorkdirLockedError(WorkdirError):
    """Another run holds the workdir's lock (the message names its pid, host and start)."""


class ConfigChangedError(ConfigError):
    """The workdir holds a run of another config (the message lists the differing fields)."""


# ---------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------


class WorkdirLock:
    """An exclusive lock on a workdir: ``workdir/lock``, held with ``fcntl.flock``.

    The file holds ``{"pid", "host", "start"}`` of the holder. The kernel releases a flock when its
    process dies, so a lock file that nobody holds was left by a killed run and is taken over. On
    file systems without flock support, the lock falls back to the file's content: a holder on
    this host whose pid is no longer alive is stale; any other holder is respected.
    """

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Takes the lock, or raises WorkdirLockedError naming the holder.

        Raises:
          WorkdirLockedError: another live process holds the lock.
          OSError: the lock file cannot be created (e.g. a read-only workdir).
        """
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = _read_holder(fd)
                if not _lock(fd, previous):
                    raise WorkdirLockedError(
                        f'workdir {self.workdir!r} is in use by {_describe(previous)}: wait for '
                        'that run to end or use another workdir.')
                if not _same_file(fd, self.path):  # released and removed meanwhile: retry
                    os.close(fd)
                    continue
            except BaseException:
                os.close(fd)
                raise
            if previous:
                _log.warning('workdir %s: taking over the lock left by %s, which no longer runs',
                             self.workdir, _describe(previous))
            holder = {'pid': os.getpid(), 'host': socket.gethostname(),
                      'start': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
            os.fsync(fd)
            self._fd = fd

    def release(self) -> None:
        """Removes the lock file and releases the lock (a no-op if not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None


def _lock(fd: int, previous: dict | None) -> bool:
    """Takes the flock of ``fd``; False if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as error:  # no flock on this file system: judge by the recorded holder
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return not previous or (previous.get('host') == socket.gethostname()
                                and not _pid_alive(previous.get('pid')))


def _read_holder(fd: int) -> dict | None:
    """The holder recorded in the lock file (None if empty; {} if unreadable)."""
    text = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    if not text:
        return None
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict | None) -> str:
    if not holder:
        return 'another run (its lock file names no holder yet)'
    return (f'pid {holder.get("pid")} on host {holder.get("host")} '
            f'(started {holder.get("start")})')


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


class _Absent:
    """A field one of two configs does not have."""

    def __repr__(self) -> str:
        return '(absent)'


ABSENT = _Absent()


def config_as_json(config: ml_collections.ConfigDict) -> dict:
    """The config as the plain JSON dict ``config.json`` holds."""
    return json.loads(config.to_json_best_effort())


def field_defaults(attention_name: str) -> dict[str, Any]:
    """Defaults of every field a config may have, as JSON values, by dotted name.

    The shared fields (``config_lib.base_config``), every registered task's own fields and the
    fields of the attention method ``attention_name``.
    """
    defaults = flatten(config_as_json(config_lib.base_config()))
    for task in data_lib.REGISTRY.values():
        for field in task.fields:
            defaults.setdefault(field.name, json.loads(json.dumps(field.default)))
    if attention_name in attention_lib.REGISTRY:
        method_defaults = attention_lib.get_method(attention_name).default_config()
        defaults.update(flatten(config_as_json(method_defaults), 'attention.'))
    return defaults


def config_changes(saved: dict, new: dict,
                   defaults: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every field whose value differs between two configs (as JSON dicts).

    A field only one config has (a task's own field that moved between versions) is no change
    when it holds its default there.

    Args:
      saved: the config the workdir was started with.
      new: the config of this run.
      defaults: :func:`field_defaults`.

    Returns:
      {dotted field: (saved value, new value)}, :data:`ABSENT` for the side that lacks it, sorted.
    """
    old_fields, new_fields = flatten(saved), flatten(new)
    changes = {}
    for name in sorted(old_fields.keys() | new_fields.keys()):
        old, cur = old_fields.get(name, ABSENT), new_fields.get(name, ABSENT)
        if old == cur:
            continue
        present = cur if old is ABSENT else old if cur is ABSENT else ABSENT
        if present is not ABSENT and name in defaults and present == defaults[name]:
            continue
        changes[name] = (old, cur)
    return changes


def refused_changes(changes: dict[str, tuple[Any, Any]], reached_step: int) -> list[str]:
    """The changes a continuing run may not make, as 'field old -> new' texts.

    Args:
      changes: :func:`config_changes`.
      reached_step: the latest checkpoint step of the workdir (0 if none).
    """
    refused = []
    for name, (old, new) in changes.items():
        text = f'{name} {_show(old)} -> {_show(new)}'
        if name not in CHANGEABLE_FIELDS:
            refused.append(text)
        elif name == 'num_train_steps' and (not isinstance(new, int) or new < reached_step):
            refused.append(f'{text} (the run has reached step {reached_step})')
        elif name == 'data_dir' and (old in (None, ABSENT) or new in (None, ABSENT)):
            refused.append(f'{text} (only a moved data_dir may change, not whether one is set)')
    return refused


def _show(value: Any) -> str:
    return repr(value)


def checkpoint_steps(workdir: str) -> list[int]:
    """Steps of the finished checkpoints in ``workdir/checkpoints`` (ascending; [] if none)."""
    directory = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def run_metadata() -> dict[str, Any]:
    """Where a run comes from: command line, host, package versions, git commit and dirty flag."""
    return {'command': list(sys.argv), 'host': socket.gethostname(), 'versions': _versions(),
            **_git_state()}


def _versions() -> dict[str, str | None]:
    """Versions of Python and the packages that decide the computation."""
    out: dict[str, str | None] = {'python': platform.python_version()}
    for package in ('lra_sparse', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy'):
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return out


def _git_state() -> dict[str, Any]:
    """The commit (and uncommitted-changes flag) of the source checkout this package runs from.

    Empty when the package is not run from its own git checkout.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(['git', '-C', root, *args], capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git('rev-parse', '--show-toplevel')
    if not top or os.path.realpath(top) != os.path.realpath(root):
        return {}
    status = git('status', '--porcelain', '--untracked-files=no')
    return {'git_commit': git('rev-parse', 'HEAD'),
            'git_dirty': None if status is None else bool(status)}


# ---------------------------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------------------------


class RunDirectory:
    """A workdir opened for one run: locked, its saved config checked, its records written.

    Use as a context manager; the lock is held (by process 0 only) until the block ends.

      with RunDirectory(workdir, is_main=True) as rundir:
          rundir.check_config(config, mode='train')       # refuses a changed config
          results = rundir.finished_results(config, 'train')
          ...
          rundir.record_start(config, start_step)         # config.json + config_history.jsonl
          rundir.write_results(results)

    Args:
      path: the workdir (created if missing; removed again at exit if the run left it empty).
      is_main: whether this process writes (process 0); only it takes the lock.
      agree: for runs of several processes, ``ok -> every process's ok`` (a collective every
        process calls): opening the workdir fails in every process when it fails in one (process
        0 finding the lock held), so no process goes on alone to wait forever at a collective.
    """

    def __init__(self, path: str, *, is_main: bool = True,
                 agree: Callable[[bool], bool] | None = None):
        self.path = path
        self.is_main = is_main
        self.agree = agree
        self.lock = WorkdirLock(path)
        self.changes: dict[str, tuple[Any, Any]] = {}
        self._created = False

    def __enter__(self) -> RunDirectory:
        error = None
        try:
            self._open()
        except WorkdirError as refused:
            error = refused
        if self.agree is not None and not self.agree(error is None):
            if error is None:
                self.__exit__(None, None, None)
                error = WorkdirError(f'workdir {self.path!r} cannot be used by another process of '
                                     'this run (process 0 says why); every process stops.')
        if error is not None:
            raise error
        return self

    def _open(self) -> None:
        """Creates the workdir and (process 0) takes the lock; raises WorkdirError."""
        try:
            self._created = not os.path.lexists(self.path)
            os.makedirs(self.path, exist_ok=True)
            if self.is_main:
                self.lock.acquire()
        except OSError as error:
            reason = ('it exists and is not a directory' if isinstance(error, FileExistsError)
                      else error.strerror or str(error))
            raise WorkdirError(f'workdir {self.path!r} cannot be used: {reason}; give a '
                               'directory this user can create and write.') from None

    def __exit__(self, *exc_info) -> None:
        if not self.is_main:
            return
        self.lock.release()
        if self._created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)  # only succeeds when the run wrote nothing

    def file(self, name: str) -> str:
        """The path of ``name`` in the workdir."""
        return os.path.join(self.path, name)

    def saved_config(self) -> dict | None:
        """The workdir's config.json as a dict (None if there is none).

        Raises:
          WorkdirError: config.json is unreadable, or missing while checkpoints exist.
        """
        path = self.file(CONFIG_FILE)
        if not os.path.exists(path):
            if checkpoint_steps(self.path):
                raise WorkdirError(
                    f'workdir {self.path!r} has checkpoints but no {CONFIG_FILE}, so the config '
                    'they belong to is unknown: restore the file or use another workdir.')
            return None
        try:
            saved = files.read_json_object(path)
        except (OSError, ValueError) as error:
            raise WorkdirError(f'{path} cannot be read ({one_line(error)}), so the config of '
                               'this workdir is unknown: restore the file or use another '
                               'workdir.') from None
        return saved

    def check_config(self, config: ml_collections.ConfigDict, mode: str) -> None:
        """Refuses a config that differs from the saved one in a field that is not changeable.

        Also refuses to evaluate into a training run's workdir and to train in an evaluation's.
        Writes nothing; the allowed changes are kept in ``self.changes``.

        Args:
          config: the run's config.
          mode: 'train' or 'evaluate'.

        Raises:
          ConfigChangedError: one line listing every differing field (saved -> new).
          WorkdirError: the workdir holds a run of the other mode.
        """
        self._check_mode(mode)
        saved = self.saved_config()
        if saved is None:
            return
        changes = config_changes(saved, config_as_json(config),
                                 field_defaults(config.attention.name))
        refused = refused_changes(changes, max(checkpoint_steps(self.path), default=0))
        if refused:
            shown = refused[:MAX_LISTED] + (
                [f'and {len(refused) - MAX_LISTED} more'] if len(refused) > MAX_LISTED else [])
            raise ConfigChangedError(
                f'workdir {self.path!r} holds a run of another config ({"; ".join(shown)}); a '
                f'run continues only with its own config (it may change '
                f'{", ".join(CHANGEABLE_FIELDS)}): use a new workdir for this config.')
        self.changes = changes

    def _check_mode(self, mode: str) -> None:
        if mode == 'evaluate' and checkpoint_steps(self.path):
            raise WorkdirError(f'workdir {self.path!r} holds a training run (checkpoints/); '
                               'evaluate mode writes its results in a workdir of its own.')
        results = self._read_results()
        if mode == 'train' and results is not None and results.get('mode') == 'evaluate':
            raise WorkdirError(f'workdir {self.path!r} holds an evaluation (results.json has '
                               "mode 'evaluate'); train in a workdir of its own.")

    def _read_results(self) -> dict | None:
        """results.json as a dict; None if missing or unreadable (a warning names the file)."""
        path = self.file(RESULTS_FILE)
        if not os.path.exists(path):
            return None
        try:
            results = files.read_json_object(path)
        except (OSError, ValueError) as error:
            _log.warning('%s cannot be read (%s); the run is treated as unfinished', path,
                         one_line(error))
            return None
        return results

    def finished_results(self, config: ml_collections.ConfigDict, mode: str) -> dict | None:
        """The saved results if this config's run already finished in the workdir, else None.

        Call after :meth:`check_config`. A training run is finished when results.json exists and
        records ``config.num_train_steps`` steps; an evaluation when its results.json exists.
        """
        results = self._read_results()
        if results is None:
            return None
        if mode == 'evaluate' or results.get('num_train_steps') == config.num_train_steps:
            return results
        return None

    def record_start(self, config: ml_collections.ConfigDict, start_step: int) -> None:
        """Writes config.json (atomically, if it changed) and appends to config_history.jsonl.

        Call once the run is about to compute (its checkpoint restored), after
        :meth:`check_config`. Only process 0 writes.
        """
        if not self.is_main:
            return
        for name in (CONFIG_FILE, RESULTS_FILE):  # left by a run killed while replacing them
            with contextlib.suppress(FileNotFoundError):
                os.unlink(files.tmp_path(self.file(name)))
        text = json.dumps(config_as_json(config), indent=2, sort_keys=True) + '\n'
        path = self.file(CONFIG_FILE)
        existed = os.path.exists(path)
        if not existed or _read_text(path) != text:
            files.atomic_write_text(path, text)
        entry = {
            'time': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
            'event': 'resumed' if existed else 'started', 'start_step': int(start_step),
            'changes': {name: [None if old is ABSENT else old, None if new is ABSENT else new]
                        for name, (old, new) in self.changes.items()},
            'pid': os.getpid(), **run_metadata(),
        }
        files.append_line(self.file(HISTORY_FILE), json.dumps(entry, sort_keys=True))

    def write_results(self, results: dict) -> None:
        """Writes results.json atomically (process 0 only)."""
        if self.is_main:
            files.atomic_write_json(self.file(RESULTS_FILE), results)


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def one_line(error: BaseException) -> str:
    """``'<error type>: <first line of its message>'``, at most 200 characters."""
    lines = str(error).strip().splitlines()
    text = f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + '...'


__all__ = ['ABSENT', 'CHANGEABLE_FIELDS', 'ConfigChangedError', 'RunDirectory', 'WorkdirError',
           'WorkdirLock', 'WorkdirLockedError', 'checkpoint_steps', 'config_as_json',
           'config_changes', 'field_defaults', 'flatten', 'one_line', 'refused_changes']
