"""Multi-process runs: joining a run, per-process data, the local launcher, 2 hosts == 1 host.

The end-to-end tests start real processes on localhost, each with its own CPU devices, joined with
``jax.distributed`` and gloo CPU collectives, and compare them with one process holding as many
devices.
"""

import numpy as np
import pytest

from lra_sparse import data, distributed


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


def _indexed_split(num_examples: int, length: int = 3) -> dict:
    """A split whose example i has inputs[i, 0] == i + 1 (0 stays padding) and target i % 5."""
    inputs = np.zeros((num_examples, length), np.int32)
    inputs[:, 0] = np.arange(num_examples) + 1
    return {'inputs': inputs, 'targets': (np.arange(num_examples) % 5).astype(np.int32)}


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_split_every_training_batch(process_count):
    """Per step, the processes' batches concatenate to the one-process batch; resumable."""
    split, batch_size, steps = _indexed_split(13), 8, 6  # batches straddle epochs
    whole = data.train_batches(split, batch_size, seed=3)
    parts = [data.train_batches(split, batch_size, seed=3, process_index=p,
                                process_count=process_count) for p in range(process_count)]
    resumed = [data.train_batches(split, batch_size, seed=3, start_step=4, process_index=p,
                                  process_count=process_count) for p in range(process_count)]
    for step in range(steps):
        expected = next(whole)
        local = [next(it) for it in parts]
        for key in ('inputs', 'targets', 'weights'):
            assert all(len(b[key]) == batch_size // process_count for b in local)
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])
        if step >= 4:
            for it, b in zip(resumed, local):
                np.testing.assert_array_equal(next(it)['inputs'], b['inputs'])


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_evaluate_every_example_once(process_count):
    split, batch_size = _indexed_split(21), 8  # 3 batches, the last with 3 padding rows
    seen = []
    whole = list(data.eval_batches(split, batch_size))
    parts = [list(data.eval_batches(split, batch_size, process_index=p,
                                    process_count=process_count)) for p in range(process_count)]
    assert all(len(batches) == len(whole) for batches in parts)
    for i, expected in enumerate(whole):
        local = [batches[i] for batches in parts]
        for key in ('inputs', 'targets', 'weights'):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])
        for b in local:
            seen.extend(b['inputs'][b['weights'] > 0, 0] - 1)
    assert sorted(seen) == list(range(21))
