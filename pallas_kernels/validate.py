"""One command for a GPU machine: check the compiled kernels, then measure the targets.

  python -m pallas_kernels.validate --budget=480 [--out=validate_results] [--parts=...]

Parts, in this order (each case is guarded: a failure is recorded and the run goes on; a case
that would start after the budget is recorded as skipped):

* ``checks``: the compiled kernels against their jnp references, forward output and dQ/dK/dV,
  bfloat16 and float32 (TF32 dots, and IEEE with ``precision='highest'`` at tight tolerances),
  padding masks on queries and keys, lists with nothing kept (their rows must be exact zeros),
  lists shared over the batch, a padded head width, different query and key lengths, backward
  sub-tiles; N:M 2:4 and 1:2.
* ``targets``: the performance targets (bfloat16, B=4, H=8, D=64, 128-tiles; L = 4096, 16384,
  8192): the block-sparse kernel at 10% and 5% block density, forward and forward+backward,
  against the dense flash kernel of the same family (every block kept), jax's Pallas ``mha``
  and ``jax.nn.dot_product_attention`` (cuDNN); N:M 2:4 and 1:2 forward; compiled memory.
* ``float32``: the same comparison at L = 4096 in float32, TF32 against TF32.
* ``tuning``: forward warps × stages and backward tiles × warps of the block-sparse kernel at
  L = 4096, 10% density (to choose the defaults).

Results go to ``PREFIX.json`` and ``PREFIX.md`` (``--out``), rewritten after every case, so a
run cut short still leaves what it measured. Times come from ``bench.measure``: the time per call
of calls issued back to back (one synchronisation per round), median over rounds.

On CPU (or with ``--dry_run``) a tiny interpret-mode version runs a few cases at small shapes: it
checks the harness only; its times say nothing about performance.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from pallas_kernels import bench, block_sparse, nm_sparse

FLAGS = flags.FlagValues()  # this module's own flags: importing it defines no global flags
PARTS = ('checks', 'targets', 'float32', 'tuning')
_BUDGET = flags.DEFINE_integer('budget', 480, 'Wall-clock seconds for the whole run.',
                               flag_values=FLAGS)
_OUT = flags.DEFINE_string('out', 'validate_results',
                           'Output prefix: writes PREFIX.json and PREFIX.md.', flag_values=FLAGS)
_PARTS = flags.DEFINE_list('parts', list(PARTS), f'Parts to run, in order: {", ".join(PARTS)}.',
                           flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Tiny interpret-mode run (automatic on CPU).',
                             flag_values=FLAGS)

# Max error relative to the largest reference entry (output; gradients).
TOLERANCE = {'ieee': (2e-5, 1e-4), 'tf32': (2e-2, 5e-2), 'bf16': (2e-2, 5e-2)}


# -- budget -----------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of a run: a case starts only if ``reserve`` seconds are left."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        """Seconds left."""
        return self.deadline - time.monotonic()

    def allows(self, reserve: float) -> bool:
        """True when at least ``reserve`` seconds are left."""
        return self.left() >= reserve


def guarded(fn: Callable[[], dict]) -> dict:
    """fn() with any exception recorded as {'error': 'Type: first line'}."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - one failing case must not stop the rest
        return {'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'}


# -- checks -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Check:
    """One correctness case: a kernel call and its reference at one shape."""

    name: str
    kernel: str  # 'block_sparse' | 'nm_sparse'
    dtype: str
    precision: str  # 'default' | 'highest'
    batch: int
    q_len: int
    kv_len: int
    heads: int
    head_dim: int
    sizes: tuple  # BlockSizes fields
    density: float = 0.3  # block_sparse: fraction of key blocks a list keeps
    pattern: tuple = (2, 4)  # nm_sparse: (n, m)
    masks: str = 'both'  # 'none' | 'keys' | 'both'
    shared_lists: bool = False  # block_sparse: one list table for the whole batch

    @property
    def dots(self) -> str:
        """'bf16' | 'tf32' | 'ieee'."""
        return bench.dot_kind(self.dtype, self.precision)


def gpu_checks() -> list[Check]:
    """The checks of a GPU run."""
    bs, nm = 'block_sparse', 'nm_sparse'
    t128 = (128, 128)
    return [
        Check('bs-bf16', bs, 'bfloat16', 'default', 2, 1024, 1024, 4, 64, t128),
        Check('bs-f32-ieee', bs, 'float32', 'highest', 2, 1024, 1024, 4, 64, t128),
        Check('bs-f32-tf32', bs, 'float32', 'default', 2, 1024, 1024, 4, 64, t128),
        Check('bs-bf16-cross-d48-shared', bs, 'bfloat16', 'default', 2, 256, 512, 2, 48,
              (64, 64), 0.5, masks='keys', shared_lists=True),
        Check('bs-f32-ieee-subtiles', bs, 'float32', 'highest', 1, 512, 512, 2, 64,
              (128, 128, None, 2, 32, 64), 0.4),
        Check('bs-bf16-all-kept', bs, 'bfloat16', 'default', 2, 1024, 1024, 4, 64, t128, 1.0,
              masks='none'),
        Check('nm24-bf16', nm, 'bfloat16', 'default', 2, 1024, 1024, 4, 64, t128),
        Check('nm12-f32-ieee', nm, 'float32', 'highest', 2, 1024, 1024, 4, 64, t128,
              pattern=(1, 2)),
        Check('nm24-f32-tf32', nm, 'float32', 'default', 2, 512, 512, 2, 64, t128,
              masks='keys'),
    ]


def dry_run_checks() -> list[Check]:
    """The few tiny checks of a dry run (interpret mode)."""
    return [
        Check('bs-f32-ieee', 'block_sparse', 'float32', 'highest', 2, 64, 64, 2, 16,
              (32, 32, None, 2, 16, 16), 0.5),
        Check('nm24-bf16', 'nm_sparse', 'bfloat16', 'default', 1, 64, 64, 1, 16, (16, 64),
              masks='keys'),
    ]


def padding_masks(rng: np.random.Generator, case: Check):
    """(q_valid, k_valid) bool [batch, length] or None: padded tails, holes, an empty key block."""
    if case.masks == 'none':
        return None, None
    k_valid = rng.random((case.batch, case.kv_len)) > 0.1
    k_valid[0, -7:] = False
    k_valid[-1, :case.sizes[1]] = False  # a whole key block of padding
    q_valid = None
    if case.masks == 'both':
        q_valid = rng.random((case.batch, case.q_len)) > 0.05
        q_valid[0, -5:] = False
    return (None if q_valid is None else jnp.asarray(q_valid)), jnp.asarray(k_valid)


def random_lists(rng: np.random.Generator, case: Check):
    """Shuffled lists with random counts (one of them 0) and junk in the unused slots.

    Returns:
      (indices int32 [B', H, q_blocks, k_blocks], counts int32 [B', H, q_blocks]).
    """
    nqb, nkb = case.q_len // case.sizes[0], case.kv_len // case.sizes[1]
    lead = (1 if case.shared_lists else case.batch, case.heads, nqb)
    keep = max(1, round(case.density * nkb))
    idx = np.full((*lead, nkb), nkb + 3, np.int32)
    cnt = np.zeros(lead, np.int32)
    for pos in np.ndindex(*lead):
        cnt[pos] = nkb if case.density == 1.0 else rng.integers(1, keep + 1)
        idx[pos][:cnt[pos]] = rng.permutation(nkb)[:cnt[pos]]
    if case.density < 1.0:
        cnt[0, 0, 0] = 0
    return jnp.asarray(idx), jnp.asarray(cnt)


def bound_pair(case: Check, rng: np.random.Generator, interpret: bool):
    """(kernel fn, reference fn, expected-empty rows bool [batch, q_len, heads])."""
    q_valid, k_valid = padding_masks(rng, case)
    sizes = block_sparse.BlockSizes(*case.sizes)
    kw = dict(block_sizes=sizes, precision=case.precision)
    empty = np.zeros((case.batch, case.q_len, case.heads), bool)
    if case.kernel == 'block_sparse':
        idx, cnt = random_lists(rng, case)
        args = (idx, cnt, q_valid, k_valid)
        run = block_sparse.block_sparse_attention
        ref = block_sparse.block_sparse_attention_reference
        rows = np.repeat(np.asarray(cnt) == 0, case.sizes[0], axis=-1)  # [B', H, Lq]
        empty |= np.broadcast_to(np.moveaxis(rows, 1, 2), empty.shape)
    else:
        args = (q_valid, k_valid)
        kw.update(n=case.pattern[0], m=case.pattern[1])
        run, ref = nm_sparse.nm_sparse_attention, nm_sparse.nm_sparse_attention_reference
    if q_valid is not None:
        empty |= ~np.asarray(q_valid)[:, :, None]
    kernel = functools.partial(run, interpret=interpret, **kw)
    return (lambda q, k, v: kernel(q, k, v, *args),
            lambda q, k, v: ref(q, k, v, *args, **kw), empty)


@functools.partial(jax.jit, static_argnums=0)
def _out_and_grads(fn, q, k, v, cot):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cot)


def relative_error(got: jax.Array, want: jax.Array) -> float:
    """Max |got - want| / max |want| (inf when got is not finite)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return float('inf')
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def run_check(case: Check, interpret: bool) -> dict:
    """Runs one check.

    Returns:
      {'errors': {'out', 'dq', 'dk', 'dv': relative error}, 'empty_rows_zero': bool,
      'tolerance': (out, grads), 'passed': bool}.
    """
    rng = np.random.default_rng(zlib.crc32(case.name.encode()))
    shapes = [(case.batch, case.q_len, case.heads, case.head_dim)] + [
        (case.batch, case.kv_len, case.heads, case.head_dim)] * 2
    q, k, v = (jnp.asarray(rng.normal(size=s), case.dtype) for s in shapes)
    run, ref, empty = bound_pair(case, rng, interpret)
    cot = jnp.asarray(rng.normal(size=q.shape), case.dtype)
    out, grads = _out_and_grads(run, q, k, v, cot)
    want, want_grads = _out_and_grads(ref, q, k, v, cot)
    errors = {'out': relative_error(out, want)}
    errors.update({name: relative_error(g, w)
                   for name, g, w in zip(('dq', 'dk', 'dv'), grads, want_grads)})
    zero_rows = bool((np.asarray(out, np.float32)[empty] == 0).all())
    tol_out, tol_grad = TOLERANCE[case.dots]
    passed = (errors['out'] <= tol_out and zero_rows
              and all(errors[n] <= tol_grad for n in ('dq', 'dk', 'dv')))
    return {'errors': errors, 'empty_rows_zero': zero_rows, 'tolerance': (tol_out, tol_grad),
            'passed': passed}


def check_row(case: Check, interpret: bool) -> dict:
    """A results row for one check (its description, then the outcome or the error)."""
    row = {'part': 'checks', 'name': case.name, 'kernel': case.kernel, 'dtype': case.dtype,
           'dots': case.dots, 'shape': f'B{case.batch} Lq{case.q_len} Lk{case.kv_len} '
                                     f'H{case.heads} D{case.head_dim}',
           'tiles': case.sizes, 'masks': case.masks}
    return {**row, **guarded(lambda: run_check(case, interpret))}


# -- performance --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Point:
    """One (dtype, length, mode) point of the performance table."""

    dtype: str
    length: int
    mode: str  # 'fwd' | 'fwdbwd'
    batch: int = 4
    heads: int = 8
    head_dim: int = 64
    tile: int = 128


def point_arrays(p: Point) -> list[jax.Array]:
    """q, k, v, do: [batch, length, heads, head_dim] normal arrays of the point's dtype."""
    keys = jax.random.split(jax.random.key(p.length), 4)
    shape = (p.batch, p.length, p.heads, p.head_dim)
    return [jax.random.normal(key, shape, p.dtype) for key in keys]


def block_sparse_fn(p: Point, density: float, interpret: bool, sizes=None):
    """(q, k, v) -> the block-sparse kernel at ``density`` (random lists); and the kept fraction."""
    nb = p.length // p.tile
    idx, cnt, kept = bench.random_lists(jax.random.key(7), p.batch, p.heads, nb, nb, density)
    sizes = sizes or block_sparse.BlockSizes(p.tile, p.tile)
    fn = functools.partial(block_sparse.block_sparse_attention, block_indices=idx,
                           block_counts=cnt, block_sizes=sizes, interpret=interpret)
    return fn, kept / nb


def point_kernels(p: Point, interpret: bool, gpu: bool) -> list[tuple[str, str, Callable, float]]:
    """(name, setting, fn, kept density) of every measurement at a point, baselines first."""
    dense, _ = block_sparse_fn(p, 1.0, interpret)
    out = [('dense_flash', 'density=1.0', dense, 1.0)]
    if gpu:
        out.append(('pallas_mha', 'dense', bench.pallas_mha(p.tile, p.tile), 1.0))
    dpa = 'cudnn' if gpu and p.dtype != 'float32' else 'xla'  # cuDNN has no float32 attention
    out.append(('dot_product_attention', dpa, bench.dot_product_attention(dpa), 1.0))
    for density in (0.1, 0.05):
        fn, kept = block_sparse_fn(p, density, interpret)
        out.append(('block_sparse', f'density={density}', fn, kept))
    for n, m in ((2, 4), (1, 2)) if p.mode == 'fwd' else ((2, 4),):
        fn = functools.partial(nm_sparse.nm_sparse_attention, n=n, m=m, interpret=interpret,
                               block_sizes=nm_sparse.BlockSizes(p.tile, max(p.tile, 16 * m)))
        out.append(('nm_sparse', f'{n}:{m}', fn, n / m))
    return out


def measure_row(p: Point, name: str, setting: str, fn: Callable, kept: float,
                arrays: list[jax.Array], timing: dict, part: str) -> dict:
    """Times one kernel at a point; a results row (errors recorded, not raised)."""
    args = tuple(arrays[:3]) if p.mode == 'fwd' else tuple(arrays)
    run = fn if p.mode == 'fwd' else bench.with_backward(fn)
    res = guarded(lambda: bench.measure(run, args, **timing))
    flops = bench.attention_flops(p.batch, p.heads, p.head_dim,
                                  float(p.length) ** 2 * (kept if name == 'block_sparse' else 1),
                                  p.mode)
    row = {'part': part, 'kernel': name, 'setting': setting, 'dtype': p.dtype,
           'dots': bench.dot_kind(p.dtype, 'default'), 'seq_len': p.length, 'mode': p.mode,
           'kept_density': kept, **res}
    if res.get('ms'):
        row['tflops'] = flops / (res['ms'] * 1e-3) / 1e12
    return row


# -- targets ------------------------------------------------------------------------------------
def _ms(rows: list[dict], kernel: str, setting: str, length: int, mode: str,
        dtype: str = 'bfloat16') -> float | None:
    for row in rows:
        if (row.get('part') == 'targets' and row['kernel'] == kernel
                and row['setting'] == setting and row['seq_len'] == length
                and row['mode'] == mode and row['dtype'] == dtype):
            return row.get('ms')
    return None


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets from the measured rows (bfloat16; None where not measured).

    Returns:
      [{'target', 'seq_len', 'value', 'required', 'passed'}]; ``value`` is a speedup (baseline
      time / kernel time) for '>=' targets and a time ratio for '<=' targets.
    """
    out = []

    def add(target, length, value, required, at_least=True):
        passed = None if value is None else (value >= required if at_least else value <= required)
        out.append({'target': target, 'seq_len': length, 'value': value,
                    'required': f'{">=" if at_least else "<="} {required}', 'passed': passed})

    lengths = sorted({r['seq_len'] for r in rows if r.get('part') == 'targets'})
    for length in lengths:
        def ms(kernel, setting, mode='fwd', length=length):
            return _ms(rows, kernel, setting, length, mode)
        flash, flash_bwd = ms('dense_flash', 'density=1.0'), ms('dense_flash', 'density=1.0',
                                                               'fwdbwd')
        add('fwd 10% vs dense flash', length, _ratio(flash, ms('block_sparse', 'density=0.1')), 6)
        add('fwd 5% vs dense flash', length, _ratio(flash, ms('block_sparse', 'density=0.05')),
            12)
        add('fwd 10% vs cuDNN', length,
            _ratio(ms('dot_product_attention', 'cudnn'), ms('block_sparse', 'density=0.1')), 3)
        add('fwd+bwd 10% vs dense flash', length,
            _ratio(flash_bwd, ms('block_sparse', 'density=0.1', 'fwdbwd')), 4)
        add('density 1.0 time / Pallas mha', length, _ratio(flash, ms('pallas_mha', 'dense')),
            1.15, at_least=False)
        add('N:M 2:4 fwd time / dense flash', length, _ratio(ms('nm_sparse', '2:4'), flash), 1.2,
            at_least=False)
    if 16384 in lengths:
        runs = _ms(rows, 'nm_sparse', '2:4', 16384, 'fwd') is not None
        out.append({'target': 'N:M runs at L = 16384', 'seq_len': 16384, 'value': runs,
                    'required': 'runs', 'passed': runs})
    return out + memory_targets(rows)


def memory_targets(rows: list[dict]) -> list[dict]:
    """Compiled memory linear in L: bytes(L_max) / bytes(L_min) <= 1.2 · L_max / L_min."""
    out = []
    for kernel, setting in (('nm_sparse', '2:4'), ('block_sparse', 'density=0.1')):
        sizes = {r['seq_len']: r.get('compiled_bytes') for r in rows
                 if r.get('part') == 'targets' and r['kernel'] == kernel
                 and r['setting'] == setting and r['mode'] == 'fwd' and r['dtype'] == 'bfloat16'
                 and r.get('compiled_bytes')}
        if len(sizes) < 2:
            continue
        lo, hi = min(sizes), max(sizes)
        growth = sizes[hi] / sizes[lo]
        out.append({'target': f'{kernel} {setting} memory linear in L', 'seq_len': hi,
                    'value': growth, 'required': f'<= {1.2 * hi / lo:.3g} (L x{hi / lo:g})',
                    'passed': growth <= 1.2 * hi / lo})
    return out


# -- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """What a run measures (GPU or dry run)."""

    checks: list[Check]
    target_points: list[Point]
    float32_points: list[Point]
    tuning_point: Point
    tuning: list[tuple[str, str, block_sparse.BlockSizes]]  # see tuning_cases
    timing: dict
    interpret: bool
    reserve: dict  # seconds a case needs to start, by part


def gpu_plan() -> Plan:
    """The full run on a GPU."""
    points = [Point('bfloat16', length, mode) for length in (4096, 16384, 8192)
              for mode in ('fwd', 'fwdbwd')]
    tuning = Point('bfloat16', 4096, 'fwd')
    return Plan(gpu_checks(), points, [Point('float32', 4096, 'fwd')], tuning,
                tuning_cases(tuning), dict(warmup=3, repeats=20, rounds=5), False,
                {'checks': 20, 'targets': 15, 'float32': 15, 'tuning': 15})


def dry_run_plan() -> Plan:
    """A few tiny interpret-mode cases (CPU): checks the harness only."""
    tiny = dict(batch=1, heads=2, head_dim=16, tile=32)
    tuning = Point('bfloat16', 128, 'fwd', **tiny)
    cases = tuning_cases(tuning)
    return Plan(dry_run_checks(), [Point('bfloat16', 128, 'fwd', **tiny)],
                [Point('float32', 128, 'fwd', **tiny)], tuning, [cases[0], cases[-1]],
                dict(warmup=0, repeats=1, rounds=1), True,
                {'checks': 0, 'targets': 0, 'float32': 0, 'tuning': 0})


def tuning_cases(p: Point) -> list[tuple[str, str, block_sparse.BlockSizes]]:
    """(mode, setting, BlockSizes) of the tuning part.

    Forward: warps × stages; forward+backward: backward tiles × warps.
    """
    t = p.tile
    fwd = [('fwd', f'warps={w} stages={s}', block_sparse.BlockSizes(t, t, num_warps=w,
                                                                    num_stages=s))
           for w, s in ((4, 2), (4, 3), (4, 4), (8, 2), (8, 3))]
    bwd = [('fwdbwd', f'bwd {b}x{b} warps={w}',
            block_sparse.BlockSizes(t, t, block_q_bwd=b, block_k_bwd=b, num_warps_bwd=w))
           for b, w in ((min(t, 64), 4), (min(t, 64), 8), (min(t, 32), 4), (t, 8))]
    return fwd + bwd


class Run:
    """The results of a run, written out after every case."""

    def __init__(self, out: str, meta: dict, budget: Budget, log: Callable[[str], None]):
        self.out, self.meta, self.budget, self.log = out, meta, budget, log
        self.rows: list[dict] = []

    def add(self, row: dict) -> None:
        """Records a row, logs it and rewrites the outputs."""
        self.rows.append(row)
        self.log(_log_line(row))
        self.write()

    def skip(self, row: dict) -> None:
        """Records a case the budget left no time for."""
        self.add({**row, 'skipped': f'budget ({self.budget.left():.0f} s left)'})

    def write(self) -> None:
        """Writes PREFIX.json and PREFIX.md."""
        doc = {'meta': self.meta, 'targets': evaluate_targets(self.rows), 'results': self.rows}
        with open(f'{self.out}.json', 'w') as f:
            json.dump(doc, f, indent=1, default=_json_default)
        with open(f'{self.out}.md', 'w') as f:
            f.write(markdown(doc))


def run_checks(plan: Plan, run: Run) -> None:
    """The ``checks`` part."""
    for case in plan.checks:
        if not run.budget.allows(plan.reserve['checks']):
            run.skip({'part': 'checks', 'name': case.name})
            continue
        run.add(check_row(case, plan.interpret))


def run_points(plan: Plan, run: Run, points: list[Point], part: str, gpu: bool) -> None:
    """The ``targets`` or ``float32`` part: every kernel at every point."""
    for p in points:
        arrays = guarded(lambda p=p: {'arrays': point_arrays(p)})
        for name, setting, fn, kept in point_kernels(p, plan.interpret, gpu):
            head = {'part': part, 'kernel': name, 'setting': setting, 'dtype': p.dtype,
                    'seq_len': p.length, 'mode': p.mode, 'kept_density': kept}
            if 'error' in arrays:
                run.add({**head, 'error': arrays['error']})
            elif not run.budget.allows(plan.reserve[part]):
                run.skip(head)
            else:
                run.add(measure_row(p, name, setting, fn, kept, arrays['arrays'], plan.timing,
                                    part))


def run_tuning(plan: Plan, run: Run) -> None:
    """The ``tuning`` part: launch parameters of the block-sparse kernel at 10% density."""
    p = plan.tuning_point
    arrays = point_arrays(p)
    for mode, setting, sizes in plan.tuning:
        point = dataclasses.replace(p, mode=mode)
        fn, kept = block_sparse_fn(point, 0.1, plan.interpret, sizes)
        head = {'part': 'tuning', 'kernel': 'block_sparse', 'setting': setting,
                'dtype': p.dtype, 'seq_len': p.length, 'mode': mode, 'kept_density': kept}
        if not run.budget.allows(plan.reserve['tuning']):
            run.skip(head)
            continue
        run.add(measure_row(point, 'block_sparse', setting, fn, kept, arrays, plan.timing,
                            'tuning'))


def validate(plan: Plan, parts: list[str], budget_s: float, out: str,
             log: Callable[[str], None] = print) -> dict:
    """Runs the parts of ``plan`` within ``budget_s`` seconds; writes OUT.json and OUT.md.

    Returns:
      The written document: {'meta', 'targets', 'results'}.
    """
    gpu = jax.default_backend() == 'gpu'
    meta = {**bench.metadata({'parts': parts, 'budget_s': budget_s}),
            'interpret': plan.interpret}
    run = Run(out, meta, Budget(budget_s), log)
    for part in parts:
        if part == 'checks':
            run_checks(plan, run)
        elif part in ('targets', 'float32'):
            points = plan.target_points if part == 'targets' else plan.float32_points
            run_points(plan, run, points, part, gpu)
        else:
            run_tuning(plan, run)
    run.write()
    return {'meta': meta, 'targets': evaluate_targets(run.rows), 'results': run.rows}


# -- output -------------------------------------------------------------------------------------
def _json_default(x):
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    return str(x)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return '-'
    if isinstance(value, bool):
        return 'yes' if value else 'NO'
    if isinstance(value, float):
        return f'{value:.{digits}g}'
    return str(value)


def _log_line(row: dict) -> str:
    status = row.get('error') or row.get('skipped') or ''
    if row.get('part') == 'checks' and 'passed' in row:
        errs = ' '.join(f'{k}={v:.1e}' for k, v in row['errors'].items())
        return f"check {row['name']}: {'pass' if row['passed'] else 'FAIL'} {errs}"
    if row.get('part') == 'checks':
        return f"check {row['name']}: {status}"
    return (f"{row['part']} {row['kernel']} {row['setting']} {row['dtype']} L={row['seq_len']} "
            f"{row['mode']}: {_fmt(row.get('ms'))} ms {status}")


def markdown(doc: dict) -> str:
    """The document as markdown: metadata, targets, checks, timings."""
    meta = doc['meta']
    lines = [f"# Kernel validation: {meta['device']} ({meta['platform']}), jax "
             f"{meta['jax_version']}, {meta['date']}", '']
    if meta.get('interpret'):
        lines += ['Dry run in interpret mode: the harness works; the times are not performance.',
                  '']
    lines += ['## Targets (bfloat16, B=4, H=8, D=64)', '',
              '| target | L | value | required | met |', '|---|---|---|---|---|']
    lines += [f"| {t['target']} | {t['seq_len']} | {_fmt(t['value'])} | {t['required']} | "
              f"{_fmt(t['passed'])} |" for t in doc['targets']]
    lines += ['', '## Checks (compiled kernels vs the jnp reference)', '',
              '| case | kernel | dtype | dots | shape | tiles | masks | out | dq | dk | dv | '
              'tolerance | empty rows 0 | passed |', '|' + '---|' * 14]
    for row in (r for r in doc['results'] if r.get('part') == 'checks'):
        errs = row.get('errors', {})
        cells = [row['name'], row.get('kernel'), row.get('dtype'), row.get('dots'),
                 row.get('shape'), row.get('tiles'), row.get('masks'),
                 *(_fmt(errs.get(n), 2) for n in ('out', 'dq', 'dk', 'dv')),
                 row.get('tolerance'), _fmt(row.get('empty_rows_zero')),
                 _fmt(row.get('passed')) if 'passed' in row
                 else row.get('error') or row.get('skipped')]
        lines.append('| ' + ' | '.join(_fmt(c) for c in cells) + ' |')
    lines += ['', '## Timings (ms per call, back to back; median over rounds)', '',
              '| part | kernel | setting | dtype | dots | L | mode | kept | ms | TFLOP/s | MiB | '
              'note |', '|' + '---|' * 12]
    for row in (r for r in doc['results'] if r.get('part') != 'checks'):
        mib = row.get('compiled_bytes')
        cells = [row['part'], row['kernel'], row['setting'], row['dtype'], row.get('dots'),
                 row['seq_len'], row['mode'], row.get('kept_density'), row.get('ms'),
                 row.get('tflops'), None if mib is None else mib / 2**20,
                 row.get('error') or row.get('skipped') or '']
        lines.append('| ' + ' | '.join(_fmt(c) for c in cells) + ' |')
    return '\n'.join(lines) + '\n'


# -- command line -------------------------------------------------------------------------------
def main(argv: list[str]) -> dict:
    """Parses the flags (argv[0] is the program), runs, prints where the results are."""
    if any(a in ('-h', '--help', '--helpfull') for a in argv[1:]):
        print(__doc__)
        print(FLAGS.get_help())
        raise SystemExit(0)
    FLAGS.unparse_flags()
    try:
        FLAGS(argv)
    except flags.Error as e:
        raise SystemExit(f'{argv[0]}: {e}') from None
    bad = [p for p in _PARTS.value if p not in PARTS]
    if bad:
        raise SystemExit(f'--parts: {bad} not in {PARTS}')
    if _BUDGET.value <= 0:
        raise SystemExit(f'--budget={_BUDGET.value}: must be > 0 seconds')
    dry = _DRY_RUN.value or jax.default_backend() == 'cpu'
    plan = dry_run_plan() if dry else gpu_plan()
    doc = validate(plan, _PARTS.value, _BUDGET.value, _OUT.value,
                   log=lambda line: print(line, flush=True))
    print(f'wrote {_OUT.value}.json and {_OUT.value}.md')
    return doc


if __name__ == '__main__':
    main(sys.argv)
