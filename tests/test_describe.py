"""describe mode: parameter count, the per-layer cost table, the compiled train-step memory."""

import json
import subprocess
import sys

import pytest
from conftest import tiny_config

from lra_sparse import describe, train


def test_table_lists_every_layer_and_the_totals():
    config = tiny_config('listops', 'attention=dsa,synthetic', **{'max_length': 48})
    description = describe.describe(config)
    text = describe.table(description).splitlines()
    assert text[0].startswith('listops / dsa (impl reference), 2 layers, ')
    assert f"{description['num_params']:,} parameters" in text[0]
    header = text[1].split()
    assert header[:2] == ['layer', 'tokens'] and header[-2:] == ['total', 'attention_cost']
    assert {'attention', 'qkv_proj', 'ffn'} <= set(header)
    assert [line.split()[0] for line in text[2:5]] == ['0', '1', 'all']
    assert text[5].startswith('dense: ') and 'model_cost' in text[5]
    assert 'macs' not in json.dumps(description).lower()


def test_costs_are_the_ones_the_model_logs():
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from lra_sparse.models import transformer  # noqa: PLC0415

    config = tiny_config('listops', 'attention=spatten,synthetic', **{'max_length': 48})
    description = describe.describe(config)
    info = describe.data.task_info(config)
    model = transformer.build_model(config, info)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 10, size=(2, info.seq_len)))
    _, aux = model({'inputs': tokens})
    assert float(aux['stats']['attention_cost']) == pytest.approx(description['attention_cost'])
    assert float(aux['stats']['model_cost']) == pytest.approx(description['model_cost'])
    for row in description['layers']:
        logged = float(aux['stats'][f"layer{row['layer']}/attention_cost"])
        assert logged == pytest.approx(row['attention_cost'])


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
