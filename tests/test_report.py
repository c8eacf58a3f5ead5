"""Reports over hand-made workdirs: exact table, plots are valid PNGs, clear errors."""

import json
import os

import pytest

from lra_sparse import report


def make_run(path, task, method, seed, val, test, sparsity, extra_attn=None, stats=None):
    os.makedirs(path)
    attn = {'name': method, 'impl': 'reference', 'apply': 'train_and_eval', **(extra_attn or {})}
    results = {'task': task, 'attention': method, 'attention_config': attn, 'num_params': 1000,
               'train_steps_per_second': 5.0,
               'validation': {'accuracy': val, 'loss': 1.0, 'sparsity': sparsity},
               'test': {'accuracy': test, 'loss': 1.0, 'sparsity': sparsity, **(stats or {})}}
    with open(os.path.join(path, 'results.json'), 'w') as f:
        json.dump(results, f)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({'seed': seed}, f)
    with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
        for step, acc in ((10, val / 2), (20, val)):
            f.write(json.dumps({'step': step, 'split': 'validation', 'accuracy': acc}) + '\n')
        for step, sps in ((10, 100.0), (20, 4.0), (30, 6.0)):
            f.write(json.dumps({'step': step, 'split': 'train', 'steps_per_second': sps}) + '\n')


def test_report_exact_table(tmp_path):
    make_run(tmp_path / 'd0', 'listops', 'dense', 0, 0.30, 0.32, 0.0)
    make_run(tmp_path / 'd1', 'listops', 'dense', 1, 0.34, 0.36, 0.0)
    make_run(tmp_path / 's0', 'listops', 'dsa', 0, 0.28, 0.30, 0.9, {'sparsity': 0.9},
             {'prediction_accuracy': 0.5})
    rows = report.report([str(tmp_path)])
    assert [(r['method'], r['runs']) for r in rows] == [('dense', 2), ('dsa', 1)]
    dense, dsa = rows
    assert dense['val_accuracy'] == pytest.approx(0.32)
    assert dense['val_accuracy_std'] == pytest.approx(0.02)
    assert dense['test_accuracy'] == pytest.approx(0.34)
    assert dense['steps_per_second'] == pytest.approx(5.0)  # median of windows after the first
    assert dsa['knobs'] == 'apply=train_and_eval sparsity=0.9'
    assert dsa['prediction_accuracy'] == pytest.approx(0.5)
    md = (tmp_path / 'summary.md').read_text().splitlines()
    assert md[0] == ('| task | method | knobs | runs | sparsity | val acc (%) | test acc (%) | '
                     'params | steps/s | prediction_accuracy |')
    assert md[2] == ('| listops | dense | apply=train_and_eval | 2 | 0 | 32.00 ± 2.00 | '
                     '34.00 ± 2.00 | 1000 | 5 |  |')
    assert md[3] == ('| listops | dsa | apply=train_and_eval sparsity=0.9 | 1 | 0.9 | '
                     '28.00 ± 0.00 | 30.00 ± 0.00 | 1000 | 5 | 0.5 |')
    csv_lines = (tmp_path / 'summary.csv').read_text().splitlines()
    assert csv_lines[0].startswith('task,method,knobs,runs,sparsity,val_accuracy')
    assert len(csv_lines) == 3
    for png in ('accuracy_vs_sparsity.png', 'training_curves.png'):
        assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_pareto_front():
    assert report.pareto_front([(0.0, 0.5), (0.9, 0.4), (0.5, 0.3), (0.95, 0.1)]) == [0, 1, 3]


def test_no_results_is_a_clear_error(tmp_path):
    with pytest.raises(report.ReportError, match='no finished runs'):
        report.report([str(tmp_path)])
    assert report.run(['report', str(tmp_path / 'missing')]) == 2


@pytest.mark.parametrize('content,reason', [
    ('{"task": "listops", "attention"', 'is not readable JSON'),
    ('[1, 2]', 'holds a list, not an object'),
    ('{"task": "listops", "attention": "dense", "validation": {"accuracy": 0.3}, "test": {}}',
     "has no 'test.accuracy'"),
    (b'\xff\xfe{}', 'is not readable JSON'),
])
def test_unreadable_runs_are_named_and_the_rest_reported(tmp_path, capsys, content, reason):
    make_run(tmp_path / 'good', 'listops', 'dense', 0, 0.30, 0.32, 0.0)
    make_run(tmp_path / 'torn', 'listops', 'dsa', 0, 0.28, 0.30, 0.9, {'sparsity': 0.9})
    torn = tmp_path / 'torn' / 'results.json'
    torn.write_bytes(content if isinstance(content, bytes) else content.encode())
    rows = report.report([str(tmp_path)])
    assert [r['method'] for r in rows] == ['dense']
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith('warning: left out of the report: ')
    assert str(torn) in warnings[0] and reason in warnings[0]


def test_only_unreadable_runs_is_one_error(tmp_path, capsys):
    make_run(tmp_path / 'torn', 'listops', 'dense', 0, 0.30, 0.32, 0.0)
    (tmp_path / 'torn' / 'results.json').write_text('{"task": ')
    with pytest.raises(report.ReportError, match='no finished runs: 1 run'):
        report.report([str(tmp_path)])
    assert capsys.readouterr().err == ''
    assert not (tmp_path / 'summary.csv').exists()


def test_a_broken_metrics_file_leaves_out_only_the_curve(tmp_path, capsys):
    make_run(tmp_path / 'd0', 'listops', 'dense', 0, 0.30, 0.32, 0.0)
    with open(tmp_path / 'd0' / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 40, "spl\n{"step": 50, "split": "train", "loss": 1.0}\n')
    rows = report.report([str(tmp_path)])
    assert rows[0]['test_accuracy'] == pytest.approx(0.32)
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'metrics.jsonl is not readable' in err


def test_a_torn_last_metrics_line_is_left_out_with_a_warning(tmp_path, capsys, caplog):
    """A run killed while writing its last event: the complete events still make the curve."""
    make_run(tmp_path / 'd0', 'listops', 'dense', 0, 0.30, 0.32, 0.0)
    with open(tmp_path / 'd0' / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 40, "spl')
    rows = report.report([str(tmp_path)])
    assert rows[0]['test_accuracy'] == pytest.approx(0.32)
    assert capsys.readouterr().err == ''
    assert [r.getMessage() for r in caplog.records if 'is incomplete' in r.getMessage()]


def test_legends_name_only_the_fields_that_differ(tmp_path):
    common = {'num_train_steps': 400, 'model': {'num_layers': 2}}
    configs = [{'seed': 0, 'attention': {'name': 'dense'}},
               {'seed': 0, 'attention': {'name': 'dsa', 'sparsity': 0.9}},
               {'seed': 0, 'attention': {'name': 'dsa', 'sparsity': 0.95}},
               {'seed': 1, 'attention': {'name': 'dsa', 'sparsity': 0.95}}]
    for i, config in enumerate(configs):
        make_run(tmp_path / f'r{i}', 'listops', config['attention']['name'], 0, 0.3, 0.3, 0.0)
        with open(tmp_path / f'r{i}' / 'config.json', 'w') as f:
            json.dump({**common, **config}, f)
    records = [report.load_run(str(tmp_path / f'r{i}')) for i in range(4)]
    assert report.curve_labels(records) == [
        'dense seed=0', 'dsa sparsity=0.9 seed=0', 'dsa sparsity=0.95 seed=0',
        'dsa sparsity=0.95 seed=1']
