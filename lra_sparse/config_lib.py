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

import importlib.util
import json
import os

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


def parse_arg(arg: str | None) -> dict:
    """'attention=dsa,tiny' -> {'attention': 'dsa', 'tiny': True}; unknown options raise."""
    parsed = {}
    for item in filter(None, (part.strip() for part in (arg or '').split(','))):
        key, sep, value = item.partition('=')
        if (sep and key not in _OPTIONS) or (not sep and key not in _FLAGS):
            raise ValueError(
                f'config option {item!r} is not allowed: use '
                f'{", ".join(o + "=..." for o in _OPTIONS)}'
                f' or the flags {", ".join(_FLAGS)}, comma-separated.')
        parsed[key] = value if sep else True
    return parsed


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
    """``config.attention``: name, impl, apply plus the registered method's own fields."""
    method = attention_lib.get_method(name)
    c = ml_collections.ConfigDict()
    c.name = name  # attention method (registry key)
    c.impl = impl  # how it runs: reference | xla | pallas
    c.apply = apply  # train_and_eval | eval_only (dense while training, the method at evaluation)
    c.update(method.default_config())
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
    _set_all(c, reference)
    if options.get('tiny'):
        _set_all(c, tiny)
    if options.get('synthetic'):
        c.data.source = 'synthetic'
    c.attention = attention_config(options.get('attention', 'dense'),
                                   options.get('impl', 'reference'),
                                   options.get('apply', 'train_and_eval'))
    return c


def _set_all(c: ml_collections.ConfigDict, values: dict) -> None:
    for dotted, value in values.items():
        node = c
        *parents, leaf = dotted.split('.')
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise KeyError(f'unknown config field {dotted!r}')
        node[leaf] = value


TINY_MODEL = {
    'model.emb_dim': 64, 'model.qkv_dim': 64, 'model.mlp_dim': 128, 'model.num_heads': 4,
    'model.num_layers': 2, 'model.dropout_rate': 0.1, 'model.attention_dropout_rate': 0.1,
    'batch_size': 32, 'checkpoint_every_steps': 200, 'log_every_steps': 50,
    'data.synthetic_examples': 512,
}


def load(spec: str) -> ml_collections.ConfigDict:
    """Loads ``'configs/listops.py:attention=dsa,tiny'`` (path, optional ':' and option string)."""
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'config file {path!r} does not exist')
    module_spec = importlib.util.spec_from_file_location(
        f'lra_config_{os.path.splitext(os.path.basename(path))[0]}', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _check(ok: bool, field: str, value, allowed: str) -> None:
    if not ok:
        raise config_error(field, value, allowed)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the field, the value and what is allowed; touches no data.

    Checks the task (registered), attention name/impl/apply, model dims, rates, steps, the
    schedule, the batch split over devices, the data source, then the task's own checks
    (``data.validate_task``: its ``max_length`` bound and fields), ``init_from`` and last the
    attention method's own validator.
    """
    data_lib.get_task(config.task)
    method = attention_lib.get_method(config.attention.name)
    _check(config.attention.impl in method.impls, 'attention.impl', config.attention.impl,
           f'{config.attention.name} supports {", ".join(method.impls)}')
    _check(config.attention.apply in APPLY_MODES, 'attention.apply', config.attention.apply,
           f'one of {", ".join(APPLY_MODES)}')
    m = config.model
    for field in ('emb_dim', 'qkv_dim', 'mlp_dim', 'num_heads', 'num_layers'):
        value = m[field]
        _check(isinstance(value, int) and value > 0, f'model.{field}', value, 'a positive integer')
    divisors = [h for h in range(1, m.qkv_dim + 1) if m.qkv_dim % h == 0]
    _check(m.qkv_dim % m.num_heads == 0, 'model.num_heads', m.num_heads,
           f'a divisor of model.qkv_dim={m.qkv_dim} ({", ".join(map(str, divisors[:12]))}...)')
    for field in ('dropout_rate', 'attention_dropout_rate'):
        _check(0.0 <= m[field] < 1.0, f'model.{field}', m[field], 'a rate in [0, 1)')
    _check(m.pooling in POOLING_MODES, 'model.pooling', m.pooling, ' or '.join(POOLING_MODES))
    _check(m.fully_masked_rows in FULLY_MASKED_ROWS, 'model.fully_masked_rows',
           m.fully_masked_rows, ' or '.join(FULLY_MASKED_ROWS))
    _check(m.dtype in ('float32', 'bfloat16'), 'model.dtype', m.dtype, 'float32 or bfloat16')
    for field in ('max_length', 'batch_size', 'num_train_steps', 'log_every_steps',
                  'eval_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep'):
        _check(isinstance(config[field], int) and config[field] > 0, field, config[field],
               'a positive integer')
    _check(config.num_eval_steps == -1 or config.num_eval_steps > 0, 'num_eval_steps',
           config.num_eval_steps, '-1 (whole split) or a positive integer')
    n_dev = jax.device_count()
    _check(config.batch_size % n_dev == 0, 'batch_size', config.batch_size,
           f'a multiple of the {n_dev} devices')
    n_micro = config.num_microbatches
    _check(isinstance(n_micro, int) and n_micro > 0
           and config.batch_size % (n_micro * n_dev) == 0, 'num_microbatches', n_micro,
           f'a positive integer such that batch_size={config.batch_size} is a multiple of '
           f'num_microbatches * {n_dev} devices')
    factors = [f.strip() for f in config.schedule.split('*')]
    _check(all(f in SCHEDULE_FACTORS for f in factors), 'schedule', config.schedule,
           f'a product of {", ".join(SCHEDULE_FACTORS)}')
    _check(config.learning_rate > 0, 'learning_rate', config.learning_rate, 'a positive number')
    _check(config.weight_decay >= 0, 'weight_decay', config.weight_decay, 'a number >= 0')
    _check(config.warmup_steps >= 0, 'warmup_steps', config.warmup_steps, 'an integer >= 0')
    _check(config.data.source in ('real', 'synthetic'), 'data.source', config.data.source,
           'real or synthetic')
    examples = config.data.synthetic_examples
    _check(isinstance(examples, int) and examples > 0, 'data.synthetic_examples', examples,
           'a positive integer')
    data_lib.validate_task(config)
    if config.init_from:
        _check_init_from(config)
    method.validate(config)


MODEL_SHAPE_FIELDS = ('emb_dim', 'qkv_dim', 'mlp_dim', 'num_heads', 'num_layers', 'pooling',
                      'learn_pos_emb')


def _check_init_from(config: ml_collections.ConfigDict) -> None:
    """The source run of ``init_from`` exists, has checkpoints and the same task and model shape."""
    source = os.path.expanduser(config.init_from)
    saved = os.path.join(source, 'config.json')
    _check(os.path.isfile(saved) and os.path.isdir(os.path.join(source, 'checkpoints')),
           'init_from', config.init_from, 'the workdir of a run with config.json and checkpoints/')
    with open(saved) as f:
        other = json.load(f)
    _check(other.get('task') == config.task and other.get('max_length') == config.max_length,
           'init_from', config.init_from,
           f'a run of task {config.task!r} with max_length {config.max_length} (it has '
           f'{other.get("task")!r}, {other.get("max_length")})')
    for field in MODEL_SHAPE_FIELDS:
        theirs = other.get('model', {}).get(field)
        _check(theirs == config.model[field], 'init_from', config.init_from,
               f'a run with the same model.{field} (it has {theirs!r}, this config '
               f'{config.model[field]!r})')


__all__ = ['ConfigError', 'TASKS', 'base_config', 'load', 'make_config', 'parse_arg', 'validate']
