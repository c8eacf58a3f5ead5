"""describe mode: parameter count, the per-layer MAC table, the compiled train-step memory."""

import json
import subprocess
import sys

from conftest import tiny_config

from lra_sparse import describe, train


def test_table_lists_every_layer_and_the_totals():
    config = tiny_config('listops', 'attention=dsa,synthetic', **{'max_length': 48})
    description = describe.describe(config)
    text = describe.table(description).splitlines()
    assert text[0].startswith('listops / dsa (impl reference), 2 layers, ')
    assert f"{description['num_params']:,} parameters" in text[0]
    header = text[1].split()
    assert header[:2] == ['layer', 'tokens'] and header[-1] == 'total' and 'predictor' in header
    assert [line.split()[0] for line in text[2:5]] == ['0', '1', 'all']
    assert text[5].startswith('dense: ')


def test_train_step_memory_is_the_compiled_steps():
    config = tiny_config('listops', 'synthetic', **{'max_length': 32, 'batch_size': 8,
                                                   'model.num_layers': 1})
    memory = describe.train_step_memory(config)
    params_bytes = 4 * train.setup_run(config, describe.data.task_info(config))[0].num_params
    assert memory['argument_bytes'] >= params_bytes  # parameters, optimizer state, batch
    assert memory['temp_bytes'] > 0
    assert 'temp ' in describe.table({**describe.describe(config), 'train_step_memory': memory})


def test_cli_prints_a_table_or_json():
    base = [sys.executable, '-m', 'lra_sparse.main', '--config=configs/listops.py:tiny,synthetic',
            '--config.max_length=32', '--mode=describe']
    table = subprocess.run(base + ['--nodescribe_memory'], capture_output=True, text=True,
                           timeout=300, check=True).stdout
    assert table.startswith('listops / dense (impl reference)') and 'train step' not in table
    as_json = json.loads(subprocess.run(base + ['--describe_format=json'], capture_output=True,
                                        text=True, timeout=300, check=True).stdout)
    assert as_json['train_step_memory']['temp_bytes'] > 0
