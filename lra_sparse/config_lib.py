"""Config machinery: shared fields (each commented), options, loading by path, validation.

A task file (``configs/listops.py`` ...) calls :func:`make_config` with its reference LRA
hyperparameters and its ``tiny`` overrides; the task itself (classes, vocabulary, its own
``data.*`` fields and their checks) is declared by ``lra_sparse/data/<task>.py`` and found in
``data.REGISTRY``. ``arg`` is a comma-separated list of options:

  attention=<name>   attention method from the registry (default dense)
  impl=<impl>        reference | xla | pallas (default reference)
  apply=<where>      train_and_eval | eval_only (method used in training and eval, or eval only)
  tiny               CPU-sized variant: short sequences, small model, a few hundred steps
  synthetic          random data with the task's shapes (no download; for smoke tests / throughput)

Any field can still be overridden on the command line, e.g. ``--config.attention.sparsity=0.95``.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import ml_collections
from ml_collections import config_dict

from lra_sparse import attention as attention_lib
from lra_sparse import data as data_lib
from lra_sparse.errors import ConfigError, config_error

TASKS = tuple(data_lib.REGISTRY)  # the registered tasks, in table order
APPLY_MODES = ('train_and_eval', 'eval_only')
POOLING_MODES = ('CLS', 'MEAN', 'MASKED_MEAN')
FULLY_MASKED_ROWS = ('zeros', 'reference')
SCHEDULE_FACTORS = ('constant', 'linear_warmup', 'rsqrt_decay', 'cosine_decay')

_OPTIONS = ('attention', 'impl', 'apply')
_FLAGS = ('tiny', 'synthetic')


def options_help() -> str:
    """The options after ``:`` in ``--config=path:options``, with the registered choices."""
    impls = dict.fromkeys(impl for method in attention_lib.REGISTRY.values()
                          for impl in method.impls)
    return (f'attention={"|".join(attention_lib.REGISTRY)}, impl={"|".join(impls)}, '
            f'apply={"|".join(APPLY_MODES)}, tiny (CPU-sized model and data), synthetic (random '
            'data of the task\'s shapes, no download), comma-separated')


def parse_arg(arg: str | None) -> dict:
    """``'attention=dsa,tiny'`` -> ``{'attention': 'dsa', 'tiny': True}``.

    Raises:
      ConfigError: an option that does not exist, or one given twice (``attention=dsa,
        attention=dense``), naming it and listing the options.
    """
    parsed = {}
    for item in filter(None, (part.strip() for part in (arg or '').split(','))):
        key, sep, value = item.partition('=')
        key = key.strip()
        if (sep and key not in _OPTIONS) or (not sep and key not in _FLAGS):
            raise ConfigError(f'config option {item!r} is not allowed: the options are '
                              f'{options_help()}.')
        if key in parsed:
            raise ConfigError(f'config option {key!r} is given twice ({_option_text(key, parsed)}'
                              f' and {item!r}): give each option once.')
        parsed[key] = value.strip() if sep else True
    return parsed


def _option_text(key: str, parsed: dict) -> str:
    """How option ``key`` was written, e.g. ``'attention=dsa'`` or ``'tiny'``."""
    return repr(key if parsed[key] is True else f'{key}={parsed[key]}')


def base_config() -> ml_collections.ConfigDict:
    """Every field shared by all tasks once, with defaults that task files override.

    A task's own fields (e.g. ``data.listops_*``) come from its declaration; :func:`make_config`
    adds them.
    """
    c = ml_collections.ConfigDict()
    c.task = ''  # a registered task: listops | text | retrieval | image
    c.seed = 0  # seed of parameter init, dropout and data order
    c.data_dir = config_dict.placeholder(str)  # raw data / TFDS data_dir (None: default)
    c.cache_dir = config_dict.placeholder(str)  # None: $XDG_CACHE_HOME/lra_sparse
    c.max_length = 0  # tokens per input sequence (per document for retrieval), before the CLS token

    c.batch_size = 32  # global batch size (split over all devices and hosts)
    c.num_microbatches = 1  # gradient accumulation: sequential parts per batch (same update)
    c.num_train_steps = 0  # optimizer steps
    c.log_every_steps = 50  # steps between train-metric log lines
    c.eval_every_steps = 0  # steps between evaluations on the full validation split
    c.num_eval_steps = -1  # eval batches per evaluation (-1: the whole split)
    c.checkpoint_every_steps = 1000  # steps between checkpoints (the last step is always saved)
    c.max_checkpoints_to_keep = 2  # older checkpoints are deleted
    c.eval_test_every_eval = False  # also evaluate test at every eval (as ref)

    c.learning_rate = 0.05  # base LR of the schedule ('constant' factor)
    c.schedule = 'constant * linear_warmup * rsqrt_decay'  # LRA factors ('cosine_decay' for image)
    c.warmup_steps = 1000  # linear warmup steps
    c.steps_per_cycle = 100000  # cosine decay cycle length (only with cosine_decay)
    c.weight_decay = 0.1  # decoupled AdamW decay scaled by the LR, applied to all parameters
    c.grad_clip_norm = config_dict.placeholder(float)  # global-norm clip (None: no clipping)

    c.init_from = config_dict.placeholder(str)  # workdir of a run to initialise weights from

    c.model = ml_collections.ConfigDict()
    c.model.emb_dim = 512  # model width
    c.model.qkv_dim = 512  # total width of Q/K/V (num_heads * head_dim)
    c.model.mlp_dim = 1024  # feed-forward width (and classifier hidden width)
    c.model.num_heads = 8  # attention heads
    c.model.num_layers = 4  # encoder blocks
    c.model.dropout_rate = 0.1  # dropout on embeddings, residual branches and MLP
    c.model.attention_dropout_rate = 0.1  # dropout on attention probabilities
    c.model.learn_pos_emb = False  # learned N(0, 0.02) positions instead of sinusoidal
    c.model.pooling = 'CLS'  # CLS (learned CLS token) | MEAN (all positions, padding too, as the
    # reference) | MASKED_MEAN (mean over real tokens only)
    c.model.fully_masked_rows = 'zeros'  # attention output of a query with no valid key (a padding
    # token): zeros | reference (sum of V over all positions, what the LRA code's -1e10 bias gives)
    c.model.dtype = 'float32'  # computation dtype: float32 | bfloat16 (params stay float32)

    c.data = ml_collections.ConfigDict()
    c.data.source = 'real'  # real | synthetic (random tokens with the task's shapes)
    c.data.synthetic_examples = 2048  # train examples of the synthetic source (val/test: a quarter)
    return c


def attention_config(name: str, impl: str, apply: str) -> ml_collections.ConfigDict:
    """``config.attention``: name, impl, apply plus the registered method's own fields.

    The method's defaults come first, then those of the chosen implementation (an unknown
    ``impl`` adds none; validation names it).
    """
    method = attention_lib.get_method(name)
    c = ml_collections.ConfigDict()
    c.name = name  # attention method (registry key)
    c.impl = impl  # how it runs: reference | xla | pallas
    c.apply = apply  # train_and_eval | eval_only (dense while training, the method at evaluation)
    c.update(method.default_config())
    if impl in method.impls:
        c.update(method.impls[impl].defaults)
    return c


def make_config(task: str, reference: dict, tiny: dict,
                arg: str | None) -> ml_collections.ConfigDict:
    """Builds a task config: shared fields, the task's own fields, reference values, options.

    Args:
      task: a registered task name (``data.REGISTRY``).
      reference: the reference LRA values for this task, as a flat {'a.b': value} dict.
      tiny: the CPU-sized overrides applied with the ``tiny`` option.
      arg: the comma-separated option string after ``:`` in ``--config=configs/x.py:arg``.

    Returns:
      The ConfigDict (unlocked; the CLI locks it).

    Raises:
      ConfigError: ``task`` is not registered.
    """
    options = parse_arg(arg)
    c = base_config()
    c.task = task
    data_lib.get_task(task).add_fields(c)
    apply_overrides(c, reference)
    if options.get('tiny'):
        apply_overrides(c, tiny)
    if options.get('synthetic'):
        c.data.source = 'synthetic'
    c.attention = attention_config(options.get('attention', 'dense'),
                                   options.get('impl', 'reference'),
                                   options.get('apply', 'train_and_eval'))
    return c


TINY_MODEL = {
    'model.emb_dim': 64, 'model.qkv_dim': 64, 'model.mlp_dim': 128, 'model.num_heads': 4,
    'model.num_layers': 2, 'model.dropout_rate': 0.1, 'model.attention_dropout_rate': 0.1,
    'batch_size': 32, 'checkpoint_every_steps': 200, 'log_every_steps': 50,
    'data.synthetic_examples': 512,
}


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads ``'configs/listops.py:attention=dsa,tiny'`` (path, optional ':' and option string).

    Raises:
      ConfigError: the file does not exist, has a syntax error or no ``get_config``, or an option
        is not allowed; one line naming the file (and line) or the option.
    """
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path!r} does not exist: give the path of a task '
                          'config, e.g. configs/listops.py.')
    module_spec = importlib.util.spec_from_file_location(
        f'lra_config_{os.path.splitext(os.path.basename(path))[0]}', path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as error:
        raise ConfigError(f'config file {path!r} has a syntax error at line {error.lineno}: '
                          f'{error.msg}.') from None
    if not callable(getattr(module, 'get_config', None)):
        raise ConfigError(f'config file {path!r} defines no get_config(arg): give the path of '
                          'a task config, e.g. configs/listops.py.')
    return module.get_config(arg) if arg else module.get_config()


# ---------------------------------------------------------------------------------------------
# Dotted-key overrides: the one way every caller (configs, sweeps, tests, notebooks) sets fields
# ---------------------------------------------------------------------------------------------

_TRUE, _FALSE = ('True', 'true', '1'), ('False', 'false', '0')


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Iterable[tuple[str, Any]]
                    ) -> ml_collections.ConfigDict:
    """Sets every ``{'model.num_layers': 1, ...}`` item with :func:`set_field`; returns ``config``.

    Args:
      config: the ConfigDict to change in place.
      overrides: dotted field names to values, as a mapping or (name, value) pairs, applied in
        order.
    """
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    for dotted, value in items:
        set_field(config, dotted, value)
    return config


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
    """``config.<dotted> = value``, parsing strings by the field's type.

    A string is parsed as the field's type: bool from True/False/true/false/1/0; int and float as
    numbers (an int field refuses '0.5'); tuples from comma-separated values or a Python literal,
    elements by the type of the current elements; 'None' clears a field whose default is None
    (an ``ml_collections`` placeholder parses by its declared type). Any other value is set as
    given, with the type checks of ``ml_collections`` (an int is accepted by a float field).

    Args:
      config: the ConfigDict to change in place.
      dotted: field name below ``config``, e.g. ``'attention.sparsity'``.
      value: the new value, or its text.

    Raises:
      ConfigError: one line naming the field, the value and what is allowed; for an unknown field,
        the closest field names.
    """
    node, leaf = _parent_of(config, dotted)
    if isinstance(value, str):
        value = _parse_text(node, leaf, dotted, value)
    try:
        node[leaf] = value
    except TypeError:
        raise config_error(dotted, value,
                           f'a value of type {node.get_type(leaf).__name__}') from None


def field_type(config: ml_collections.ConfigDict, dotted: str) -> type:
    """The declared type of field ``dotted`` (unknown names raise ConfigError, as in set_field)."""
    node, leaf = _parent_of(config, dotted)
    return node.get_type(leaf)


def parse_override(text: str) -> tuple[str, str]:
    """``'model.learn_pos_emb=False'`` -> ``('model.learn_pos_emb', 'False')`` (text not parsed)."""
    dotted, sep, value = text.partition('=')
    if not sep or not dotted.strip():
        raise ConfigError(f'override {text!r} is not allowed: write field=value, e.g. '
                          'model.num_layers=2.')
    return dotted.strip(), value


def _parent_of(config: ml_collections.ConfigDict,
               dotted: str) -> tuple[ml_collections.ConfigDict, str]:
    """The ConfigDict holding field ``dotted`` and the field's own name; unknown names raise."""
    node = config
    *parents, leaf = dotted.split('.')
    for name in parents:
        if not (isinstance(node, ml_collections.ConfigDict) and name in node):
            raise _unknown_field(config, dotted)
        node = node[name]
    if not (isinstance(node, ml_collections.ConfigDict) and leaf in node):
        raise _unknown_field(config, dotted)
    return node, leaf


def _field_names(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
    """Every dotted field name of ``config`` (groups and leaves)."""
    names = []
    for key, value in config.items():
        names.append(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(_field_names(value, f'{prefix}{key}.'))
    return names


def _unknown_field(config: ml_collections.ConfigDict, dotted: str) -> ConfigError:
    """ConfigError for a field that does not exist, listing the closest existing names."""
    names = _field_names(config)
    close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.6)
    if not close:  # the last part misspelled or given without its group: match leaf names
        leaf = dotted.rsplit('.', 1)[-1]
        leaves = difflib.get_close_matches(leaf, [n.rsplit('.', 1)[-1] for n in names], n=3)
        close = [n for n in names if n.rsplit('.', 1)[-1] in leaves][:3]
    if close:
        hint = 'did you mean ' + (f'{", ".join(close[:-1])} or ' if close[1:] else '') + close[-1]
        return ConfigError(f'config.{dotted} does not exist: {hint}?')
    top = ', '.join(n for n in names if '.' not in n)
    return ConfigError(f'config.{dotted} does not exist: the fields are {top}.')


def _parse_text(node: ml_collections.ConfigDict, leaf: str, dotted: str, text: str) -> Any:
    """The value of field ``leaf`` of ``node`` that ``text`` stands for."""
    field_type, current = node.get_type(leaf), node[leaf]
    nullable = current is None or isinstance(
        node.to_dict(preserve_field_references=True)[leaf], config_dict.FieldReference)
    if nullable and text.strip() == 'None':
        return None
    if isinstance(current, ml_collections.ConfigDict):
        raise config_error(dotted, text, f'one value per field: config.{dotted}.<field>=...')
    if field_type in (tuple, list):
        return field_type(_parse_sequence(dotted, text, current))
    if field_type is type(None):  # a None default without a declared type: a Python literal
        return _literal_or_text(text)
    return _parse_scalar(dotted, text.strip() if field_type is not str else text, field_type)


def _parse_scalar(dotted: str, text: str, field_type: type) -> Any:
    """``text`` as a bool, int, float or str field value; anything unparsable raises."""
    if field_type is bool:
        if text in _TRUE + _FALSE:
            return text in _TRUE
        raise config_error(dotted, text, f'one of {", ".join(_TRUE + _FALSE)}')
    if field_type in (int, float):
        try:
            return field_type(text)
        except ValueError:
            kind = 'an integer' if field_type is int else 'a number'
            raise config_error(dotted, text, kind) from None
    if field_type is str:
        return text
    raise config_error(dotted, text, f'a {field_type.__name__}, which cannot be given as text')


def _parse_sequence(dotted: str, text: str, current) -> list:
    """Elements of a tuple field from ``'1,2'`` or ``'(1, 2)'``, each of the current elements' type.

    An empty current value gives no element type: each element is read as a Python literal.
    """
    types = {type(x) for x in current or ()}
    element_type = types.pop() if len(types) == 1 else None
    stripped = text.strip()
    if stripped[:1] in ('(', '['):
        parsed = _literal_or_text(stripped)
        if not isinstance(parsed, (tuple, list)):
            raise config_error(dotted, text, 'comma-separated values or a tuple literal')
        if element_type is None:
            return list(parsed)
        parts = [str(x) for x in parsed]
    else:
        parts = [part.strip() for part in stripped.split(',') if part.strip()]
        if element_type is None:
            return [_literal_or_text(part) for part in parts]
    return [_parse_scalar(dotted, part, element_type) for part in parts]


def _literal_or_text(text: str) -> Any:
    """A Python literal (number, tuple, ...) if ``text`` is one, else ``text`` itself."""
    try:
        return ast.literal_eval(text)
    except (SyntaxError, ValueError):
        return text


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise config_error(field, value, allowed)


def _is_int(value) -> bool:
    """An int that is not a bool (``True`` is an ``int`` to Python)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field, the value and what is allowed; touches no data.

    Checks every shared field: the task (registered), attention name/impl/apply, the model, the
    step counts and the batch split over devices, the optimizer and its schedule, the data source;
    then the task's own checks (``data.validate_task``: its ``max_length`` bound and fields),
    ``init_from`` and last the attention method's own validator.
    """
    data_lib.get_task(config.task)
    method = attention_lib.get_method(config.attention.name)
    _check(config.attention.impl in method.impls, 'attention.impl', config.attention.impl,
           f'{config.attention.name} supports {", ".join(method.impls)}')
    _check(config.attention.apply in APPLY_MODES, 'attention.apply', config.attention.apply,
           f'one of {", ".join(APPLY_MODES)}')
    _check(_is_int(config.seed), 'seed', config.seed, 'an integer')
    _validate_model(config.model)
    _validate_steps(config)
    _validate_optimizer(config)
    _check(config.data.source in ('real', 'synthetic'), 'data.source', config.data.source,
           'real or synthetic')
    examples = config.data.synthetic_examples
    _check(_is_int(examples) and examples > 0, 'data.synthetic_examples', examples,
           'a positive integer')
    if config.cache_dir:
        problem = directory_problem(config.cache_dir)
        _check(problem is None, 'cache_dir', config.cache_dir,
               f'a directory you can write to (it {problem})')
    data_lib.validate_task(config)
    if config.init_from:
        _check_init_from(config)
    method.validate(config)


def _validate_model(m: ml_collections.ConfigDict) -> None:
    """``config.model``: positive dims, heads dividing qkv_dim, rates, pooling, dtype, booleans."""
    for field in ('emb_dim', 'qkv_dim', 'mlp_dim', 'num_heads', 'num_layers'):
        value = m[field]
        _check(_is_int(value) and value > 0, f'model.{field}', value, 'a positive integer')
    divisors = [h for h in range(1, m.qkv_dim + 1) if m.qkv_dim % h == 0]
    _check(m.qkv_dim % m.num_heads == 0, 'model.num_heads', m.num_heads,
           f'a divisor of model.qkv_dim={m.qkv_dim} ({", ".join(map(str, divisors[:12]))}...)')
    for field in ('dropout_rate', 'attention_dropout_rate'):
        _check(_is_number(m[field]) and 0.0 <= m[field] < 1.0, f'model.{field}', m[field],
               'a rate in [0, 1)')
    _check(isinstance(m.learn_pos_emb, bool), 'model.learn_pos_emb', m.learn_pos_emb,
           'True or False')
    _check(m.pooling in POOLING_MODES, 'model.pooling', m.pooling, ' or '.join(POOLING_MODES))
    _check(m.fully_masked_rows in FULLY_MASKED_ROWS, 'model.fully_masked_rows',
           m.fully_masked_rows, ' or '.join(FULLY_MASKED_ROWS))
    _check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', m.dtype, 'float32 or bfloat16')


def _validate_steps(config: ml_collections.ConfigDict) -> None:
    """Length, batch, step counts, frequencies; the batch split over devices and microbatches."""
    for field in ('max_length', 'batch_size', 'num_train_steps', 'log_every_steps',
                  'eval_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep'):
        _check(_is_int(config[field]) and config[field] > 0, field, config[field],
               'a positive integer')
    _check(_is_int(config.num_eval_steps) and (config.num_eval_steps == -1
                                               or config.num_eval_steps > 0),
           'num_eval_steps', config.num_eval_steps, '-1 (whole split) or a positive integer')
    _check(isinstance(config.eval_test_every_eval, bool), 'eval_test_every_eval',
           config.eval_test_every_eval, 'True or False')
    n_dev = jax.device_count()
    _check(config.batch_size % n_dev == 0, 'batch_size', config.batch_size,
           f'a multiple of the {n_dev} devices')
    n_micro = config.num_microbatches
    _check(_is_int(n_micro) and n_micro > 0
           and config.batch_size % (n_micro * n_dev) == 0, 'num_microbatches', n_micro,
           f'a positive integer such that batch_size={config.batch_size} is a multiple of '
           f'num_microbatches * {n_dev} devices')


def _validate_optimizer(config: ml_collections.ConfigDict) -> None:
    """Learning rate, schedule factors and their step counts, weight decay, gradient clipping."""
    _check(_is_number(config.learning_rate) and config.learning_rate > 0, 'learning_rate',
           config.learning_rate, 'a finite number > 0')
    factors = [f.strip() for f in config.schedule.split('*')]
    _check(all(f in SCHEDULE_FACTORS for f in factors), 'schedule', config.schedule,
           f'a product of {", ".join(SCHEDULE_FACTORS)}')
    _check(_is_int(config.warmup_steps) and config.warmup_steps >= 0, 'warmup_steps',
           config.warmup_steps, 'an integer >= 0')
    _check('rsqrt_decay' not in factors or config.warmup_steps > 0, 'warmup_steps',
           config.warmup_steps, 'an integer > 0 with rsqrt_decay in the schedule (its factor '
           '1/sqrt(max(step, warmup_steps)) is infinite at step 0)')
    _check('cosine_decay' not in factors
           or (_is_int(config.steps_per_cycle) and config.steps_per_cycle > 0),
           'steps_per_cycle', config.steps_per_cycle,
           'a positive integer with cosine_decay in the schedule')
    _check(_is_number(config.weight_decay) and config.weight_decay >= 0, 'weight_decay',
           config.weight_decay, 'a finite number >= 0')
    clip = config.grad_clip_norm
    _check(clip is None or (_is_number(clip) and clip > 0), 'grad_clip_norm', clip,
           'a finite number > 0, or None (None disables clipping)')


def directory_problem(path: str) -> str | None:
    """Why ``path`` cannot be written to as a directory; None if it can (or can be created).

    Returns:
      e.g. ``'is a file'``, ``"is inside the file 'runs'"``, ``'is not writable'`` or
      ``"cannot be created in the unwritable 'runs'"``.
    """
    target = os.path.abspath(os.path.expanduser(path))
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return 'is a file' if existing == target else f'is inside the file {existing!r}'
    if not os.access(existing, os.W_OK | os.X_OK):
        return ('is not writable' if existing == target
                else f'cannot be created in the unwritable {existing!r}')
    return None


MODEL_SHAPE_FIELDS = ('emb_dim', 'qkv_dim', 'mlp_dim', 'num_heads', 'num_layers', 'pooling',
                      'learn_pos_emb')


def _check_init_from(config: ml_collections.ConfigDict) -> None:
    """The source run of ``init_from`` exists, has checkpoints and the same task and model shape."""
    source = os.path.expanduser(config.init_from)
    saved = os.path.join(source, 'config.json')
    _check(os.path.isfile(saved) and os.path.isdir(os.path.join(source, 'checkpoints')),
           'init_from', config.init_from, 'the workdir of a run with config.json and checkpoints/')
    try:
        with open(saved) as f:
            other = json.load(f)
    except (OSError, ValueError) as error:
        raise config_error('init_from', config.init_from,
                           f'a run whose {saved} is readable JSON ({error})') from None
    _check(isinstance(other, dict), 'init_from', config.init_from,
           f'a run whose {saved} holds a config (a JSON object)')
    _check(other.get('task') == config.task and other.get('max_length') == config.max_length,
           'init_from', config.init_from,
           f'a run of task {config.task!r} with max_length {config.max_length} (it has '
           f'{other.get("task")!r}, {other.get("max_length")})')
    for field in MODEL_SHAPE_FIELDS:
        theirs = other.get('model', {}).get(field)
        _check(theirs == config.model[field], 'init_from', config.init_from,
               f'a run with the same model.{field} (it has {theirs!r}, this config '
               f'{config.model[field]!r})')


__all__ = ['ConfigError', 'TASKS', 'apply_overrides', 'base_config', 'directory_problem',
           'field_type', 'load', 'make_config', 'options_help', 'parse_arg', 'parse_override',
           'set_field', 'validate']
