"""The model-level benchmark: variant syntax, the JSON and markdown it writes, ratios per round.

No timing assertion: the numbers depend on the machine; the structure and the arithmetic do not.
"""

import json
import statistics
import subprocess
import sys

import pytest

from lra_sparse import bench
from lra_sparse.errors import ConfigError

SPEC = 'configs/text.py:tiny,impl=xla'
COMMON = [('model.num_layers', '1'), ('model.attention_dropout_rate', '0')]


def test_variant_syntax_keeps_commas_and_colons_inside_values():
    v = bench.parse_variant('spatten:token_keep_ratios=1.0,0.5,value_keep_ratio=0.5')
    assert v.method == 'spatten' and v.label.startswith('spatten:')
    assert v.overrides == (('attention.token_keep_ratios', '1.0,0.5'),
                           ('attention.value_keep_ratio', '0.5'))
    v = bench.parse_variant('dfss:pattern=1:2,model.dtype=bfloat16')
    assert v.overrides == (('attention.pattern', '1:2'), ('model.dtype', 'bfloat16'))


def test_presets_expand_and_every_preset_is_a_valid_config():
    variants = bench.parse_variants('methods;dsa:sparsity=0.5')
    assert [v.label for v in variants] == [*bench.PRESETS, 'dsa:sparsity=0.5']
    for v in variants:
        config = bench.variant_config('configs/text.py', [], v, 2000, 4)  # fields exist
        assert config.attention.name == v.method and config.max_length == 2000
        assert config.batch_size == 4


def test_impl_of_a_variant_picks_that_implementations_defaults():
    v = bench.parse_variant('dsa:impl=pallas')
    config = bench.variant_config('configs/text.py:impl=xla', COMMON, v, None, 4)
    assert config.attention.impl == 'pallas' and config.attention.granularity == 'block'
    assert config.max_length == 1000  # the config's own length


@pytest.mark.parametrize('text, match', [
    ('nope', "'nope' is not an attention method or preset"),
    ('dsa:sparsity', "'sparsity' is not field=value"),
    ('dfss;dfss', "names 'dfss' twice"),
])
def test_bad_variants_are_refused_in_one_line(text, match):
    with pytest.raises(bench.BenchError, match=match):
        bench.parse_variants(text)


def test_a_bad_field_is_refused_before_any_compute():
    with pytest.raises(ConfigError, match='attention.pattern'):
        bench.benchmark(SPEC, COMMON, bench.parse_variants('dense;dfss:pattern=3:4'), [32],
                        rounds=1)


def test_json_and_markdown_from_interleaved_rounds():
    variants = bench.parse_variants('dense;dfss;dsa:sparsity=0.5')
    lines = []
    result = bench.benchmark(SPEC, COMMON, variants, [32], batch_size=2, rounds=2, warmup=0,
                             progress=lines.append)
    json.dumps(result)  # JSON-ready
    assert set(result['environment']) >= {'device', 'jax_version', 'date'}
    assert result['settings']['rounds'] == 2 and result['settings']['batch_size'] == 2
    rows = result['rows']
    assert [(r['length'], r['variant']) for r in rows] == [(32, 'dense'), (32, 'dfss'),
                                                           (32, 'dsa:sparsity=0.5')]
    reference = rows[0]
    for row in rows:
        assert row['impl'] == 'xla' and row['batch_size'] == 2
        assert set(row['stats']) >= {'kept_fraction', 'attention_cost', 'model_cost'}
        for mode in bench.MODES:
            times = row[f'{mode}_seconds_rounds']
            assert len(times) == 2 and all(t > 0 for t in times)
            assert row[f'{mode}_median_seconds'] == statistics.median(times)
            ratios = [t / r for t, r in zip(times, reference[f'{mode}_seconds_rounds'])]
            assert row[f'{mode}_ratio_rounds'] == ratios  # the same rounds, pairwise
            assert row[f'{mode}_ratio'] == statistics.median(ratios)
            assert row['compile_seconds'][mode] > 0
            assert row['memory'][mode]['temp_bytes'] > 0
    assert reference['eval_ratio'] == reference['train_ratio'] == 1.0
    assert reference['stats']['kept_fraction'] == 1.0
    assert rows[1]['stats']['kept_fraction'] == pytest.approx(0.5, abs=0.02)  # DFSS
    assert any(line.startswith('  round 2/2') for line in lines)
    table = bench.markdown(result).splitlines()
    assert 'jax ' in table[0] and 'batch 2' in table[0]
    assert table[2].startswith('| L | variant | impl | infer ms | infer × ref | train ms |')
    assert table[2].endswith('| attention_cost | model_cost |')
    assert [line.split(' | ')[1] for line in table[4:]] == ['dense', 'dfss', 'dsa:sparsity=0.5']
    assert table[5].split(' | ')[4] == f'{rows[1]["eval_ratio"]:.2f}'


def test_cli_refuses_bad_flags_in_one_line():
    run = subprocess.run([sys.executable, '-m', 'lra_sparse.bench', f'--config={SPEC}',
                          '--lengths=10,x'], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: --lengths='10,x' is not allowed: comma-separated positive integers, e.g. "
        '--lengths=1000,2000']


def test_profile_names_the_operations_a_call_spends_its_time_on(tmp_path):
    variants = bench.parse_variants('dense;dsa:sparsity=0.5')
    result = bench.benchmark(SPEC, COMMON, variants, [32], batch_size=2, rounds=1, warmup=0,
                             modes=('eval',), profile_dir=str(tmp_path), profile_top=50)
    json.dumps(result)
    for row in result['rows']:
        ops = row['profile']['eval']
        assert 1 <= len(ops) <= 50
        assert [op['ms'] for op in ops] == sorted((op['ms'] for op in ops), reverse=True)
        assert all(op['ms'] > 0 and 0 < op['share'] <= 1 and op['shape'] for op in ops)
        assert any('dot' in op['kind'] for op in ops)  # the projections
        trace = tmp_path / f'{row["length"]}-{row["variant"].replace(":", "_")}-eval'
        assert list(trace.glob('plugins/profile/*/*.json.gz'))
    text = bench.profile_markdown(result)
    assert '### L=' in text and '| ms | share | operation | what | shape | jax |' in text


def test_hlo_operations_describe_fusions_and_custom_calls():
    hlo = '\n'.join([
        '%fused_computation.1 (param_0: f32[4,8]) -> f32[4] {',
        '  %param_0 = f32[4,8]{1,0} parameter(0)',
        '  %exponential.1 = f32[4,8]{1,0} exponential(f32[4,8]{1,0} %param_0)',
        '  ROOT %reduce.2 = f32[4]{0} reduce(%exponential.1, %c), dimensions={1}',
        '}', '',
        'ENTRY %main (p: f32[4,8]) -> f32[4] {',
        '  %p = f32[4,8]{1,0} parameter(0)',
        '  %custom-call.3 = (f32[4,2]{1,0}, s32[4,2]{1,0}) custom-call(%p), '
        'custom_call_target="TopK", metadata={op_name="jit(step)/top_k"}',
        '  ROOT %fusion.7 = f32[4]{0} fusion(%p), kind=kLoop, calls=%fused_computation.1, '
        'metadata={op_name="jit(step)/reduce_sum"}',
        '}'])
    ops = bench.hlo_operations(hlo)
    assert ops['fusion.7'] == {'shape': 'f32[4]{0}', 'kind': 'fusion: reduce, exponential',
                               'jax': 'reduce_sum'}
    assert ops['custom-call.3']['kind'] == 'custom-call TopK'
    assert ops['custom-call.3']['shape'] == '(f32[4,2]{1,0}, s32[4,2]{1,0})'
    events = [{'name': 'fusion.7', 'dur': 3000}, {'name': 'fusion.7', 'dur': 1000},
              {'name': 'other', 'args': {'hlo_op': 'custom-call.3'}, 'dur': 1000},
              {'name': 'ThunkExecutor::Execute', 'dur': 9000}]
    times = bench.operation_times(events, ops, top=5)
    assert [(t['op'], t['ms'], t['share']) for t in times] == [('fusion.7', 4.0, 0.8),
                                                               ('custom-call.3', 1.0, 0.2)]
