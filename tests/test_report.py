"""Reports over hand-made workdirs: exact table, plots are valid PNGs, clear errors."""

import json
import os

import pytest

from lra_sparse import report


def make_run(path, task, method, seed, val, test, sparsity, extra_attn=None, stats=None,
             majority=None, eval_speed=None):
    """A finished run; ``stats`` with 'kept_fraction' makes it a run of the standard statistics."""
    os.makedirs(path)
    attn = {'name': method, 'impl': 'reference', 'apply': 'train_and_eval', **(extra_attn or {})}
    test_split = {'accuracy': test, 'loss': 1.0, **(stats or {'sparsity': sparsity})}
    if eval_speed is not None:
        test_split['examples_per_second'] = eval_speed
    results = {'task': task, 'attention': method, 'attention_config': attn, 'num_params': 1000,
               'train_steps_per_second': 5.0,
               'validation': {'accuracy': val, 'loss': 1.0, 'sparsity': sparsity},
               'test': test_split}
    if majority is not None:
        results['majority_accuracy'] = majority
    with open(os.path.join(path, 'results.json'), 'w') as f:
        json.dump(results, f)
    with open(os.path.join(path, 'config.json'), 'w') as f:
        json.dump({'seed': seed}, f)
    with open(os.path.join(path, 'metrics.jsonl'), 'w') as f:
        for step, acc in ((10, val / 2), (20, val)):
            f.write(json.dumps({'step': step, 'split': 'validation', 'accuracy': acc}) + '\n')
        for step, sps in ((10, 100.0), (20, 4.0), (30, 6.0)):
            f.write(json.dumps({'step': step, 'split': 'train', 'steps_per_second': sps}) + '\n')


def _standard(kept, attention_cost, model_cost, **more):
    return {'kept_fraction': kept, 'sparsity': 1 - kept, 'attention_cost': attention_cost,
            'model_cost': model_cost, 'layer0/kept_fraction': kept, **more}


def test_report_exact_table(tmp_path):
    """Old-format runs (sparsity only): kept fraction 1 - sparsity, costs not logged."""
    make_run(tmp_path / 'd0', 'listops', 'dense', 0, 0.30, 0.32, 0.0)
    make_run(tmp_path / 'd1', 'listops', 'dense', 1, 0.34, 0.36, 0.0)
    make_run(tmp_path / 's0', 'listops', 'dsa', 0, 0.28, 0.30, 0.9, {'sparsity': 0.9},
             {'sparsity': 0.9, 'prediction_accuracy': 0.5})
    rows = report.report([str(tmp_path)])
    assert [(r['method'], r['runs']) for r in rows] == [('dense', 2), ('dsa', 1)]
    dense, dsa = rows
    assert dense['val_accuracy'] == pytest.approx(0.32)
    assert dense['val_accuracy_std'] == pytest.approx(0.02)
    assert dense['test_accuracy'] == pytest.approx(0.34)
    assert dense['train_steps_per_second'] == pytest.approx(5.0)  # median of windows after first
    assert dsa['knobs'] == 'apply=train_and_eval sparsity=0.9'
    assert dsa['prediction_accuracy'] == pytest.approx(0.5)
    assert dsa['kept_fraction'] == pytest.approx(0.1)
    assert dsa['attention_cost'] is None and dsa['test_accuracy_std'] is None
    md = (tmp_path / 'summary.md').read_text().splitlines()
    assert md[0] == ('| task | method | impl | knobs | runs | kept fraction | attention cost | '
                     'model cost | val acc (%) | test acc (%) | majority (%) | params | '
                     'train steps/s | eval ex/s | train speed vs dense | eval speed vs dense | '
                     'prediction_accuracy |')
    assert md[2] == ('| listops | dense | reference | apply=train_and_eval | 2 | '
                     '1 (1 − sparsity) | not logged | not logged | 32.00 ± 2.00 | 34.00 ± 2.00 | '
                     ' | 1000 | 5 |  | 1 |  |  |')
    assert md[3] == ('| listops | dsa | reference | apply=train_and_eval sparsity=0.9 | 1 | '
                     '0.1 (1 − sparsity) | not logged | not logged | 28.00 (1 seed) | '
                     '30.00 (1 seed) |  | 1000 | 5 |  | 1 |  | 0.5 |')
    csv_lines = (tmp_path / 'summary.csv').read_text().splitlines()
    assert csv_lines == [
        ','.join(report.BASE_COLUMNS) + ',prediction_accuracy',
        'listops,dense,reference,apply=train_and_eval,2,1,,,sparsity only,0.32,0.02,0.34,0.02,,'
        '1000,5,,1,,',
        'listops,dsa,reference,apply=train_and_eval sparsity=0.9,1,0.1,,,sparsity only,0.28,,0.3,,,'
        '1000,5,,1,,0.5']
    assert report.read_summary(str(tmp_path))[1]['kept_fraction'] == pytest.approx(0.1)
    for png in ('accuracy_vs_cost.png', 'training_curves.png'):
        assert (tmp_path / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_report_standard_statistics_and_speed_vs_dense(tmp_path):
    """Runs with kept_fraction / costs, majority class, eval speed; dense of the same sweep."""
    sweep = tmp_path / 'compare'
    make_run(sweep / 'dense', 'listops', 'dense', 0, 0.30, 0.32, 0.0, None,
             _standard(1.0, 1.0, 1.0), majority=0.18, eval_speed=200.0)
    make_run(sweep / 'dsa__sparsity=0.9', 'listops', 'dsa', 0, 0.28, 0.30, 0.9,
             {'sparsity': 0.9}, _standard(0.125, 1.5, 1.25, mse=0.25), majority=0.18,
             eval_speed=50.0)
    make_run(sweep / 'cta', 'listops', 'cta', 0, 0.27, 0.29, 1.0, {'bucket_width': 16},
             _standard(0.0, 0.5, 0.75, effective_pairs=0.2), majority=0.18, eval_speed=400.0)
    make_run(tmp_path / 'elsewhere' / 'dfss', 'listops', 'dfss', 0, 0.26, 0.28, 0.5, None,
             _standard(0.5, 1.25, 1.125), majority=0.18, eval_speed=100.0)
    make_run(tmp_path / 'elsewhere' / 'dfss_eval', 'listops', 'dfss', 0, 0.25, 0.27, 0.5, None,
             _standard(0.5, 1.25, 1.125), majority=0.18, eval_speed=100.0)
    evaluated = json.loads((tmp_path / 'elsewhere' / 'dfss_eval' / 'results.json').read_text())
    (tmp_path / 'elsewhere' / 'dfss_eval' / 'results.json').write_text(
        json.dumps({**evaluated, 'mode': 'evaluate'}))
    rows = report.report([str(tmp_path)])
    assert [r['method'] for r in rows] == ['dense', 'cta', 'dfss', 'dfss', 'dsa']
    assert rows[3]['knobs'] == 'apply=train_and_eval mode=evaluate'  # not a seed of the other
    (tmp_path / 'elsewhere' / 'dfss_eval' / 'results.json').unlink()
    rows = report.report([str(tmp_path)])
    md = (tmp_path / 'summary.md').read_text().splitlines()
    assert md[0].endswith('| eval speed vs dense | effective_pairs | mse |')
    assert md[2:] == [
        '| listops | dense | reference | apply=train_and_eval | 1 | 1 | 1 | 1 | 30.00 (1 seed) | '
        '32.00 (1 seed) | 18.00 | 1000 | 5 | 200 | 1 | 1 |  |  |',
        '| listops | cta | reference | apply=train_and_eval bucket_width=16 | 1 | 0 | 0.5 | 0.75 '
        '| 27.00 (1 seed) | 29.00 (1 seed) | 18.00 | 1000 | 5 | 400 | 1 | 2 | 0.2 |  |',
        '| listops | dfss | reference | apply=train_and_eval | 1 | 0.5 | 1.25 | 1.125 | '
        '26.00 (1 seed) | 28.00 (1 seed) | 18.00 | 1000 | 5 | 100 |  |  |  |  |',
        '| listops | dsa | reference | apply=train_and_eval sparsity=0.9 | 1 | 0.125 | 1.5 | 1.25 '
        '| 28.00 (1 seed) | 30.00 (1 seed) | 18.00 | 1000 | 5 | 50 | 1 | 0.25 |  | 0.25 |']
    csv_lines = (tmp_path / 'summary.csv').read_text().splitlines()
    assert csv_lines[0] == ','.join(report.BASE_COLUMNS) + ',effective_pairs,mse'
    assert csv_lines[4] == ('listops,dsa,reference,apply=train_and_eval sparsity=0.9,1,0.125,1.5,'
                            '1.25,kept_fraction,0.28,,0.3,,0.18,1000,5,50,1,0.25,,0.25')
    summary = report.read_summary(str(tmp_path / 'summary.json'))
    assert [r['attention_cost'] for r in summary] == [1.0, 0.5, 1.25, 1.5]
    curves = json.loads((tmp_path / 'curves.json').read_text())
    assert [c['label'] for c in curves] == ['cta', 'dense', 'dsa', 'dfss']  # one run per method
    assert curves[0]['steps'] == [10, 20] and curves[0]['accuracy'] == [0.135, 0.27]


def test_point_labels_name_the_knobs_that_differ_within_a_method():
    rows = [{'task': 't', 'method': 'dense', 'impl': 'reference', '_knob_values': {}},
            {'task': 't', 'method': 'dsa', 'impl': 'xla',
             '_knob_values': {'sparsity': 0.9, 'sigma': 0.25}},
            {'task': 't', 'method': 'dsa', 'impl': 'xla',
             '_knob_values': {'sparsity': 0.95, 'sigma': 0.25}},
            {'task': 't', 'method': 'cta', 'impl': 'xla', '_knob_values': {'bucket_width': 16}}]
    assert report.point_labels(rows) == ['', 'sparsity=0.9', 'sparsity=0.95', '']


def test_plots_are_figures_with_the_two_axes(tmp_path):
    make_run(tmp_path / 'd', 'listops', 'dense', 0, 0.30, 0.32, 0.0, None,
             _standard(1.0, 1.0, 1.0), majority=0.18)
    make_run(tmp_path / 'old', 'listops', 'dsa', 0, 0.28, 0.30, 0.9, {'sparsity': 0.9})
    rows = report.summarize(report.load_runs(report.find_runs([str(tmp_path)])))
    fig = report.plot_accuracy_vs_cost(rows)
    cost_ax, kept_ax = fig.axes[:2]
    assert cost_ax.get_xlabel().startswith('attention cost')
    assert kept_ax.get_xlabel().startswith('kept fraction')
    names = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {'dense', 'majority class', 'dsa', 'Pareto front (cost)'} <= set(names)
    assert any('without a logged cost' in t.get_text() for t in cost_ax.texts)
    assert len(kept_ax.lines) >= 3  # dense line, majority line, the dsa point


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
