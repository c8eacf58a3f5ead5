"""Command line: train a config in a workdir, or describe the model it builds.

  python -m lra_sparse.main --config=configs/listops.py:attention=dense,tiny --workdir=runs/x
  python -m lra_sparse.main --config=configs/text.py:attention=dsa --mode=describe
  python -m lra_sparse.main ... --config.attention.sparsity=0.95   # override any field
  # apply a method to a trained (e.g. dense) run at evaluation, without fine-tuning
  python -m lra_sparse.main --config=configs/listops.py:attention=dfss,tiny --mode=evaluate \
      --config.init_from=runs/x --workdir=runs/x_dfss_eval

Options after ``:``: attention=<method>, impl=<impl>, apply=<where>, tiny, synthetic (``--help``
lists the choices). Invalid configs, flags, workdirs and missing or malformed data stop before any
compute with one line naming the field (or flag, or file), the value and what is allowed (exit
status 2).
"""

from __future__ import annotations

import json

import jax
from absl import flags

from lra_sparse import cli, config_lib, describe, distributed

_CONFIG = cli.define_config()
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (outputs, checkpoints; resumes).')
_MODE = flags.DEFINE_enum(
    'mode', 'train', ['train', 'evaluate', 'describe'],
    'train: train and evaluate; evaluate: evaluate the weights of --config.init_from with this '
    "config's attention (no training); describe: parameters, ops per layer, attention_cost and "
    'model_cost, train-step memory.')
_FORMAT = flags.DEFINE_enum('describe_format', 'table', ['table', 'json'],
                            'describe mode: a compact table, or JSON with every field.')
_MEMORY = flags.DEFINE_bool(
    'describe_memory', True, "describe mode: compile the train step and report XLA's memory "
    'analysis (about a minute for a full-size config on a CPU); --nodescribe_memory skips it.')
# Multi-process runs (README "Multi-host"; lra_sparse/distributed.py says where values come from).
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Join a multi-process run; JAX detects what the flags below omit.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0 (else $LRA_COORDINATOR_ADDRESS).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in the run (else $LRA_NUM_PROCESSES).')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, 0 .. num_processes - 1 (else $LRA_PROCESS_ID).')


@cli.command
def run(argv) -> int:
    """Entry point body; returns the exit status."""
    cli.no_arguments(argv)
    group = distributed.resolve(distributed=_DISTRIBUTED.value,
                                coordinator_address=_COORDINATOR.value,
                                num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    config = _CONFIG.value
    if config is None:
        raise cli.UsageError('--config is required, e.g. --config=configs/listops.py:tiny')
    if group is not None:  # before anything asks JAX for its devices (validate does)
        distributed.initialize(group)
    config_lib.validate(config)
    if _MODE.value == 'describe':
        description = describe.describe(config)
        if _MEMORY.value:
            description['train_step_memory'] = describe.train_step_memory(config)
        print(json.dumps(description, indent=2) if _FORMAT.value == 'json'
              else describe.table(description))
        return 0
    if not _WORKDIR.value:
        raise cli.UsageError(f'--workdir is required in {_MODE.value} mode (outputs go there)')
    cli.check_output_dir(_WORKDIR.value, '--workdir')
    from lra_sparse import train  # heavy import (orbax) only when training or evaluating

    if _MODE.value == 'evaluate':
        results = train.evaluate_checkpoint(config, _WORKDIR.value)
    else:
        results = train.train_and_evaluate(config, _WORKDIR.value)
    if jax.process_index() == 0:
        print(f'final validation accuracy {results["validation"]["accuracy"]:.4f}, '
              f'test accuracy {results["test"]["accuracy"]:.4f} '
              f'({config.task}, {config.attention.name}, {results["num_train_steps"]} steps, '
              f'{results["wall_time_seconds"]:.0f} s); results in {_WORKDIR.value}/results.json')
    return 0


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
