"""The GPU validation command and the benchmark harness, in their CPU dry-run modes.

``python -m pallas_kernels.validate`` is meant for a GPU lent for a few minutes: it must not fail
on its first real run. Here it runs in interpret mode at tiny shapes (what it does on CPU),
end to end through its flags, and its pieces are checked: a wrong kernel fails its check, one
failing case does not stop the rest, the budget skips cases but the outputs are still written,
the targets are judged from the timings. The benchmark's timing is back to back (one
synchronisation per round) and it reports the kept density, bfloat16 first.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bench, block_sparse, validate


@pytest.fixture(autouse=True)
def fast_compile():
    """Interpret-mode kernels are XLA programs: skip most optimizations to compile faster."""
    old = jax.config.read('jax_disable_most_optimizations')
    jax.config.update('jax_disable_most_optimizations', True)
    yield
    jax.config.update('jax_disable_most_optimizations', old)


def test_validate_dry_run_end_to_end(tmp_path, monkeypatch, capsys):
    """All parts through the flags; dot_product_attention made to fail: recorded, not fatal."""
    def broken(implementation):
        def run(q, k, v):
            raise RuntimeError('boom')
        return run

    monkeypatch.setattr(validate.bench, 'dot_product_attention', broken)
    out = tmp_path / 'v'
    doc = validate.main(['validate', '--dry_run', '--budget=600', f'--out={out}'])
    assert 'wrote' in capsys.readouterr().out
    saved = json.loads((tmp_path / 'v.json').read_text())
    assert saved['results'] == json.loads(json.dumps(doc['results'], default=str))
    rows = doc['results']
    assert {r['part'] for r in rows} == set(validate.PARTS)
    checks = [r for r in rows if r['part'] == 'checks']
    assert checks and all(r['passed'] and r['empty_rows_zero'] for r in checks)
    timed = [r for r in rows if r['part'] != 'checks']
    failed = [r for r in timed if r['kernel'] == 'dot_product_attention']
    assert failed and all(r['error'] == 'RuntimeError: boom' for r in failed)
    assert all(r['ms'] > 0 for r in timed if r['kernel'] != 'dot_product_attention')
    assert {r['kernel'] for r in timed} >= {'dense_flash', 'block_sparse', 'nm_sparse'}
    targets = {t['target'] for t in doc['targets']}
    assert {'fwd 10% vs dense flash', 'N:M 2:4 fwd time / dense flash'} <= targets
    md = (tmp_path / 'v.md').read_text()
    assert 'Dry run in interpret mode' in md and '## Checks' in md and '| bs-f32-ieee |' in md


def test_validate_budget_skips_cases_and_still_writes(tmp_path):
    plan = validate.dry_run_plan()
    doc = validate.validate(plan, ['checks', 'targets'], 0.5, str(tmp_path / 'v'),
                            log=lambda line: None)
    skipped = [r for r in doc['results'] if 'skipped' in r]
    assert skipped and skipped[-1]['part'] == 'targets'
    assert json.loads((tmp_path / 'v.json').read_text())['results'][-1]['skipped']


def test_validate_check_fails_for_a_wrong_kernel(monkeypatch):
    reference = block_sparse.block_sparse_attention_reference
    monkeypatch.setattr(block_sparse, 'block_sparse_attention_reference',
                        lambda *a, **kw: reference(*a, **kw) * 1.01)
    case = validate.dry_run_checks()[0]
    row = validate.check_row(case, interpret=True)
    assert not row['passed'] and row['errors']['out'] > 1e-3


def test_validate_bad_flags_exit_with_a_message():
    with pytest.raises(SystemExit, match=r"--parts: \['speed'\] not in"):
        validate.main(['validate', '--parts=speed'])
    with pytest.raises(SystemExit, match=r'--budget=0: must be > 0 seconds'):
        validate.main(['validate', '--budget=0'])
    with pytest.raises(SystemExit, match=r'validate: .*budget'):
        validate.main(['validate', '--budget=soon'])


def _row(kernel, setting, mode, ms, length=4096, compiled_bytes=None):
    return {'part': 'targets', 'kernel': kernel, 'setting': setting, 'seq_len': length,
            'mode': mode, 'dtype': 'bfloat16', 'ms': ms, 'compiled_bytes': compiled_bytes}


def test_evaluate_targets_judges_the_issue_targets():
    rows = [_row('dense_flash', 'density=1.0', 'fwd', 1.0, compiled_bytes=100),
            _row('pallas_mha', 'dense', 'fwd', 0.9),
            _row('dot_product_attention', 'cudnn', 'fwd', 0.5),
            _row('block_sparse', 'density=0.1', 'fwd', 0.125, compiled_bytes=40),
            _row('block_sparse', 'density=0.05', 'fwd', 0.1),
            _row('nm_sparse', '2:4', 'fwd', 1.3, compiled_bytes=50),
            _row('dense_flash', 'density=1.0', 'fwdbwd', 4.0),
            _row('block_sparse', 'density=0.1', 'fwdbwd', 1.0),
            _row('block_sparse', 'density=0.1', 'fwd', 0.5, 16384, compiled_bytes=160),
            _row('nm_sparse', '2:4', 'fwd', None, 16384, compiled_bytes=800)]
    got = {(t['target'], t['seq_len']): t for t in validate.evaluate_targets(rows)}
    expect = {'fwd 10% vs dense flash': (8.0, True), 'fwd 5% vs dense flash': (10.0, False),
              'fwd 10% vs cuDNN': (4.0, True), 'fwd+bwd 10% vs dense flash': (4.0, True),
              'density 1.0 time / Pallas mha': (1.0 / 0.9, True),
              'N:M 2:4 fwd time / dense flash': (1.3, False)}
    for name, (value, passed) in expect.items():
        target = got[name, 4096]
        assert target['value'] == pytest.approx(value) and target['passed'] is passed, name
    assert got['fwd 10% vs dense flash', 16384]['passed'] is None  # dense flash not measured
    assert got['N:M runs at L = 16384', 16384]['passed'] is False
    memory = got['block_sparse density=0.1 memory linear in L', 16384]
    assert memory['value'] == 4.0 and memory['passed']
    assert not got['nm_sparse 2:4 memory linear in L', 16384]['passed']  # 16x for 4x the length


def test_measure_issues_calls_back_to_back(monkeypatch):
    calls = []
    real = jax.block_until_ready
    monkeypatch.setattr(jax, 'block_until_ready', lambda x: calls.append(1) or real(x))
    res = bench.measure(lambda x: x * 2.0, (jnp.ones((8,)),), warmup=2, repeats=5, rounds=3)
    assert len(calls) == 1 + 3  # after the warmup, then once per round of 5 calls
    assert len(res['ms_rounds']) == 3 and res['ms'] == pytest.approx(np.median(res['ms_rounds']))


def test_bench_reports_kept_density_measures_equal_counts_once_and_runs_bf16_first():
    cfg = dict(bench.SMALL, lengths=(128,), densities=(1.0, 0.3, 0.25), dtypes=('float32',
               'bfloat16'), patterns=(), batch=1, heads=1, head_dim=16, block_q=32, block_k=32,
               modes=('fwd',), interpret=True, warmup=0, repeats=1, rounds=1)
    rows = bench.run_sweep(cfg, log=lambda line: None)
    assert [r['dtype'] for r in rows] == sorted((r['dtype'] for r in rows),
                                                key=lambda d: d != 'bfloat16')
    sparse = [r for r in rows if r['kernel'] == 'block_sparse' and r['dtype'] == 'float32']
    assert [r['kept_density'] for r in sparse] == [1.0, 0.25, 0.25]  # 4 key blocks: 1 kept
    assert sparse[1]['ms'] == sparse[2]['ms']  # the same call, measured once
    dense = next(r for r in rows if r['kernel'] == 'dense_flash' and r['dtype'] == 'float32')
    assert sparse[0]['ms'] == dense['ms']
    kinds = {(r['kernel'], r['dtype']): r['dots'] for r in rows}
    assert kinds['block_sparse', 'float32'] == 'tf32'
    assert kinds['xla_reference', 'float32'] == 'ieee'
    assert kinds['block_sparse', 'bfloat16'] == 'bf16'
