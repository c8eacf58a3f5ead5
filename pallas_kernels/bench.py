"""Benchmark of the sparse attention kernels against dense baselines.

Run ``python -m pallas_kernels.bench`` (``--help`` for the flags). It prints a table and writes
JSON (``--out``, default ``bench_results.json``) with the device, jax version and date.

Measured, for each dtype, sequence length and mode (forward ``fwd``, forward+backward ``fwdbwd``):

* ``block_sparse`` at every block density (random per-(batch, head, query-block) lists);
* ``nm_sparse`` for every N:M pattern;
* baselines: ``dense_flash`` (the block-sparse kernel with every block kept: the dense flash
  kernel of the same family), ``pallas_mha`` (``jax.experimental.pallas.ops.gpu.attention.mha``,
  GPU only), ``dot_product_attention`` (``jax.nn.dot_product_attention``, cuDNN where it runs,
  else XLA) and ``xla_reference`` (``block_sparse_attention_reference``: dense masked softmax).

Per row: the time per call of ``--repeats`` calls issued back to back (one synchronisation at
the end, so dispatch overlaps the kernels as in a training step), the median of ``--rounds``
such rounds after ``--warmup`` calls; achieved TFLOP/s; speedups (baseline time / kernel time);
the kept density (the fraction of key blocks each list actually keeps: ``max(1, round(density ·
k_blocks))`` of ``k_blocks``, so nominal densities that keep the same count are measured once);
the dot precision (``bf16``; for float32 ``tf32``, the default of the kernels, Pallas ``mha`` and
XLA on GPU, or ``ieee`` for ``--precision=highest`` and the XLA reference); the compiled memory of
the jitted function (arguments + outputs + temporaries, from XLA's memory analysis) and, where the
device reports it, the process-wide peak of device memory after the row. FLOPs count
``4·batch·heads·head_dim`` per computed query-key pair in the forward pass (QKᵀ and PV) and 3.5×
that with the backward pass; the block-sparse kernel computes the kept tiles only, every other
kernel (N:M included: it multiplies full tiles and masks) all ``L²`` pairs. bfloat16 runs first.

On CPU (``--small``, automatic when the backend is cpu) a small interpret-mode version runs; its
times only show that the harness works (interpret mode is not a performance mode).
"""

from __future__ import annotations

import datetime
import functools
import json
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pallas_kernels import block_sparse, nm_sparse

FULL = dict(lengths=(1024, 2048, 4096, 8192, 16384), densities=(1.0, 0.5, 0.25, 0.1, 0.05),
            dtypes=('bfloat16', 'float32'), patterns=('2:4', '1:2'), batch=4, heads=8,
            head_dim=64, block_q=128, block_k=128, warmup=3, repeats=20, rounds=5,
            precision='default')
SMALL = dict(lengths=(256,), densities=(1.0, 0.25), dtypes=('float32',), patterns=('2:4',),
             batch=1, heads=2, head_dim=32, block_q=32, block_k=64, warmup=1, repeats=3, rounds=1,
             precision='default')
MODES = ('fwd', 'fwdbwd')


# -- measurement ----------------------------------------------------------------------------------
def with_backward(fn: Callable) -> Callable:
    """fn(q, k, v) -> a function (q, k, v, do) returning (out, (dq, dk, dv))."""
    def run(q, k, v, do):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(do)
    return run


def measure(fn: Callable, args: tuple, warmup: int, repeats: int,
            rounds: int = 1) -> dict[str, Any]:
    """Times a function of arrays, calls issued back to back.

    Args:
      fn: the computation (jitted here).
      args: its arguments (device arrays).
      warmup: untimed calls after compilation.
      repeats: calls per timed round, issued without waiting; one ``block_until_ready`` on the
        last result ends the round (the device runs them in order, so all are done).
      rounds: timed rounds; the median time per call over the rounds is reported.

    Returns:
      {'ms': median milliseconds per call, 'ms_rounds': per-call milliseconds of every round,
      'compiled_bytes': arguments + outputs + temporaries of the compiled function (None if
      unknown), 'device_peak_bytes': process-wide device peak after the runs (None where the
      device does not report it)}.
    """
    jitted = jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    mem = None
    try:
        stats = compiled.memory_analysis()
        mem = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                  + stats.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend implements it
        mem = None
    out = compiled(*args)
    for _ in range(warmup):
        out = compiled(*args)
    jax.block_until_ready(out)
    per_call = []
    for _ in range(max(1, rounds)):
        start = time.perf_counter()
        for _ in range(max(1, repeats)):
            out = compiled(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - start) / max(1, repeats))
    device_stats = jax.devices()[0].memory_stats() or {}
    return {'ms': 1e3 * statistics.median(per_call), 'ms_rounds': [1e3 * t for t in per_call],
            'compiled_bytes': mem, 'device_peak_bytes': device_stats.get('peak_bytes_in_use')}


def attention_flops(batch: int, heads: int, head_dim: int, pairs: float, mode: str) -> float:
    """FLOPs of attention over ``pairs`` query-key pairs per (batch, head)."""
    fwd = 4.0 * batch * heads * head_dim * pairs
    return fwd * (3.5 if mode == 'fwdbwd' else 1.0)


def kept_blocks(density: float, nkb: int) -> int:
    """Key blocks a list keeps at a nominal ``density``: max(1, round(density · nkb))."""
    return max(1, min(nkb, round(density * nkb)))


def random_lists(key: jax.Array, batch: int, heads: int, nqb: int, nkb: int,
                 density: float) -> tuple[jax.Array, jax.Array, int]:
    """Random block lists keeping :func:`kept_blocks` key blocks per query block.

    Returns:
      (indices int32 [batch, heads, nqb, kept], counts int32 [batch, heads, nqb], kept).
    """
    kept = kept_blocks(density, nkb)
    noise = jax.random.uniform(key, (batch, heads, nqb, nkb))
    mask = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1) < kept  # `kept` random blocks
    idx, cnt = block_sparse.block_mask_to_indices(mask, kept)
    return idx, cnt, kept


# -- baselines --------------------------------------------------------------------------------
def dot_product_attention(implementation: str | None):
    """``jax.nn.dot_product_attention`` (q, k, v) -> out with the given implementation."""
    def run(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return run


def pallas_mha(block_q: int, block_k: int):
    """The Pallas-Triton flash attention of jax (``pallas.ops.gpu.attention.mha``), GPU only.

    Its default backward tiles (32 × 32); TF32 dots for float32 (its default).
    """
    from jax.experimental.pallas.ops.gpu import attention

    sizes = attention.BlockSizes(block_q=block_q, block_k=block_k, block_q_dkv=32,
                                 block_kv_dkv=32, block_q_dq=32, block_kv_dq=32)

    def run(q, k, v):
        return attention.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, block_sizes=sizes)
    return run


def dot_kind(dtype: str, precision: str) -> str:
    """The dot precision of a row: 'bf16' for 16-bit inputs, else 'tf32' or 'ieee'."""
    if dtype != 'float32':
        return 'bf16' if dtype == 'bfloat16' else dtype
    return 'ieee' if precision == 'highest' else 'tf32'


# -- the sweep --------------------------------------------------------------------------------
def _row(kernel, dtype, length, mode, setting, res, flops, **extra):
    row = {'kernel': kernel, 'dtype': dtype, 'seq_len': length, 'mode': mode,
           'setting': setting, **extra, **res}
    if res.get('ms'):
        row['tflops'] = flops / (res['ms'] * 1e-3) / 1e12
    return row


def _safe(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a failed row (OOM, unsupported) is a result too
        return {'ms': None, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'}


def run_sweep(cfg: dict, log: Callable[[str], None] = print) -> list[dict]:
    """Measures every kernel and baseline of the configuration.

    Args:
      cfg: FULL / SMALL-shaped dict (lengths, densities, dtypes, patterns, batch, heads,
        head_dim, block_q, block_k, warmup, repeats, rounds, precision, interpret, modes).
      log: progress printer.

    Returns:
      One dict per measurement (see the module docstring); failures carry 'error'.
    """
    b, h, d = cfg['batch'], cfg['heads'], cfg['head_dim']
    rows = []
    for dtype in sorted(cfg['dtypes'], key=lambda x: x != 'bfloat16'):  # bfloat16 first
        for length in cfg['lengths']:
            keys = jax.random.split(jax.random.key(length), 5)
            arrays = [jax.random.normal(kk, (b, length, h, d), dtype) for kk in keys[:4]]
            for mode in cfg['modes']:
                rows += _sweep_point(cfg, dtype, length, mode, arrays, keys[4], log)
    return rows


def _sweep_point(cfg: dict, dtype: str, length: int, mode: str, arrays: list[jax.Array],
                 key: jax.Array, log: Callable[[str], None]) -> list[dict]:
    """Baselines, then every density and pattern, at one (dtype, length, mode).

    Args:
      cfg: the run configuration.
      dtype, length, mode: the point.
      arrays: q, k, v, do, each [batch, length, heads, head_dim].
      key: PRNG key of the random block lists.
      log: progress printer.

    Returns:
      The rows of this point.
    """
    b, h, d = cfg['batch'], cfg['heads'], cfg['head_dim']
    bq, bk, interpret = cfg['block_q'], cfg['block_k'], cfg['interpret']
    precision = cfg.get('precision', 'default')
    ours = dot_kind(dtype, precision)
    timing = dict(warmup=cfg['warmup'], repeats=cfg['repeats'], rounds=cfg.get('rounds', 1))
    args = tuple(arrays[:3]) if mode == 'fwd' else tuple(arrays)
    nqb, nkb = length // bq, length // bk
    dense_flops = attention_flops(b, h, d, float(length) * length, mode)
    rows: list[dict] = []

    def timed(fn: Callable) -> dict:
        return _safe(lambda: measure(fn if mode == 'fwd' else with_backward(fn), args,
                                     **timing))

    sizes = block_sparse.BlockSizes(bq, bk)
    idx1, cnt1, _ = random_lists(key, b, h, nqb, nkb, 1.0)
    baselines = {
        'dense_flash': (functools.partial(
            block_sparse.block_sparse_attention, block_indices=idx1, block_counts=cnt1,
            block_sizes=sizes, interpret=interpret, precision=precision), ours),
        'xla_reference': (functools.partial(
            block_sparse.block_sparse_attention_reference, block_indices=idx1,
            block_counts=cnt1, block_sizes=sizes), dot_kind(dtype, 'highest')),
    }
    if jax.default_backend() == 'gpu':
        baselines['pallas_mha'] = (pallas_mha(bq, bk), dot_kind(dtype, 'default'))
    base = {}
    for name, (fn, kind) in baselines.items():
        base[name] = timed(fn)
        rows.append(_row(name, dtype, length, mode, 'dense', base[name], dense_flops,
                         kept_density=1.0, dots=kind))
    dpa_impl = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'
    dpa = timed(dot_product_attention(dpa_impl))
    if not dpa.get('ms') and dpa_impl == 'cudnn':
        dpa_impl, dpa = 'xla', timed(dot_product_attention('xla'))
    base['dot_product_attention'] = dpa
    rows.append(_row('dot_product_attention', dtype, length, mode, dpa_impl, dpa, dense_flops,
                     kept_density=1.0, dots=dot_kind(dtype, 'default')))

    def add(kernel: str, setting: str, fn: Callable, flops: float, kept_density: float,
            res: dict | None = None):
        res = dict(res) if res else timed(fn)
        for name, other in base.items():
            if res.get('ms') and other.get('ms'):
                res[f'speedup_vs_{name}'] = other['ms'] / res['ms']
        rows.append(_row(kernel, dtype, length, mode, setting, res, flops,
                         kept_density=kept_density, dots=ours))
        log(_format_row(rows[-1]))

    by_kept = {nkb: base['dense_flash']}  # kept blocks -> result: the very same call
    for density in cfg['densities']:
        idx, cnt, kept = random_lists(key, b, h, nqb, nkb, density)
        fn = functools.partial(block_sparse.block_sparse_attention, block_indices=idx,
                               block_counts=cnt, block_sizes=sizes, interpret=interpret,
                               precision=precision)
        add('block_sparse', f'density={density}', fn, dense_flops * kept / nkb, kept / nkb,
            by_kept.get(kept))
        by_kept.setdefault(kept, {k: v for k, v in rows[-1].items()
                                  if k in ('ms', 'ms_rounds', 'compiled_bytes',
                                           'device_peak_bytes', 'error')})
    for pattern in cfg['patterns']:
        n, m = (int(x) for x in pattern.split(':'))
        fn = functools.partial(nm_sparse.nm_sparse_attention, n=n, m=m, interpret=interpret,
                               precision=precision,
                               block_sizes=nm_sparse.BlockSizes(bq, max(bk, 16 * m)))
        add('nm_sparse', pattern, fn, dense_flops, n / m)
    return rows


# -- output -----------------------------------------------------------------------------------
_COLUMNS = ('kernel', 'dtype', 'dots', 'seq_len', 'mode', 'setting', 'kept_density', 'ms',
            'tflops', 'speedup_vs_dense_flash', 'speedup_vs_pallas_mha',
            'speedup_vs_dot_product_attention', 'speedup_vs_xla_reference', 'compiled_bytes')
_HEADER = ('kernel', 'dtype', 'dots', 'L', 'mode', 'setting', 'kept', 'ms', 'TFLOP/s', 'x flash',
           'x mha', 'x dpa', 'x xla', 'MiB')


def _cell(key: str, value) -> str:
    if value is None:
        return '-'
    if key == 'compiled_bytes':
        return f'{value / 2**20:.1f}'
    if key == 'tflops':
        return f'{value:.2f}' if value >= 0.01 else f'{value:.1e}'
    if key == 'kept_density':
        return f'{value:.3g}'
    if isinstance(value, float):
        return f'{value:.3f}' if key == 'ms' else f'{value:.2f}'
    return str(value)


def _format_row(row: dict) -> str:
    cells = [_cell(c, row.get(c)) for c in _COLUMNS]
    if row.get('error'):
        cells.append(row['error'])
    return ' | '.join(cells)


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows (errors in a last column)."""
    lines = ['| ' + ' | '.join(_HEADER) + ' | error |',
             '|' + '---|' * (len(_HEADER) + 1)]
    for row in rows:
        cells = [_cell(c, row.get(c)) for c in _COLUMNS] + [row.get('error', '')]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def metadata(cfg: dict) -> dict:
    """Device, versions, date and the configuration of a run."""
    dev = jax.devices()[0]
    import jaxlib

    return {'device': getattr(dev, 'device_kind', str(dev)), 'platform': dev.platform,
            'device_count': jax.device_count(), 'jax_version': jax.__version__,
            'jaxlib_version': jaxlib.__version__, 'python': platform.python_version(),
            'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
            'argv': sys.argv[1:], 'config': cfg,
            'flops': '4*batch*heads*head_dim per computed pair (fwd); x3.5 with backward',
            'timing': 'per call: `repeats` calls back to back, one sync; median over `rounds`',
            'memory': 'compiled_bytes = arguments + outputs + temporaries (XLA memory analysis); '
                      'device_peak_bytes = process-wide peak after the row (if reported)'}


def _parse_list(text: str, kind):
    return tuple(kind(x) for x in text.split(',') if x)


FLAGS = flags.FlagValues()  # this module's own flags: importing it defines no global flags
flags.DEFINE_string('out', 'bench_results.json', 'JSON output path.', flag_values=FLAGS)
flags.DEFINE_bool('small', False, 'Small interpret-mode run (automatic when the backend is cpu).',
                  flag_values=FLAGS)
flags.DEFINE_string('lengths', None, 'Comma-separated sequence lengths.', flag_values=FLAGS)
flags.DEFINE_string('densities', None, 'Comma-separated block densities in (0, 1].',
                    flag_values=FLAGS)
flags.DEFINE_string('dtypes', None, 'Comma-separated: bfloat16,float32 (bf16/f32 accepted).',
                    flag_values=FLAGS)
flags.DEFINE_string('patterns', None, "Comma-separated N:M patterns, e.g. '2:4,1:2'.",
                    flag_values=FLAGS)
flags.DEFINE_string('modes', ','.join(MODES), 'Comma-separated: fwd,fwdbwd.', flag_values=FLAGS)
_INT_FLAGS = ('batch', 'heads', 'head_dim', 'block_q', 'block_k', 'warmup', 'repeats', 'rounds')
for _name in _INT_FLAGS:
    flags.DEFINE_integer(_name, None, f'{_name} (default: the full or small table).',
                         flag_values=FLAGS)
flags.DEFINE_enum('precision', None, ['default', 'highest'],
                  "The kernels' float32 dots: default (TF32 on GPU) or highest (IEEE).",
                  flag_values=FLAGS)


def parse_args(argv: list[str] | None = None) -> types.SimpleNamespace:
    """Command-line flags, ``--name=value`` as every CLI of the project (``--help`` lists them).

    Args:
      argv: the arguments after the program name (None: ``sys.argv[1:]``).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ('-h', '--help', '--helpfull') for a in args):
        print(__doc__)
        print(FLAGS.get_help())
        raise SystemExit(0)
    FLAGS.unparse_flags()
    try:
        FLAGS(['pallas_kernels.bench', *args])
    except flags.Error as e:
        raise SystemExit(f'pallas_kernels.bench: {e}') from None
    return types.SimpleNamespace(**{name: FLAGS[name].value for name in FLAGS})


def build_config(args: types.SimpleNamespace) -> dict:
    """FULL or SMALL defaults overridden by the flags."""
    small = args.small or jax.default_backend() == 'cpu'
    cfg = dict(SMALL if small else FULL)
    alias = {'bf16': 'bfloat16', 'f32': 'float32'}
    if args.lengths:
        cfg['lengths'] = _parse_list(args.lengths, int)
    if args.densities:
        cfg['densities'] = _parse_list(args.densities, float)
    if args.dtypes:
        cfg['dtypes'] = tuple(alias.get(x, x) for x in _parse_list(args.dtypes, str))
    if args.patterns:
        cfg['patterns'] = _parse_list(args.patterns, str)
    for name in (*_INT_FLAGS, 'precision'):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    cfg['modes'] = _parse_list(args.modes, str)
    cfg['small'] = small
    cfg['interpret'] = jax.default_backend() == 'cpu'
    bad = [m for m in cfg['modes'] if m not in MODES]
    if bad:
        raise SystemExit(f'--modes: {bad} not in {MODES}')
    for d in cfg['densities']:
        if not 0 < d <= 1:
            raise SystemExit(f'--densities: {d} not in (0, 1]')
    for dt in cfg['dtypes']:
        if dt not in ('bfloat16', 'float32'):
            raise SystemExit(f'--dtypes: {dt} not in bfloat16, float32')
    return cfg


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark, prints the table, writes the JSON; returns the rows."""
    cfg = build_config(parse_args(argv))
    meta = metadata(cfg)
    print(f"# {meta['device']} ({meta['platform']}), jax {meta['jax_version']}, {meta['date']}"
          f"{' - interpret mode, times are not performance' if cfg['interpret'] else ''}")
    rows = run_sweep(cfg, log=lambda line: print(line, flush=True))
    print(format_table(rows))
    out = parse_args(argv).out
    with open(out, 'w') as f:
        json.dump({'meta': meta, 'results': rows}, f, indent=1, default=_json_default)
    print(f'wrote {out}')
    return rows


def _json_default(x):
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    return str(x)


if __name__ == '__main__':
    main()
