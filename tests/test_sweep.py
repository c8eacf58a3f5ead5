"""Sweeps: points, resume without re-running finished points, printed commands, bad names."""

import os

import pytest

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
    assert (tmp_path / points[1].name / 'results.json').exists()
    rows = report.report([str(tmp_path)])
    assert len(rows) == 1 and rows[0]['runs'] == 2  # same knobs: lr is not an attention knob
    png = (tmp_path / 'accuracy_vs_sparsity.png').read_bytes()
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
