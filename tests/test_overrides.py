"""Dotted-key overrides: type-aware parsing of text, type checks of values, one-line errors."""

import pytest
from conftest import tiny_config

from lra_sparse import config_lib, sweep
from lra_sparse.config_lib import ConfigError, apply_overrides, parse_override, set_field


def _error(config, dotted, value) -> str:
    with pytest.raises(ConfigError) as info:
        set_field(config, dotted, value)
    message = str(info.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('text,expected', [('True', True), ('true', True), ('1', True),
                                           ('False', False), ('false', False), ('0', False)])
def test_bool_from_text(text, expected):
    config = tiny_config('listops', **{'model.learn_pos_emb': not expected})
    set_field(config, 'model.learn_pos_emb', text)
    assert config.model.learn_pos_emb is expected


@pytest.mark.parametrize('text', ['yes', 'FALSE', '', '2', 'None'])
def test_bool_refuses_other_text(text):
    message = _error(tiny_config(), 'model.learn_pos_emb', text)
    assert message.startswith(f'config.model.learn_pos_emb={text!r} is not allowed')
    assert 'True, true, 1, False, false, 0' in message


def test_sweep_override_false_is_false():
    """The text 'False' of a sweep override used to become True (bool('False'))."""
    point = sweep.Point('dense', (('model.learn_pos_emb', 'False'), ('num_train_steps', '7')))
    config = sweep.point_config('configs/listops.py:tiny', point)
    assert config.model.learn_pos_emb is False and config.num_train_steps == 7
    point = sweep.Point('dense', (('model.learn_pos_emb', 'true'),))
    assert sweep.point_config('configs/listops.py:tiny', point).model.learn_pos_emb is True


def test_numbers_parse_by_field_type():
    config = tiny_config()
    apply_overrides(config, [('model.num_layers', '3'), ('learning_rate', '1e-3'),
                             ('model.dropout_rate', '0'), ('seed', ' 12 ')])
    assert config.model.num_layers == 3 and type(config.model.num_layers) is int
    assert config.learning_rate == 1e-3
    assert config.model.dropout_rate == 0.0 and type(config.model.dropout_rate) is float
    assert config.seed == 12


@pytest.mark.parametrize('dotted,text,allowed', [
    ('model.num_layers', '0.5', 'an integer'), ('model.num_layers', 'two', 'an integer'),
    ('model.num_layers', 'None', 'an integer'), ('learning_rate', 'fast', 'a number'),
    ('grad_clip_norm', 'big', 'a number')])
def test_numbers_refuse_other_text(dotted, text, allowed):
    message = _error(tiny_config(), dotted, text)
    assert message == f'config.{dotted}={text!r} is not allowed: {allowed}.'


def test_none_default_fields_parse_by_placeholder_type():
    config = tiny_config()
    assert config.grad_clip_norm is None and config.init_from is None
    set_field(config, 'grad_clip_norm', '1.5')
    assert config.grad_clip_norm == 1.5
    set_field(config, 'grad_clip_norm', '2')
    assert config.grad_clip_norm == 2.0 and type(config.grad_clip_norm) is float
    set_field(config, 'grad_clip_norm', 'None')
    assert config.grad_clip_norm is None
    set_field(config, 'init_from', 'runs/dense')
    assert config.init_from == 'runs/dense'
    set_field(config, 'init_from', 'None')  # a placeholder is cleared by 'None' even when set
    assert config.init_from is None
    set_field(config, 'data_dir', '/data/lra')
    assert config.data_dir == '/data/lra'


def test_strings_are_taken_verbatim():
    config = tiny_config()
    set_field(config, 'model.pooling', 'MEAN')
    set_field(config, 'schedule', 'constant * linear_warmup')
    set_field(config, 'model.dtype', 'None')  # not a None-default field: just text
    assert (config.model.pooling, config.schedule) == ('MEAN', 'constant * linear_warmup')
    assert config.model.dtype == 'None'


def test_tuples_from_commas_or_a_literal():
    config = tiny_config('listops', 'attention=spatten')
    assert config.attention.token_keep_ratios == ()  # no element type to go by
    set_field(config, 'attention.token_keep_ratios', '1.0, 0.5')
    assert config.attention.token_keep_ratios == (1.0, 0.5)
    set_field(config, 'attention.token_keep_ratios', '(1.0, 0.8)')
    assert config.attention.token_keep_ratios == (1.0, 0.8)
    set_field(config, 'attention.head_keep_counts', '[4, 2]')
    assert config.attention.head_keep_counts == (4, 2)
    set_field(config, 'attention.head_keep_counts', '4,3')  # elements are ints now
    assert config.attention.head_keep_counts == (4, 3)
    assert 'an integer' in _error(config, 'attention.head_keep_counts', '4,0.5')
    assert 'an integer' in _error(config, 'attention.head_keep_counts', '(4, 0.5)')
    assert 'tuple literal' in _error(config, 'attention.head_keep_counts', '(4')
    set_field(config, 'attention.token_keep_ratios', '')
    assert config.attention.token_keep_ratios == ()
    set_field(config, 'attention.head_keep_counts', [4, 4])  # a list is stored as a tuple
    assert config.attention.head_keep_counts == (4, 4)


def test_nested_keys_and_locked_configs():
    config = tiny_config('listops', 'attention=dsa')
    config.lock()
    apply_overrides(config, {'attention.sparsity': '0.75', 'attention.granularity': 'block',
                             'data.listops_num_train': 64, 'model.num_heads': '2'})
    assert config.attention.sparsity == 0.75 and config.attention.granularity == 'block'
    assert config.data.listops_num_train == 64 and config.model.num_heads == 2
    config_lib.validate(config)


@pytest.mark.parametrize('dotted,hint', [
    ('model.emb_dm', 'did you mean model.emb_dim, model.mlp_dim or model.qkv_dim?'),
    ('emb_dim', 'did you mean model.emb_dim'),
    ('modle.num_layers', 'did you mean model.num_layers'),
    ('attention.sparsty', 'did you mean attention.sparsity'),
    ('model.num_layers.depth', 'did you mean model.num_layers'),
    ('zzzz', 'the fields are attention, batch_size, cache_dir,'),
])
def test_unknown_field_names_close_matches(dotted, hint):
    config = tiny_config('listops', 'attention=dsa')
    message = _error(config, dotted, '1')
    assert message.startswith(f'config.{dotted} does not exist: ') and hint in message


def test_values_from_python_get_the_ml_collections_type_checks():
    config = tiny_config()
    set_field(config, 'learning_rate', 1)  # int -> float field is allowed
    assert config.learning_rate == 1.0 and type(config.learning_rate) is float
    set_field(config, 'grad_clip_norm', 3)
    assert config.grad_clip_norm == 3.0
    set_field(config, 'init_from', None)
    assert config.init_from is None
    assert _error(config, 'model.num_layers', 2.5) == (
        'config.model.num_layers=2.5 is not allowed: a value of type int.')
    assert 'a value of type bool' in _error(config, 'model.learn_pos_emb', 1)
    assert 'a value of type str' in _error(config, 'model.pooling', 3)
    assert 'a value of type float' in _error(config, 'grad_clip_norm', [1.0])


def test_a_group_is_not_a_value():
    message = _error(tiny_config(), 'model', '3')
    assert 'config.model.<field>=' in message


def test_parse_override():
    assert parse_override('model.learn_pos_emb=False') == ('model.learn_pos_emb', 'False')
    assert parse_override('schedule=a=b') == ('schedule', 'a=b')
    assert parse_override('init_from=') == ('init_from', '')
    for bad in ('model.learn_pos_emb', '=3'):
        with pytest.raises(ConfigError, match='write field=value'):
            parse_override(bad)


def test_make_config_refuses_an_unknown_reference_field():
    with pytest.raises(ConfigError, match='config.model.emb does not exist'):
        config_lib.make_config('listops', {'model.emb': 3}, {}, None)
