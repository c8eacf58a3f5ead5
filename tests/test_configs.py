"""Every config loads, validates and builds; every class of bad input gives one clear error."""

import glob
import json
import os
import subprocess
import sys

import pytest
from conftest import tiny_config

from lra_sparse import attention, config_lib, describe

CONFIG_FILES = sorted(glob.glob('configs/*.py'))
TASKS = [os.path.splitext(os.path.basename(p))[0] for p in CONFIG_FILES]

# Full-size parameter counts of the reference LRA code (LRA.md table, computed there).
REFERENCE_PARAMS = {'listops': 8.95e6, 'text': 3.49e6, 'retrieval': 1.087e6, 'image': 248e3}


def test_all_tasks_have_a_config():
    assert sorted(TASKS) == sorted(config_lib.TASKS)


@pytest.mark.parametrize('path', CONFIG_FILES)
@pytest.mark.parametrize('method', list(attention.REGISTRY))
@pytest.mark.parametrize('size', ['', 'tiny'])
def test_config_loads_validates_builds(path, method, size):
    arg = ','.join(filter(None, [f'attention={method}', size]))
    config = config_lib.load(f'{path}:{arg}')
    config_lib.validate(config)
    desc = describe.describe(config)
    assert desc['num_params'] > 0 and len(desc['layers']) == config.model.num_layers
    assert desc['encoder_macs_per_sequence'] > 0


@pytest.mark.parametrize('task', list(REFERENCE_PARAMS))
def test_full_config_param_counts_match_reference(task):
    desc = describe.describe(config_lib.load(f'configs/{task}.py'))
    print(task, desc['num_params'])
    assert abs(desc['num_params'] - REFERENCE_PARAMS[task]) / REFERENCE_PARAMS[task] < 0.01


BAD = [
    ({'task': 'pathfinder'}, 'config.task'),
    ({'model.emb_dim': 0}, 'config.model.emb_dim'),
    ({'model.num_heads': 3}, 'config.model.num_heads'),
    ({'model.qkv_dim': -8}, 'config.model.qkv_dim'),
    ({'batch_size': 0}, 'config.batch_size'),
    ({'num_microbatches': 3}, 'config.num_microbatches'),
    ({'num_microbatches': 0}, 'config.num_microbatches'),
    ({'model.dropout_rate': 1.5}, 'config.model.dropout_rate'),
    ({'attention.impl': 'cuda'}, 'config.attention.impl'),
    ({'attention.apply': 'sometimes'}, 'config.attention.apply'),
    ({'schedule': 'constant * warmup'}, 'config.schedule'),
    ({'data.listops_max_length': 5000}, 'config.data.listops_max_length'),
]


@pytest.mark.parametrize('overrides,field', BAD)
def test_bad_config_names_the_field(overrides, field):
    config = tiny_config('listops', **overrides)
    with pytest.raises(config_lib.ConfigError, match=field.replace('.', r'\.')):
        config_lib.validate(config)


def test_unknown_attention_lists_registered_names():
    with pytest.raises(config_lib.ConfigError, match='registered methods are dense'):
        config_lib.load('configs/listops.py:attention=nope')


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match='tinyy'):
        config_lib.load('configs/listops.py:tinyy')


def test_sparsity_out_of_range_is_refused():
    methods = [m for m in attention.REGISTRY
               if 'sparsity' in config_lib.attention_config(m, 'reference', 'train_and_eval')]
    if not methods:
        pytest.skip('no registered method has a sparsity knob')
    config = tiny_config('listops', f'attention={methods[0]}', **{'attention.sparsity': 1.0})
    with pytest.raises(config_lib.ConfigError, match=r'config\.attention\.sparsity'):
        config_lib.validate(config)


def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'lra_sparse.main', *args], capture_output=True,
                          text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_cli_describe_prints_json():
    out = _cli('--config=configs/listops.py', '--mode=describe')
    assert out.returncode == 0, out.stderr
    desc = json.loads(out.stdout)
    assert desc['num_params'] > 8e6
    layer = desc['layers'][0]['macs']
    assert {'qkv_proj', 'out_proj', 'scores', 'attention_values', 'ffn'} <= set(layer)


@pytest.mark.parametrize('args,needle', [
    (['--config=configs/listops.py:tiny', '--config.model.num_heads=5', '--mode=describe'],
     'config.model.num_heads=5'),
    (['--config=configs/text.py:tiny', '--workdir=/tmp/lra_sparse_missing_text',
      '--config.data_dir=/nonexistent'], 'imdb'),
])
def test_cli_bad_input_is_one_clear_line(args, needle):
    out = _cli(*args)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and needle.lower() in lines[0].lower(), out.stderr
