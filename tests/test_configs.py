"""Every config loads, validates and builds; every class of bad input gives one clear error."""

import glob
import json
import os
import re
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
    assert desc['encoder_ops_per_sequence'] > 0


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
    ({'grad_clip_norm': -1.0}, 'config.grad_clip_norm=-1.0 is not allowed: a finite number > 0, '
                               'or None (None disables clipping)'),
    ({'grad_clip_norm': 0.0}, 'config.grad_clip_norm=0.0'),
    ({'grad_clip_norm': float('inf')}, 'config.grad_clip_norm=inf'),
    ({'learning_rate': float('inf')}, 'config.learning_rate=inf'),
    ({'learning_rate': float('nan')}, 'config.learning_rate=nan'),
    ({'learning_rate': 0.0}, 'config.learning_rate=0.0'),
    ({'weight_decay': float('nan')}, 'config.weight_decay=nan'),
    ({'weight_decay': -0.1}, 'config.weight_decay=-0.1'),
    ({'warmup_steps': -1}, 'config.warmup_steps=-1'),
    ({'warmup_steps': 0}, 'config.warmup_steps=0 is not allowed: an integer > 0 with rsqrt_decay'),
    ({'schedule': 'constant * cosine_decay', 'steps_per_cycle': 0}, 'config.steps_per_cycle=0'),
    ({'model.attention_dropout_rate': float('nan')}, 'config.model.attention_dropout_rate=nan'),
    ({'num_eval_steps': 0}, 'config.num_eval_steps=0'),
    ({'data.synthetic_examples': 0}, 'config.data.synthetic_examples=0'),
]


@pytest.mark.parametrize('overrides,field', BAD)
def test_bad_config_names_the_field(overrides, field):
    config = tiny_config('listops', **overrides)
    with pytest.raises(config_lib.ConfigError, match=re.escape(field)):
        config_lib.validate(config)


def test_fields_checked_only_where_they_matter():
    config = tiny_config('listops', **{'schedule': 'constant * linear_warmup',
                                       'warmup_steps': 0, 'steps_per_cycle': 0})
    config_lib.validate(config)  # no rsqrt_decay, no cosine_decay
    config_lib.validate(tiny_config('listops', grad_clip_norm=1.0))


@pytest.mark.parametrize('field', ['seed', 'batch_size', 'num_eval_steps', 'model.num_layers',
                                   'data.synthetic_examples'])
def test_a_bool_in_an_int_field_is_refused(field):
    """ml_collections lets True into an int field (bool is an int to Python); validate does not."""
    config = tiny_config('listops', **{field: True})
    with pytest.raises(config_lib.ConfigError, match=rf'config\.{re.escape(field)}=True'):
        config_lib.validate(config)


def test_unknown_attention_lists_registered_names():
    with pytest.raises(config_lib.ConfigError, match='registered methods are dense'):
        config_lib.load('configs/listops.py:attention=nope')


def test_unknown_option_is_refused():
    with pytest.raises(ValueError, match='tinyy'):
        config_lib.load('configs/listops.py:tinyy')


@pytest.mark.parametrize('arg,needle', [
    ('attention=dsa,attention=dense', "'attention' is given twice ('attention=dsa' and "
                                      "'attention=dense')"),
    ('tiny,tiny', "'tiny' is given twice"),
    ('impl=xla,tiny,impl=xla', "'impl' is given twice"),
])
def test_repeated_option_is_refused(arg, needle):
    with pytest.raises(config_lib.ConfigError, match=re.escape(needle)):
        config_lib.parse_arg(arg)


def test_options_help_lists_the_registered_choices():
    text = config_lib.options_help()
    assert f'attention={"|".join(attention.REGISTRY)}' in text
    assert 'impl=reference|xla|pallas' in text and 'apply=train_and_eval|eval_only' in text
    assert 'tiny' in text and 'synthetic' in text


def test_config_file_errors_are_one_line(tmp_path):
    broken = tmp_path / 'broken.py'
    broken.write_text('def get_config(arg=None):\n    return {\n')
    with pytest.raises(config_lib.ConfigError, match=r"broken.py' has a syntax error at line 2"):
        config_lib.load(str(broken))
    empty = tmp_path / 'empty.py'
    empty.write_text('X = 1\n')
    with pytest.raises(config_lib.ConfigError, match=r'defines no get_config'):
        config_lib.load(str(empty))
    with pytest.raises(config_lib.ConfigError, match=r"'configs/nope.py' does not exist"):
        config_lib.load('configs/nope.py:tiny')


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
    out = _cli('--config=configs/listops.py', '--mode=describe', '--describe_format=json',
               '--nodescribe_memory')
    assert out.returncode == 0, out.stderr
    desc = json.loads(out.stdout)
    assert desc['num_params'] > 8e6
    layer = desc['layers'][0]
    assert {'qkv_proj', 'out_proj', 'attention', 'ffn'} <= set(layer['ops'])
    assert {'scores', 'softmax', 'values'} <= set(layer['attention'])
    assert desc['attention_cost'] == 1.0 and desc['model_cost'] == 1.0


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
