"""Local multi-process launcher: N processes of ``lra_sparse.main`` on this machine, as N hosts.

  python -m lra_sparse.launch --num_processes=2 --devices_per_process=2 -- \
      --config=configs/listops.py:attention=dense,tiny --workdir=runs/two_hosts

Everything after ``--`` goes to every process of ``python -m lra_sparse.main``. Each process gets
``devices_per_process`` CPU devices (``JAX_PLATFORMS=cpu``,
``XLA_FLAGS=--xla_force_host_platform_device_count=D``) and joins the run through
``LRA_COORDINATOR_ADDRESS=localhost:PORT``, ``LRA_NUM_PROCESSES`` and ``LRA_PROCESS_ID`` (see
``lra_sparse.distributed``), so the run trains on ``N * D`` devices exactly as one process with
``N * D`` devices would. This is how multi-host code paths (process coordination, per-process data
loading, checkpoints written by every process, metrics written once) run without a cluster; on a
cluster start one process per host with the cluster's own launcher (README, "Multi-host").

Process 0's output goes to the terminal; the others' go to ``--process_log_dir/process_<i>.log``
or, without ``--process_log_dir``, to stderr with a ``[process i]`` prefix on each line. If a
process fails, the others are stopped and the launcher exits with the failed process's status.
SIGINT and SIGTERM are forwarded to every process; processes still running
``--kill_after_seconds`` later are killed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

from absl import flags

from lra_sparse import cli, distributed

_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes to start (>= 1).')
_DEVICES = flags.DEFINE_integer('devices_per_process', 1, 'CPU devices of each process (>= 1).')
_PORT = flags.DEFINE_integer('coordinator_port', 0,
                             'Port of the coordinator on localhost (0: pick a free one).')
_LOG_DIR = flags.DEFINE_string(
    'process_log_dir', None,
    'Write the output of processes 1.. to DIR/process_<i>.log (default: stderr, prefixed).')
_KILL_AFTER = flags.DEFINE_float(
    'kill_after_seconds', 10.0, 'After forwarding a signal or stopping processes because one '
    'failed, kill those still running this many seconds later.')

POLL_SECONDS = 0.1
_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def free_port() -> int:
    """A TCP port on localhost that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('localhost', 0))
        return sock.getsockname()[1]


def process_environment(base: Mapping[str, str], *, coordinator_address: str,
                        num_processes: int, process_id: int,
                        devices_per_process: int) -> dict[str, str]:
    """The environment of process ``process_id``: ``base`` plus CPU devices and the run's place.

    An ``--xla_force_host_platform_device_count`` already in ``XLA_FLAGS`` is replaced; other
    XLA flags are kept.
    """
    env = dict(base)
    xla_flags = [f for f in env.get('XLA_FLAGS', '').split()
                 if not f.startswith(_DEVICE_COUNT_FLAG)]
    env['XLA_FLAGS'] = ' '.join([*xla_flags, f'{_DEVICE_COUNT_FLAG}={devices_per_process}'])
    env['JAX_PLATFORMS'] = 'cpu'
    env[distributed.ENV_COORDINATOR_ADDRESS] = coordinator_address
    env[distributed.ENV_NUM_PROCESSES] = str(num_processes)
    env[distributed.ENV_PROCESS_ID] = str(process_id)
    return env


def launch(command: Sequence[str], num_processes: int, devices_per_process: int, *,
           port: int = 0, log_dir: str | None = None, kill_after_seconds: float = 10.0) -> int:
    """Runs ``command`` as processes 0 .. num_processes - 1 of one run; returns the exit status.

    Args:
      command: the program and its arguments, the same for every process.
      num_processes: processes to start.
      devices_per_process: CPU devices of each.
      port: coordinator port on localhost (0: a free one).
      log_dir: where the output of processes 1.. goes (None: stderr, prefixed).
      kill_after_seconds: grace period between stopping (or forwarding a signal) and killing.

    Returns:
      0 if every process exited with 0; else the status of the process that failed (the
      lowest-numbered if several failed at once; 128 + the signal number for one killed by a
      signal), or 128 + the number of a signal (SIGINT, SIGTERM) the launcher received and
      forwarded.
    """
    address = f'localhost:{port or free_port()}'
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    group = _ProcessGroup(kill_after_seconds)
    with group.forwarding_signals():
        try:
            for process_id in range(num_processes):
                env = process_environment(os.environ, coordinator_address=address,
                                          num_processes=num_processes, process_id=process_id,
                                          devices_per_process=devices_per_process)
                group.start(list(command), env, process_id, log_dir)
        except BaseException:  # a process could not start: do not leave the others waiting
            group.kill_all()
            raise
        return group.wait()


class _ProcessGroup:
    """The started processes, each in its own session (so signals reach them only through us)."""

    def __init__(self, kill_after_seconds: float):
        self.kill_after_seconds = kill_after_seconds
        self.processes: list[subprocess.Popen] = []
        self.relays: list[threading.Thread] = []
        self.logs: list[IO] = []
        self.signal_received: int | None = None

    def start(self, command: list[str], env: dict[str, str], process_id: int,
              log_dir: str | None) -> None:
        """Starts one process; its output goes to the terminal, a log file or a prefixed relay."""
        output = None
        if process_id and log_dir:
            output = open(os.path.join(log_dir, f'process_{process_id}.log'), 'w')
            self.logs.append(output)
        elif process_id:
            output = subprocess.PIPE
        process = subprocess.Popen(command, env=env, stdout=output,
                                   stderr=subprocess.STDOUT if output else None,
                                   start_new_session=True)
        self.processes.append(process)
        if output is subprocess.PIPE:
            relay = threading.Thread(target=_relay, args=(process.stdout, process_id), daemon=True)
            relay.start()
            self.relays.append(relay)

    def wait(self) -> int:
        """Waits for all processes; on a failure or a signal, stops the rest. Returns the status."""
        try:
            while True:
                if self.signal_received is not None:
                    self._wait_or_kill()
                    return 128 + self.signal_received
                codes = [p.poll() for p in self.processes]
                failed = [c for c in codes if c not in (None, 0)]
                if failed:
                    self._signal_all(signal.SIGTERM)
                    self._wait_or_kill()
                    return failed[0] if failed[0] > 0 else 128 - failed[0]
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(POLL_SECONDS)
        finally:
            for relay in self.relays:
                relay.join(timeout=1.0)
            for log in self.logs:
                log.close()

    @contextlib.contextmanager
    def forwarding_signals(self) -> Iterator[None]:
        """Context: SIGINT/SIGTERM are forwarded to every process (a second one kills them)."""
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def kill_all(self) -> None:
        """Kills every process still running and waits for it."""
        self._signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def _on_signal(self, signum: int, frame) -> None:
        del frame
        if self.signal_received is None:
            self.signal_received = signum
            self._signal_all(signum)
        else:  # asked twice: do not wait any longer
            self._signal_all(signal.SIGKILL)

    def _signal_all(self, signum: int) -> None:
        for process in self.processes:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    pass

    def _wait_or_kill(self) -> None:
        """Waits up to ``kill_after_seconds`` for every process, then kills the rest."""
        deadline = time.monotonic() + self.kill_after_seconds
        while time.monotonic() < deadline and any(p.poll() is None for p in self.processes):
            time.sleep(POLL_SECONDS)
        self.kill_all()


def _relay(stream: IO[bytes], process_id: int) -> None:
    """Copies a process's output to stderr, line by line, prefixed ``[process i]``."""
    prefix = f'[process {process_id}] '.encode()
    for line in iter(stream.readline, b''):
        sys.stderr.buffer.write(prefix + line)
        sys.stderr.buffer.flush()
    stream.close()


@cli.command
def run(argv: list[str]) -> int:
    """Entry point body: checks the flags, launches ``lra_sparse.main`` with ``argv[1:]``."""
    if _NUM_PROCESSES.value is None or _NUM_PROCESSES.value < 1:
        raise cli.UsageError(f'--num_processes={_NUM_PROCESSES.value} is not allowed: give a '
                             'positive integer, e.g. --num_processes=2')
    if _DEVICES.value < 1:
        raise cli.UsageError(f'--devices_per_process={_DEVICES.value} is not allowed: give a '
                             'positive integer')
    if not 0 <= _PORT.value < 65536:
        raise cli.UsageError(f'--coordinator_port={_PORT.value} is not allowed: 0 (a free port) '
                             'or 1..65535')
    if len(argv) < 2:
        raise cli.UsageError('give the arguments of lra_sparse.main after "--", e.g. -- '
                             '--config=configs/listops.py:tiny --workdir=runs/x')
    command = [sys.executable, '-m', 'lra_sparse.main', *argv[1:]]
    return launch(command, _NUM_PROCESSES.value, _DEVICES.value, port=_PORT.value,
                  log_dir=_LOG_DIR.value, kill_after_seconds=_KILL_AFTER.value)


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
