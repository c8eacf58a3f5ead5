"""Joining a multi-process (multi-host) run: who the coordinator is, how many processes, which one.

Every process of a run calls :func:`initialize` before JAX touches a device; afterwards
``jax.devices()`` lists the devices of every process, the training mesh spans all of them and each
process loads only its share of every batch (``lra_sparse.data``).

Where the three values come from, first match wins for each:

1. the command line: ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``;
2. the environment: ``LRA_COORDINATOR_ADDRESS``, ``LRA_NUM_PROCESSES``, ``LRA_PROCESS_ID`` (what
   ``python -m lra_sparse.launch`` sets for the processes it starts);
3. JAX's own detection, for values given by neither: ``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI,
   Cloud TPU pods (``jax.distributed.initialize()``). ``--distributed`` alone asks for this.

On CPU, processes exchange data through JAX's CPU collectives; :func:`initialize` selects gloo
(TCP) unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` names another one (e.g. ``mpi``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

from lra_sparse.errors import UserError

ENV_COORDINATOR_ADDRESS = 'LRA_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'LRA_NUM_PROCESSES'
ENV_PROCESS_ID = 'LRA_PROCESS_ID'
CPU_COLLECTIVES = 'gloo'


class DistributedSetupError(UserError):
    """The coordinator address, process count or process id given is not usable."""


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """The values handed to ``jax.distributed.initialize``; None = let JAX detect it.

    Attributes:
      coordinator_address: ``host:port`` of process 0's coordinator service.
      num_processes: processes in the run.
      process_id: this process, in ``0 .. num_processes - 1``.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


def resolve(*, distributed: bool, coordinator_address: str | None = None,
            num_processes: int | None = None, process_id: int | None = None,
            environ: Mapping[str, str] | None = None) -> ProcessGroup | None:
    """The process group a command should join, or None for a single-process run.

    Args:
      distributed: ``--distributed`` was given (join even if nothing else is: JAX detects all).
      coordinator_address, num_processes, process_id: the command-line values (None = not given).
      environ: the environment to read ``LRA_*`` from (default ``os.environ``).

    Returns:
      None when neither ``distributed`` nor any value (flag or ``LRA_*`` variable) is given.

    Raises:
      DistributedSetupError: a value is malformed or out of range (naming the flag or variable).
    """
    environ = os.environ if environ is None else environ
    address, address_source = _pick(coordinator_address, environ, ENV_COORDINATOR_ADDRESS,
                                     'coordinator_address')
    count, count_source = _pick(num_processes, environ, ENV_NUM_PROCESSES, 'num_processes')
    index, index_source = _pick(process_id, environ, ENV_PROCESS_ID, 'process_id')
    if not distributed and address is None and count is None and index is None:
        return None
    if address is not None:
        host, _, port = str(address).rpartition(':')
        _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, address_source,
                 address, 'HOST:PORT with a port in 1..65535, e.g. localhost:12345')
    count = _as_int(count, count_source)
    index = _as_int(index, index_source)
    if count is not None:
        _require(count >= 1, count_source, count, 'a positive integer')
    if index is not None:
        limit = f'0 .. {count - 1} (--num_processes={count})' if count else 'an integer >= 0'
        _require(index >= 0 and (count is None or index < count), index_source, index, limit)
    return ProcessGroup(address, count, index)


def initialize(group: ProcessGroup) -> None:
    """Joins ``group``: selects CPU collectives, then ``jax.distributed.initialize``.

    Must run before anything asks JAX for its devices. Blocks until every process has joined.

    Raises:
      DistributedSetupError: JAX could not determine a value (no flag, variable or known cluster).
    """
    if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
        jax.config.update('jax_cpu_collectives_implementation', CPU_COLLECTIVES)
    try:
        jax.distributed.initialize(coordinator_address=group.coordinator_address,
                                   num_processes=group.num_processes,
                                   process_id=group.process_id)
    except ValueError as error:  # JAX names what it could not detect
        raise DistributedSetupError(
            f'cannot join the multi-process run: {error} Give --coordinator_address, '
            f'--num_processes and --process_id (or {ENV_COORDINATOR_ADDRESS}, '
            f'{ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}), or run under SLURM, Open MPI or on a '
            'Cloud TPU pod.') from error


def _pick(flag_value, environ: Mapping[str, str], variable: str, flag: str):
    """(value, where it came from): the flag if given, else the environment variable."""
    if flag_value is not None:
        return flag_value, f'--{flag}'
    if environ.get(variable, '') != '':
        return environ[variable], variable
    return None, variable


def _as_int(value, source: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    _require(str(value).strip().lstrip('-').isdigit(), source, value, 'an integer')
    return int(value)


def _require(ok: bool, source: str, value, allowed: str) -> None:
    if not ok:
        raise DistributedSetupError(f'{source}={value!r} is not allowed: {allowed}.')


__all__ = ['ENV_COORDINATOR_ADDRESS', 'ENV_NUM_PROCESSES', 'ENV_PROCESS_ID',
           'DistributedSetupError', 'ProcessGroup', 'initialize', 'resolve']
