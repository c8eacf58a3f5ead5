"""Sweeps: points, names, resume without re-running finished points, printed commands, errors."""

import json
import os
import re

import pytest
from conftest import tiny_config

from lra_sparse import report, sweep

SPEC = 'configs/listops.py:tiny'
EXTRA = {'num_train_steps': 4, 'eval_every_steps': 4, 'log_every_steps': 2,
         'checkpoint_every_steps': 4, 'model.num_layers': 1, 'data.listops_num_train': 128,
         'data.listops_num_val': 32, 'data.listops_num_test': 32}


def test_config_sweep_points_and_seeds():
    points = sweep.sweep_points(SPEC, 'learning_rate', seeds=['0', '1'])
    assert [dict(p.overrides) for p in points] == [
        {'learning_rate': 0.05, 'seed': 0}, {'learning_rate': 0.05, 'seed': 1},
        {'learning_rate': 0.1, 'seed': 0}, {'learning_rate': 0.1, 'seed': 1}]
    assert len({p.name for p in points}) == 4


def test_two_point_sweep_resumes_and_reports(tmp_path):
    points = sweep.sweep_points(SPEC, 'learning_rate', extra=EXTRA)
    assert len(points) == 2
    sweep.run_sweep(SPEC, points[:1], str(tmp_path))  # "killed" after the first point
    first = tmp_path / points[0].name / 'results.json'
    stamp = os.path.getmtime(first)
    sweep.run_sweep(SPEC, points, str(tmp_path))
    assert os.path.getmtime(first) == stamp, 'a finished point must not run again'
    second = tmp_path / points[1].name / 'results.json'
    second.write_text(second.read_text()[:40])  # torn by a kill while it was written
    sweep.run_sweep(SPEC, points, str(tmp_path))
    assert os.path.getmtime(first) == stamp
    assert json.loads(second.read_text())['test']['accuracy'] >= 0, 'a torn point runs again'
    rows = report.report([str(tmp_path)])
    assert len(rows) == 1 and rows[0]['runs'] == 2  # same knobs: lr is not an attention knob
    assert 0 < rows[0]['majority_accuracy'] < 1  # recorded by the runs at evaluation
    png = (tmp_path / 'accuracy_vs_cost.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'


def test_compare_covers_every_method():
    from lra_sparse import attention

    points = sweep.sweep_points(SPEC, 'compare', sparsities=[0.5, 0.9])
    assert {p.attention for p in points} == set(attention.REGISTRY)


def test_print_commands(tmp_path):
    points = sweep.sweep_points(SPEC, 'learning_rate')
    cmd = sweep.point_command(SPEC, points[0], str(tmp_path))
    assert '-m lra_sparse.main' in cmd and '--config.learning_rate=0.05' in cmd
    assert f'--workdir={tmp_path}/' in cmd


def test_unknown_sweep_is_a_clear_error():
    with pytest.raises(sweep.SweepError, match='available sweeps are learning_rate'):
        sweep.sweep_points(SPEC, 'nope')


def test_names_list_only_what_varies():
    points = sweep.sweep_points(SPEC, 'learning_rate', extra=EXTRA)
    assert [p.name for p in points] == ['dense__learning_rate=0.05', 'dense__learning_rate=0.1']
    assert all(dict(p.overrides)['model.num_layers'] == 1 for p in points)  # still applied
    seeded = sweep.sweep_points(SPEC, 'learning_rate', seeds=['0', '1'], extra=EXTRA)
    assert seeded[1].name == 'dense__learning_rate=0.05__seed=1'
    assert sweep.sweep_points(SPEC, 'learning_rate', seeds=[3])[0].name == (
        'dense__learning_rate=0.05')  # one seed does not vary
    compare = sweep.sweep_points(SPEC, 'compare', sparsities=['0.5', '0.9'], extra=EXTRA)
    names = [p.name for p in compare]
    assert names[0] == 'dense' and 'dsa__sparsity=0.9' in names
    assert len(set(names)) == len(names)


@pytest.mark.parametrize('kwargs,needle', [
    ({'seeds': ['a']}, "--seeds='a' is not allowed: comma-separated integers"),
    ({'seeds': ['0.5']}, "--seeds='0.5' is not allowed"),
    ({'seeds': [0, 0]}, 'identical points (dense__learning_rate=0.05 twice)'),
    ({'sparsities': ['x']}, "--sparsities='x' is not allowed: comma-separated numbers"),
    ({'extra': {'learning_rate': 0.2}}, "--config.learning_rate sets a field that sweep "
                                         "'learning_rate' varies"),
    ({'seeds': [0, 1], 'extra': [('seed', '3')]}, '--config.seed sets a field'),
])
def test_bad_sweep_input_is_a_clear_error(kwargs, needle):
    sparsities = kwargs.pop('sparsities', None)
    with pytest.raises(sweep.SweepError, match=re.escape(needle)):
        if sparsities is not None:
            sweep.sweep_points(SPEC, 'compare', sparsities=sparsities)
        else:
            sweep.sweep_points(SPEC, 'learning_rate', **kwargs)


def test_a_finished_point_is_skipped_only_with_the_same_config(tmp_path):
    config = tiny_config()
    (tmp_path / 'config.json').write_text(config.to_json_best_effort())
    assert sweep._saved_config_is(str(tmp_path), config)
    config.num_train_steps += 1
    assert not sweep._saved_config_is(str(tmp_path), config)
    (tmp_path / 'config.json').write_text('{"seed": ')
    assert not sweep._saved_config_is(str(tmp_path), config)


def test_compare_runs_dense_as_its_reference_when_another_impl_is_chosen():
    """Dense xla has no attention dropout: the compare sweep says dense runs its reference."""
    points = sweep.sweep_points('configs/listops.py:tiny,impl=xla', 'compare', sparsities=[0.9])
    assert [p.name for p in points][:2] == ['dense__impl=reference',
                                            'dsa__sparsity=0.9']
    for point in points:  # every point is a valid config (nothing refused, nothing switched)
        config = sweep.point_config('configs/listops.py:tiny,impl=xla', point)
        assert config.attention.impl == ('reference' if point.attention == 'dense' else 'xla')
