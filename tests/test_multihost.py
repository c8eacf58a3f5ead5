"""Multi-process runs: joining a run, per-process data, the local launcher, 2 hosts == 1 host.

The end-to-end tests start real processes on localhost, each with its own CPU devices, joined with
``jax.distributed`` and gloo CPU collectives, and compare them with one process holding as many
devices.
"""

import pytest

from lra_sparse import distributed


def test_resolve_reads_flags_before_environment():
    env = {'LRA_COORDINATOR_ADDRESS': 'node0:1234', 'LRA_NUM_PROCESSES': '4',
           'LRA_PROCESS_ID': '3'}
    assert distributed.resolve(distributed=False, environ=env) == distributed.ProcessGroup(
        'node0:1234', 4, 3)
    assert distributed.resolve(distributed=False, process_id=1, environ=env) == (
        distributed.ProcessGroup('node0:1234', 4, 1))
    assert distributed.resolve(distributed=False, environ={}) is None
    # --distributed alone: JAX detects everything (SLURM, Open MPI, TPU pods)
    assert distributed.resolve(distributed=True, environ={}) == distributed.ProcessGroup()


@pytest.mark.parametrize('kwargs, env, message', [
    ({'coordinator_address': 'localhost'}, {}, '--coordinator_address'),
    ({'coordinator_address': 'localhost:99999'}, {}, '--coordinator_address'),
    ({}, {'LRA_NUM_PROCESSES': 'two'}, 'LRA_NUM_PROCESSES'),
    ({'num_processes': 0}, {}, '--num_processes'),
    ({'num_processes': 2, 'process_id': 2}, {}, '--process_id'),
    ({}, {'LRA_NUM_PROCESSES': '2', 'LRA_PROCESS_ID': '-1'}, 'LRA_PROCESS_ID'),
])
def test_resolve_names_the_bad_flag_or_variable(kwargs, env, message):
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.resolve(distributed=False, environ=env, **kwargs)
