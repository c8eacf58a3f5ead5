"""Training throughput of full-size configs on synthetic data (no download needed).

  python -m lra_sparse.throughput --config=configs/listops.py \
      --config=configs/text.py:attention=dsa [--steps=50] [--warmup=5] [--out=throughput.json] \
      [--config.model.dtype=bfloat16]

``--config=path:options`` and ``--config.<field>=value`` are those of ``lra_sparse.main``;
``--config`` may be repeated and the overrides apply to every config. For every config (the
reference hyperparameters unless ``tiny`` or overrides say otherwise) it compiles the real jitted
train step on synthetic data of the task's shapes, runs ``warmup`` steps, then times ``steps``
steps one by one (``block_until_ready``) and reports the median step time, steps/s and
examples/s, with the device, jax version and date.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import flags

from lra_sparse import cli, config_lib, data, train

_CONFIGS = cli.define_config(multi=True, help_text='Config to time')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps after compilation.')
_OUT = flags.DEFINE_string('out', None, 'Write the rows as JSON here.')


def synthetic_config(config) -> None:
    """Switches ``config`` to synthetic data (a few batches) and validates it."""
    config.data.source = 'synthetic'
    config.data.synthetic_examples = max(config.batch_size * 4, 64)
    config_lib.validate(config)


def time_config(config, steps: int, warmup: int) -> dict:
    """Median train-step time of ``config`` on synthetic data."""
    synthetic_config(config)
    task = data.load_task(config)
    run, state = train.setup_run(config, task.info)
    state = run.place(state)
    batches = data.train_batches(task.splits['train'], config.batch_size, seed=0)
    t0 = time.perf_counter()
    state, _ = run.train_step(state, run.shard(next(batches)))
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, _ = run.train_step(state, run.shard(next(batches)))
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        batch = run.shard(next(batches))
        jax.block_until_ready(batch)
        t0 = time.perf_counter()
        state, metrics = run.train_step(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = float(np.median(times))
    return {'task': config.task, 'attention': config.attention.name,
            'impl': config.attention.impl, 'dtype': config.model.dtype,
            'batch_size': config.batch_size, 'num_microbatches': config.num_microbatches,
            'seq_len': task.info.seq_len,
            'num_params': run.num_params, 'compile_seconds': compile_s,
            'median_step_seconds': median, 'steps_per_second': 1.0 / median,
            'examples_per_second': config.batch_size / median, 'timed_steps': steps}


@cli.command
def run(argv) -> int:
    """CLI body; returns the exit status."""
    cli.no_arguments(argv)
    if not _CONFIGS.configs:
        raise cli.UsageError('--config is required, e.g. --config=configs/listops.py '
                             '--config=configs/text.py:attention=dsa')
    if _STEPS.value < 1 or _WARMUP.value < 0:
        raise cli.UsageError(f'--steps={_STEPS.value} --warmup={_WARMUP.value} are not allowed: '
                             'at least one timed step and no negative warmup')
    for config in _CONFIGS.configs:  # every config is valid before any compute
        synthetic_config(config)
    if _OUT.value:
        if os.path.isdir(_OUT.value):
            raise cli.UsageError(f'--out={_OUT.value!r} is a directory: give a file name, e.g. '
                                 'throughput.json')
        cli.check_output_dir(os.path.dirname(_OUT.value) or '.', '--out')
    env = train.environment()
    rows = []
    for config in _CONFIGS.configs:
        row = {**env, **time_config(config, _STEPS.value, _WARMUP.value)}
        rows.append(row)
        print(f'{row["task"]:10s} {row["attention"]:8s} {row["dtype"]:9s} params '
              f'{row["num_params"]:>9,d}  {row["steps_per_second"]:8.2f} steps/s  '
              f'{row["examples_per_second"]:9.1f} ex/s  (compile {row["compile_seconds"]:.1f} s)',
              flush=True)
    if _OUT.value:
        with open(_OUT.value, 'w') as f:
            json.dump(rows, f, indent=2)
    print(f'{env["device"]} x{env["num_devices"]}, jax {env["jax_version"]}, {env["date"]}')
    return 0


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
