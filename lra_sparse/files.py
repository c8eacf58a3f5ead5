"""Files that survive kills: atomic replacement, appended lines, and the fault-injection hook.

A file written with :func:`atomic_write_text` is first written in full to ``<name>.tmp`` in the
same folder, flushed to disk, then renamed over ``<name>`` (``os.replace``, atomic on POSIX file
systems): a process killed at any instant leaves either the old or the new file, never a torn
one. A leftover ``<name>.tmp`` is harmless and is overwritten by the next write.

This module imports nothing from the package, so every layer can use it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

PAUSE_ENV = 'LRA_SPARSE_TEST_PAUSE_AT'
PAUSE_MARKER_ENV = 'LRA_SPARSE_TEST_PAUSE_MARKER'


def pause_point(name: str) -> None:
    """Test-only hook: blocks forever here when ``$LRA_SPARSE_TEST_PAUSE_AT`` equals ``name``.

    Fault-injection tests run training in a subprocess with this variable set, wait until the
    process reaches the point (it creates the file named by ``$LRA_SPARSE_TEST_PAUSE_MARKER``, if
    set) and kill it there with SIGKILL. The points are ``checkpoint_save:<step>`` (right after
    the asynchronous save of that step's checkpoint started), ``step:<step>`` (that step's
    logging, evaluation and saving are done) and ``replace:<file name>`` (the new content is in
    ``<file name>.tmp``, the old file is still in place). Without the variable this is a
    dictionary lookup.
    """
    if os.environ.get(PAUSE_ENV) != name:
        return
    marker = os.environ.get(PAUSE_MARKER_ENV)
    if marker:
        with open(marker, 'w') as f:
            f.write(name)
    sys.stderr.write(f'paused at {name}\n')
    sys.stderr.flush()
    while True:
        time.sleep(60)


def tmp_path(path: str) -> str:
    """Where :func:`atomic_write_text` stages the new content of ``path``."""
    return f'{path}.tmp'


def atomic_write_text(path: str, text: str) -> None:
    """Replaces the file ``path`` by ``text`` atomically (staged in ``path.tmp``, then renamed)."""
    staged = tmp_path(path)
    with open(staged, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    pause_point(f'replace:{os.path.basename(path)}')
    os.replace(staged, path)
    _fsync_dir(os.path.dirname(path) or '.')


def atomic_write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented, key-sorted JSON with :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True) + '\n')


def read_json_object(path: str) -> dict:
    """The JSON object stored in ``path``.

    Raises:
      OSError: the file cannot be read.
      ValueError: it is not JSON, or its JSON is not an object.
    """
    with open(path, encoding='utf-8') as f:
        value = json.load(f)
    if not isinstance(value, dict):
        raise ValueError(f'not a JSON object but a {type(value).__name__}')
    return value


def append_line(path: str, line: str) -> None:
    """Appends ``line`` plus a newline in one write (after a newline if the file lacks its last).

    A process killed during the write can leave only a torn last line, which readers of
    line-oriented files (``metrics.jsonl``) detect and repair.
    """
    with open(path, 'a+b') as f:
        prefix = b''
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            prefix = b'' if f.read(1) == b'\n' else b'\n'
        f.write(prefix + line.encode() + b'\n')


def _fsync_dir(directory: str) -> None:
    """Flushes a folder's entries (the rename) to disk where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ['PAUSE_ENV', 'PAUSE_MARKER_ENV', 'append_line', 'atomic_write_json',
           'atomic_write_text', 'pause_point', 'tmp_path']
