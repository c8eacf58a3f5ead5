"""Model-level benchmark: attention methods against dense in interleaved rounds (no data needed).

  python -m lra_sparse.bench --config=configs/text.py:impl=xla \
      --config.model.attention_dropout_rate=0 --variants='dsa:sparsity=0.9;dfss;cta' \
      --lengths=1000,2000 [--batch_size=4] [--rounds=5] [--modes=eval,train] [--out=bench_text]

``--config=path:options`` and ``--config.<field>=value`` are those of ``lra_sparse.main``; the
config's ``impl`` option and overrides apply to every variant. ``--variants`` is a
``;``-separated list; each item is a preset name (``--variants=methods`` or one of
:data:`PRESETS`) or ``method[:field=value,...]``: a field without a dot is a field of
``config.attention`` (``dsa:sparsity=0.9,granularity=block``), a dotted one is any config field
(``dfss:pattern=1:2,model.dtype=bfloat16``). The reference ``--reference`` (default ``dense``) is
always measured first and is the denominator of every ratio.

For every length (``config.max_length``; the CLS token is added by the model as in training) the
variants' models are built through the training path (``train.setup_run``: the real jitted
train and evaluation steps, every method and implementation as in training), on one batch of
random tokens that fill the whole length (every token valid). Each step is compiled ahead of time
(the compile time is reported apart, with XLA's memory analysis of the compiled step), run
``--warmup`` times, then timed in ``--rounds`` interleaved rounds: in each round every variant
(reference first) runs ``--calls`` calls, each waited for (``block_until_ready``), so CPU and
GPU are timed alike. Each mode is its own phase: the evaluation forwards of every variant are
built and timed, freed, then the train steps. On a CPU, timing both modes in one set of rounds
slowed the evaluation calls of the sparse paths relative to dense's (DSA block 0.50× → 0.61-0.71×
at L=2000, the same code): the state the train steps leave in the process, not the method.
Reported per variant: the median seconds per call over the rounds and the ratio to the
reference, the median of the per-round ratios (each round's variant time over the same round's
reference time), so a machine that is slower in one round slows both sides of that round's
ratio. Only ratios are meaningful on a shared machine. The statistics of the evaluation step
(``sparsity``, and ``kept_fraction``, ``attention_cost``, ``model_cost`` where the methods report
them) are recorded beside.

Outputs: progress lines on stderr, the markdown table on stdout, and with ``--out=PREFIX``
``PREFIX.json`` (every round's times) and ``PREFIX.md``. ``--profile=DIR`` then traces one more
call of every variant and mode with ``jax.profiler`` (``DIR/<L>-<variant>-<mode>/``, for
TensorBoard or Perfetto) and lists the most expensive compiled operations of each in
``DIR/profile.md`` and the JSON rows: where a variant's time goes, operation by operation.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import flags

from lra_sparse import attention as attention_lib
from lra_sparse import cli, config_lib, data, train

# Named variants (``--variants=<name>``); ``methods`` is all of them. DSA's presets time the
# forward without its evaluation-only diagnostic (``prediction_accuracy``, a top-k over sampled
# rows of true scores); ``dsa-block90-accuracy`` times it with the diagnostic, as evaluation runs.
PRESETS = {
    'dsa-block90': 'dsa:sparsity=0.9,granularity=block,block_q=64,block_k=64,accuracy_stat=off',
    'dsa-block90-accuracy': 'dsa:sparsity=0.9,granularity=block,block_q=64,block_k=64',
    'dsa-element90': 'dsa:sparsity=0.9,granularity=element,accuracy_stat=off',
    'dsa-vector90': 'dsa:sparsity=0.9,granularity=vector,accuracy_stat=off',
    'spatten-keep25': 'spatten:token_keep_final=0.25',
    'spatten-keep25-speed': 'spatten:token_keep_final=0.25,value_pruning=per_head',
    'dfss': 'dfss',
    'cta': 'cta',
    'cta-w32': ('cta:query_bucket_width=32,key_bucket_width=32,residual_bucket_width=16,'
                'query_capacity=0.15,key_capacity=0.15,residual_capacity=0.5'),
    'cta-w64': ('cta:query_bucket_width=64,key_bucket_width=64,residual_bucket_width=32,'
                'query_capacity=0.05,key_capacity=0.05,residual_capacity=0.2'),
}
GROUPS = {'methods': tuple(PRESETS)}
MODES = ('eval', 'train')
# Evaluation statistics recorded beside the times (aggregate over layers, when reported).
STAT_KEYS = ('kept_fraction', 'sparsity', 'attention_cost', 'model_cost')

_FIELD_START = re.compile(r',(?=\s*[A-Za-z_][\w.]*\s*=)')


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration to time.

    Attributes:
      label: how tables name it (the preset name or the text given).
      method: the attention method (registry name).
      overrides: dotted ``(field, text)`` pairs applied after the config's own overrides.
    """

    label: str
    method: str
    overrides: tuple[tuple[str, str], ...] = ()


class BenchError(cli.UsageError):
    """A benchmark flag that cannot be used (unknown variant syntax, bad lengths)."""


def parse_variant(text: str, label: str | None = None) -> Variant:
    """``'dsa:sparsity=0.9,granularity=block'`` -> Variant (fields are not yet checked).

    A value may hold commas or colons (``pattern=1:2``, ``token_keep_ratios=1,0.5``): a comma
    starts a new field only when ``name=`` follows it.
    """
    text = text.strip()
    method, _, fields = text.partition(':')
    method = method.strip()
    if method not in attention_lib.REGISTRY:
        raise BenchError(f'variant {text!r}: {method!r} is not an attention method or preset: '
                         f'give one of {", ".join(attention_lib.REGISTRY)} or a preset '
                         f'({", ".join([*GROUPS, *PRESETS])})')
    overrides = []
    for item in filter(None, (part.strip() for part in _FIELD_START.split(fields))):
        dotted, sep, value = item.partition('=')
        if not sep or not dotted.strip():
            raise BenchError(f'variant {text!r}: {item!r} is not field=value, e.g. '
                             'dsa:sparsity=0.9,granularity=block')
        dotted = dotted.strip()
        overrides.append((dotted if '.' in dotted else f'attention.{dotted}', value.strip()))
    return Variant(label or text, method, tuple(overrides))


def parse_variants(text: str) -> list[Variant]:
    """The ``;``-separated ``--variants`` text (presets expanded) as Variants, in order."""
    variants = []
    for item in filter(None, (part.strip() for part in text.split(';'))):
        for name in GROUPS.get(item, (item,)):
            variants.append(parse_variant(PRESETS[name], name) if name in PRESETS
                            else parse_variant(name))
    labels = [v.label for v in variants]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise BenchError(f'--variants names {twice[0]!r} twice: give each variant once')
    return variants


def variant_config(spec: str, common: Sequence[tuple[str, str]], variant: Variant,
                   length: int | None, batch_size: int) -> ml_collections.ConfigDict:
    """The validated config of ``variant`` at ``length`` (None: the config's own).

    Args:
      spec: ``path[:options]`` of ``--config``; its ``attention`` option is replaced.
      common: the ``--config.<field>`` overrides, applied first.
      variant: the method and its overrides.
      length: ``config.max_length``.
      batch_size: ``config.batch_size``.
    """
    path, _, arg = spec.partition(':')
    options = config_lib.parse_arg(arg)
    options['attention'] = variant.method
    overrides = []
    for dotted, value in variant.overrides:  # impl and apply pick the implementation's defaults
        if dotted in ('attention.impl', 'attention.apply'):
            options[dotted.removeprefix('attention.')] = value
        else:
            overrides.append((dotted, value))
    arg = ','.join(k if v is True else f'{k}={v}' for k, v in options.items())
    config = config_lib.load(f'{path}:{arg}')
    config_lib.apply_overrides(config, [*common, *overrides])
    if length is not None:
        config_lib.set_field(config, 'max_length', length)
    config_lib.set_field(config, 'batch_size', batch_size)
    config_lib.validate(config)
    return config


def random_batch(info, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens filling the whole length (every token valid) and random targets.

    Returns:
      {input key: int32 [batch_size, seq_len] in [1, vocab), 'targets': int32 [batch_size],
      'weights': float32 [batch_size] ones}.
    """
    rng = np.random.default_rng(seed)
    batch = {key: rng.integers(1, info.vocab_size, (batch_size, info.seq_len), dtype=np.int32)
             for key in info.input_keys}
    batch['targets'] = rng.integers(0, info.num_classes, batch_size).astype(np.int32)
    batch['weights'] = np.ones(batch_size, np.float32)
    return batch


@dataclasses.dataclass
class Prepared:
    """One variant at one length, compiled and ready to time.

    Attributes:
      calls: mode -> a function running one call and returning what to wait for.
      row: the JSON row being filled (description, compile times, memory, statistics).
      times: mode -> seconds per call, one per round.
      compiled: mode -> the compiled step (its HLO names the profiled operations).
    """

    calls: dict[str, Callable[[], object]]
    row: dict
    times: dict[str, list[float]]
    compiled: dict = dataclasses.field(default_factory=dict)


def memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled step in bytes (None where the backend has none)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if analysis is None:
        return None
    parts = {'argument_bytes': int(analysis.argument_size_in_bytes),
             'output_bytes': int(analysis.output_size_in_bytes),
             'temp_bytes': int(analysis.temp_size_in_bytes)}
    return {**parts, 'total_bytes': sum(parts.values())}


def prepare(config: ml_collections.ConfigDict, variant: Variant, modes: Sequence[str],
            warmup: int) -> Prepared:
    """Builds the run of ``config``, compiles its steps ahead of time and warms them up."""
    info = data.task_info(config)
    run, state = train.setup_run(config, info)
    holder = {'state': run.place(state)}
    batch = run.shard(random_batch(info, config.batch_size, config.seed))
    row = {'variant': variant.label, 'method': config.attention.name,
           'impl': attention_lib.implementation_used(config.attention),
           'overrides': dict(variant.overrides), 'dtype': config.model.dtype,
           'length': info.seq_len, 'batch_size': config.batch_size, 'num_params': run.num_params,
           'compile_seconds': {}, 'memory': {}}
    calls, compiled = {}, {}
    if 'eval' in modes:
        t0 = time.perf_counter()
        compiled_eval = run.eval_step.lower(holder['state'].params, holder['state'].rest,
                                            batch).compile()
        row['compile_seconds']['eval'] = time.perf_counter() - t0
        row['memory']['eval'] = memory(compiled_eval)
        compiled['eval'] = compiled_eval
        calls['eval'] = lambda: compiled_eval(holder['state'].params, holder['state'].rest, batch)
        metrics = jax.device_get(calls['eval']())
        row['stats'] = {k: float(metrics[k]) for k in STAT_KEYS if k in metrics}
    if 'train' in modes:
        t0 = time.perf_counter()
        compiled_train = run.train_step.lower(holder['state'], batch).compile()
        row['compile_seconds']['train'] = time.perf_counter() - t0
        row['memory']['train'] = memory(compiled_train)
        compiled['train'] = compiled_train

        def train_call():
            holder['state'], metrics = compiled_train(holder['state'], batch)  # donates state
            return metrics
        calls['train'] = train_call
    for call in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(call())
    return Prepared(calls, row, {mode: [] for mode in calls}, compiled)


def time_call(call: Callable[[], object], count: int) -> float:
    """Seconds per call of ``count`` calls, each waited for."""
    total = 0.0
    for _ in range(count):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        total += time.perf_counter() - t0
    return total / count


def run_rounds(prepared: Sequence[Prepared], rounds: int, calls: int,
               progress: Callable[[str], None]) -> None:
    """Interleaved rounds: each round times every variant in order (the reference first)."""
    for r in range(rounds):
        for item in prepared:
            for mode, call in item.calls.items():
                item.times[mode].append(time_call(call, calls))
        line = ', '.join(f'{p.row["variant"]} '
                         + '/'.join(f'{m} {1e3 * t[-1]:.1f}' for m, t in p.times.items())
                         for p in prepared)
        progress(f'  round {r + 1}/{rounds} (ms per call): {line}')


def summarize(prepared: Sequence[Prepared]) -> list[dict]:
    """Rows with per-round times, medians and ratios to the first (the reference)."""
    reference = prepared[0]
    rows = []
    for item in prepared:
        row = dict(item.row)
        for mode, times in item.times.items():
            ratios = [t / ref for t, ref in zip(times, reference.times[mode])]
            row[f'{mode}_seconds_rounds'] = times
            row[f'{mode}_median_seconds'] = statistics.median(times)
            row[f'{mode}_ratio_rounds'] = ratios
            row[f'{mode}_ratio'] = statistics.median(ratios)
        rows.append(row)
    return rows


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\([^)]*\)|\S+) '
                          r'(?P<opcode>[\w\-]+)\((?P<rest>.*)$', re.M)
# Operations worth naming inside a fusion, most telling first.
_TELLING = ('dot', 'convolution', 'custom-call', 'sort', 'scatter', 'gather', 'reduce-window',
            'reduce', 'exponential', 'tanh', 'select', 'compare', 'transpose', 'broadcast')


def hlo_operations(hlo_text: str) -> dict[str, dict]:
    """What each instruction of a compiled module computes, for naming profiled operations.

    Args:
      hlo_text: ``compiled.as_text()``.

    Returns:
      {instruction name: {'shape', 'kind' (the opcode, or for a fusion the telling operations
      it fuses, e.g. 'fusion: dot' or 'fusion: reduce, exponential'), 'jax' (the jax operation
      it came from, when XLA recorded one)}}.
    """
    bodies = dict(re.findall(r'^%?([\w.\-]+) [^\n]*\{\n(.*?)^\}', hlo_text, re.M | re.S))
    operations = {}
    for m in _INSTRUCTION.finditer(hlo_text):
        kind = m['opcode']
        called = re.search(r'calls=%([\w.\-]+)', m['rest'])
        if kind == 'fusion' and called and called[1] in bodies:
            inside = set(re.findall(r'= (?:\([^)]*\)|\S+) ([\w\-]+)\(', bodies[called[1]]))
            names = [op for op in _TELLING if op in inside][:2]
            kind = 'fusion: ' + (', '.join(names) if names else 'elementwise')
        elif kind == 'custom-call':
            target = re.search(r'custom_call_target="([^"]+)"', m['rest'])
            kind = f'custom-call {target[1]}' if target else kind
        op_name = re.search(r'op_name="([^"]*)"', m['rest'])
        jax_op = op_name[1].split('/', 1)[-1] if op_name else ''
        operations[m['name']] = {'shape': m['shape'], 'kind': kind, 'jax': jax_op}
    return operations


def trace_events(trace_dir: str) -> list[dict]:
    """The complete events ('ph' == 'X') of the trace ``jax.profiler.trace`` wrote there."""
    paths = sorted(glob.glob(os.path.join(trace_dir, 'plugins', 'profile', '*', '*.json.gz')))
    if not paths:
        raise BenchError(f'no trace under {trace_dir!r}: jax.profiler wrote no Chrome trace '
                         '(*.json.gz) there')
    with gzip.open(paths[-1], 'rt') as f:
        return [e for e in json.load(f).get('traceEvents', []) if e.get('ph') == 'X']


def operation_times(events: Sequence[dict], operations: dict[str, dict],
                    top: int) -> list[dict]:
    """Time per compiled operation, the largest first.

    Args:
      events: trace events (an operation's events carry its name, or it in ``args['hlo_op']``).
      operations: :func:`hlo_operations` of the step.
      top: how many to return.

    Returns:
      [{'op', 'ms' (summed over the call's events), 'share' (of all the step's operation time;
      operations on different threads overlap, so shares can add to more than the wall time),
      'shape', 'kind', 'jax'}].
    """
    totals: dict[str, float] = {}
    for event in events:
        name = event.get('args', {}).get('hlo_op', event.get('name'))
        if name in operations:
            totals[name] = totals.get(name, 0.0) + float(event.get('dur', 0.0)) / 1e3
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return [{'op': name, 'ms': ms, 'share': ms / whole, **operations[name]} for name, ms in ranked]


def profile(prepared: Sequence[Prepared], directory: str, top: int = 20,
            progress: Callable[[str], None] = lambda line: None) -> None:
    """Traces one call of every variant and mode and records its most expensive operations.

    Writes ``directory/<L>-<variant>-<mode>/`` (a ``jax.profiler`` trace: TensorBoard's profile
    plugin or https://ui.perfetto.dev open it) and adds ``row['profile'][mode]`` (see
    :func:`operation_times`).
    """
    for item in prepared:
        label = re.sub(r'[^\w.=-]+', '_', item.row['variant'])
        for mode, call in item.calls.items():
            trace_dir = os.path.join(directory, f'{item.row["length"]}-{label}-{mode}')
            with jax.profiler.trace(trace_dir):
                jax.block_until_ready(call())
            operations = hlo_operations(item.compiled[mode].as_text())
            item.row.setdefault('profile', {})[mode] = operation_times(
                trace_events(trace_dir), operations, top)
            progress(f'  profiled {item.row["variant"]} {mode}: {trace_dir}')


def profile_markdown(result: dict) -> str:
    """The profiled operations of every row as markdown, one table per variant and mode."""
    lines = []
    for row in result['rows']:
        for mode, ops in row.get('profile', {}).items():
            lines += [f'### L={row["length"]} {row["variant"]} ({mode})', '',
                      '| ms | share | operation | what | shape | jax |', '|---' * 6 + '|']
            lines += [f'| {op["ms"]:.2f} | {op["share"]:.1%} | {op["op"]} | {op["kind"]} | '
                      f'`{op["shape"]}` | {op["jax"]} |' for op in ops]
            lines.append('')
    return '\n'.join(lines)


def _merge_mode(row: dict, mode_row: dict, mode: str) -> None:
    """Adds what ``mode_row`` measured of ``mode`` to ``row`` (the same variant and length)."""
    if row is mode_row:
        return
    row.update({k: v for k, v in mode_row.items() if k.startswith(f'{mode}_')})
    for key in ('compile_seconds', 'memory', 'profile'):
        if mode in mode_row.get(key, {}):
            row.setdefault(key, {})[mode] = mode_row[key][mode]
    row.setdefault('stats', mode_row.get('stats', {}))


def benchmark(spec: str, common: Sequence[tuple[str, str]], variants: Sequence[Variant],
              lengths: Sequence[int | None], *, batch_size: int = 4, rounds: int = 5,
              calls: int = 1, warmup: int = 1, modes: Sequence[str] = MODES,
              profile_dir: str | None = None, profile_top: int = 20,
              progress: Callable[[str], None] = lambda line: None) -> dict:
    """Measures every variant at every length against the first one (the reference).

    Every config is built and validated before any compute.

    Args:
      spec: ``path[:options]`` of the task config.
      common: ``(field, text)`` overrides of every variant.
      variants: the reference first, then the methods.
      lengths: values of ``config.max_length`` (None: the config's own).
      batch_size, rounds, calls, warmup, modes: see the flags.
      profile_dir: after the rounds, trace one more call of every variant and mode there and
        record its ``profile_top`` most expensive operations (:func:`profile`).
      progress: called with one line per step of the work.

    Returns:
      {'environment', 'settings', 'rows'}: a row per (length, variant) in that order, see
      :func:`prepare` and :func:`summarize`.
    """
    configs = {(length, v.label): variant_config(spec, common, v, length, batch_size)
               for length in lengths for v in variants}
    rows = []
    for length in lengths:
        merged: dict[str, dict] = {}
        for mode in modes:  # one phase per mode: its models alone in memory
            prepared = []
            for v in variants:
                config = configs[(length, v.label)]
                progress(f'L={config.max_length} {v.label}: compiling {mode}')
                prepared.append(prepare(config, v, (mode,), warmup))
                progress(f'L={config.max_length} {v.label}: compiled {mode} in '
                         f'{prepared[-1].row["compile_seconds"][mode]:.1f} s')
            run_rounds(prepared, rounds, calls, progress)
            if profile_dir:
                profile(prepared, profile_dir, profile_top, progress)
            for row in summarize(prepared):
                _merge_mode(merged.setdefault(row['variant'], row), row, mode)
            del prepared
        rows.extend(merged.values())
    settings = {'config': spec, 'overrides': [list(o) for o in common],
                'variants': [dataclasses.asdict(v) for v in variants], 'batch_size': batch_size,
                'rounds': rounds, 'calls_per_round': calls, 'warmup': warmup,
                'modes': list(modes), 'profile_dir': profile_dir}
    return {'environment': train.environment(), 'settings': settings, 'rows': rows}


def markdown(result: dict) -> str:
    """The result as a markdown table with its hardware, versions, date and settings."""
    env, settings = result['environment'], result['settings']
    modes = settings['modes']
    stats = [k for k in STAT_KEYS if any(k in row.get('stats', {}) for row in result['rows'])]
    head = ['L', 'variant', 'impl']
    for mode in modes:
        name = 'infer' if mode == 'eval' else 'train'
        head += [f'{name} ms', f'{name} × ref']
    head += ['compile s', *(f'{m} MiB' for m in modes), *stats]
    lines = [f'{env["device"]} ×{env["num_devices"]}, jax {env["jax_version"]}, {env["date"]}; '
             f'config {settings["config"]}'
             + ''.join(f' --config.{k}={v}' for k, v in settings['overrides'])
             + f'; batch {settings["batch_size"]}; median of {settings["rounds"]} interleaved '
             f'rounds × {settings["calls_per_round"]} call(s); "× ref" = median of the per-round '
             f'ratios to {result["rows"][0]["variant"]}.', '',
             '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for row in result['rows']:
        cells = [str(row['length']), row['variant'], row['impl']]
        for mode in modes:
            cells += [f'{1e3 * row[f"{mode}_median_seconds"]:.1f}', f'{row[f"{mode}_ratio"]:.2f}']
        cells.append(' / '.join(f'{row["compile_seconds"][m]:.1f}' for m in modes))
        for mode in modes:
            mem = row['memory'].get(mode)
            cells.append(f'{mem["total_bytes"] / 2**20:.0f}' if mem else '—')
        cells += [f'{row["stats"][k]:.3f}' if k in row.get('stats', {}) else '—' for k in stats]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def _lengths(values: Sequence[str]) -> list[int | None]:
    """``--lengths`` as positive integers ([None]: the config's own)."""
    try:
        lengths = [int(v) for v in values]
    except ValueError:
        lengths = [0]
    if any(n < 1 for n in lengths):
        raise BenchError(f'--lengths={",".join(values)!r} is not allowed: comma-separated '
                         'positive integers, e.g. --lengths=1000,2000')
    return lengths or [None]


def _check_counts() -> None:
    for name, value, least in (('batch_size', _BATCH.value, 1), ('rounds', _ROUNDS.value, 1),
                               ('calls', _CALLS.value, 1), ('warmup', _WARMUP.value, 0)):
        if value < least:
            raise BenchError(f'--{name}={value} is not allowed: an integer >= {least}')
    bad = [m for m in _MODES.value if m not in MODES]
    if bad or not _MODES.value:
        raise BenchError(f'--modes={",".join(_MODES.value)!r} is not allowed: eval, train or '
                         'eval,train')


@cli.command
def run(argv) -> int:
    """CLI body; returns the exit status."""
    cli.no_arguments(argv)
    if not _CONFIG.spec:
        raise BenchError('--config is required, e.g. --config=configs/text.py:impl=xla')
    _check_counts()
    lengths = _lengths(_LENGTHS.value)
    variants = [parse_variant(_REFERENCE.value), *parse_variants(_VARIANTS.value)]
    if _OUT.value:
        cli.check_output_dir(os.path.dirname(_OUT.value) or '.', '--out')
    if _PROFILE.value:
        cli.check_output_dir(_PROFILE.value, '--profile')
        if _PROFILE_TOP.value < 1:
            raise BenchError(f'--profile_top={_PROFILE_TOP.value} is not allowed: an integer >= 1')
    result = benchmark(_CONFIG.spec, _CONFIG.overrides, variants, lengths,
                       batch_size=_BATCH.value, rounds=_ROUNDS.value, calls=_CALLS.value,
                       warmup=_WARMUP.value, modes=tuple(_MODES.value),
                       profile_dir=_PROFILE.value, profile_top=_PROFILE_TOP.value,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    result['settings']['command'] = shlex.join(['python', '-m', 'lra_sparse.bench', *sys.argv[1:]])
    table = markdown(result)
    if _OUT.value:
        with open(_OUT.value + '.json', 'w') as f:
            json.dump(result, f, indent=2)
        with open(_OUT.value + '.md', 'w') as f:
            f.write(table)
    if _PROFILE.value:
        os.makedirs(_PROFILE.value, exist_ok=True)
        with open(os.path.join(_PROFILE.value, 'profile.md'), 'w') as f:
            f.write(profile_markdown(result))
    print(table, end='')
    return 0


def define_flags() -> None:
    """Defines this command's flags; :func:`main` calls it.

    Importing the module defines no flag, so it sits beside the other commands (which define
    ``--config`` and ``--out`` too) in one process, e.g. under pytest.
    """
    global _CONFIG, _VARIANTS, _REFERENCE, _LENGTHS, _BATCH, _ROUNDS, _CALLS, _WARMUP, _MODES, _OUT
    global _PROFILE, _PROFILE_TOP
    _CONFIG = cli.define_config(help_text='Task config of every variant')
    _VARIANTS = flags.DEFINE_string(
        'variants', 'methods', "';'-separated variants: a preset (" + ', '.join([*GROUPS, *PRESETS])
        + ') or method[:field=value,...] (undotted fields are attention fields)')
    _REFERENCE = flags.DEFINE_string('reference', 'dense', 'The variant every ratio divides by.')
    _LENGTHS = flags.DEFINE_list('lengths', [], 'Sequence lengths (config.max_length); default: '
                                 "the config's.")
    _BATCH = flags.DEFINE_integer('batch_size', 4, 'Examples per call (sets config.batch_size).')
    _ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timed rounds.')
    _CALLS = flags.DEFINE_integer('calls', 1, 'Timed calls per variant, mode and round.')
    _WARMUP = flags.DEFINE_integer('warmup', 1, 'Untimed calls of each compiled step.')
    _MODES = flags.DEFINE_list('modes', list(MODES), 'What to time: eval (the jitted evaluation '
                               'forward) and/or train (the jitted train step).')
    _OUT = flags.DEFINE_string('out', None, 'Write PREFIX.json and PREFIX.md.')
    _PROFILE = flags.DEFINE_string(
        'profile', None, 'After the rounds, trace one call of every variant and mode into DIR '
        '(jax.profiler traces) and write DIR/profile.md: the most expensive compiled operations.')
    _PROFILE_TOP = flags.DEFINE_integer('profile_top', 20, 'Operations listed per profiled call.')


def main() -> None:
    """Console entry point."""
    define_flags()
    cli.main(run)


if __name__ == '__main__':
    main()


__all__ = ['PRESETS', 'Variant', 'benchmark', 'markdown', 'parse_variant', 'parse_variants',
           'random_batch', 'variant_config']
