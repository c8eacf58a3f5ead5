"""Training throughput of full-size configs on synthetic data (no download needed).

  python -m lra_sparse.throughput --tasks=listops,text,retrieval,image --attention=dense \
      [--steps=50] [--warmup=5] [--out=throughput.json] [--set=model.dtype=bfloat16]

For every (task, attention) it builds the real config (reference hyperparameters), compiles the
real jitted train step, runs ``warmup`` steps, then times ``steps`` steps one by one
(``block_until_ready``) and reports the median step time, steps/s and examples/s, with the device,
jax version and date.
"""

from __future__ import annotations

import datetime
import json
import time

import jax
import numpy as np
from absl import flags

from lra_sparse import cli, config_lib, data, train

_TASKS = flags.DEFINE_list('tasks', ['listops', 'text', 'retrieval', 'image'], 'Tasks to time.')
_ATTENTION = flags.DEFINE_list('attention', ['dense'], 'Attention methods to time.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 5, 'Untimed steps after compilation.')
_OUT = flags.DEFINE_string('out', None, 'Write the rows as JSON here.')
_SET = flags.DEFINE_multi_string('set', [], 'Override for every config: field=value.')
_TINY = flags.DEFINE_bool('tiny', False, 'Time the tiny configs instead (CPU check).')


def time_config(config, steps: int, warmup: int) -> dict:
    """Median train-step time of ``config`` on synthetic data."""
    config.data.source = 'synthetic'
    config.data.synthetic_examples = max(config.batch_size * 4, 64)
    config_lib.validate(config)
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


def environment() -> dict:
    """Device, jax version and date of a measurement."""
    dev = jax.devices()[0]
    return {'device': getattr(dev, 'device_kind', dev.platform), 'platform': dev.platform,
            'num_devices': jax.device_count(), 'jax_version': jax.__version__,
            'date': datetime.date.today().isoformat()}


@cli.command
def run(argv) -> int:
    """CLI body; returns the exit status."""
    del argv
    env = environment()
    rows = []
    for task in _TASKS.value:
        for name in _ATTENTION.value:
            arg = f'attention={name}' + (',tiny' if _TINY.value else '')
            config = config_lib.apply_overrides(config_lib.load(f'configs/{task}.py:{arg}'),
                                                map(config_lib.parse_override, _SET.value))
            row = {**env, **time_config(config, _STEPS.value, _WARMUP.value)}
            rows.append(row)
            print(f'{task:10s} {name:8s} {row["dtype"]:9s} params {row["num_params"]:>9,d}  '
                  f'{row["steps_per_second"]:8.2f} steps/s  {row["examples_per_second"]:9.1f} '
                  f'ex/s  (compile {row["compile_seconds"]:.1f} s)', flush=True)
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
