"""Reports: aggregate any set of workdirs into a table and plots.

  python -m lra_sparse.report RUN_DIR [RUN_DIR ...] [--out=DIR]

Finds every run (a folder with ``results.json``) under the given directories and writes to ``--out``
(default: the first directory):

- ``summary.csv``, ``summary.json`` and ``summary.md``: one row per configuration (runs that differ
  only in seed are one row): task, method, implementation, knobs, number of runs, the standard
  statistics of the test split (``kept_fraction``, ``attention_cost``, ``model_cost``; see
  ``lra_sparse/attention/base.py``), validation and test accuracy (mean and std over seeds; the
  markdown says "1 seed" when there is one), the majority-class accuracy of the task, params,
  train steps/s (median of the logged windows after the first), eval examples/s (final test
  evaluation), the two speeds divided by those of the dense run of the same task in the same
  sweep directory, then every method statistic. Runs written before the standard statistics
  logged only ``sparsity``: their ``kept_fraction`` is ``1 - sparsity``, their costs are empty and
  ``stats_logged`` says ``sparsity only``.
- ``curves.json``: every run's validation curve and legend label (what the training-curve plot
  draws), so the plots can be redrawn from the summary files alone.
- ``accuracy_vs_cost.png``: test accuracy against ``attention_cost`` (Pareto front marked) and
  against ``kept_fraction``, one row of panels per task, dense and majority-class lines, points
  labelled with the knob values that differ between a method's rows.
- ``training_curves.png``: validation accuracy against steps; the legend names the method and the
  config fields that differ between the runs.

The plotting functions draw on ``matplotlib.figure.Figure`` objects and return them (inline in a
notebook); :func:`save_figure` writes one as a PNG.

A run whose ``results.json`` is torn or incomplete is named in one warning line and left out; with
no readable run at all the report stops with one line.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys

import numpy as np
from absl import flags

from lra_sparse import cli, metrics
from lra_sparse import results as results_lib
from lra_sparse.errors import UserError

_OUT = flags.DEFINE_string('out', None, 'Output directory (default: the first run directory).')

# Columns every row has, in order; method statistics follow.
BASE_COLUMNS = ('task', 'method', 'impl', 'knobs', 'runs', 'kept_fraction', 'attention_cost',
                'model_cost', 'stats_logged', 'val_accuracy', 'val_accuracy_std',
                'test_accuracy', 'test_accuracy_std', 'majority_accuracy', 'num_params',
                'train_steps_per_second', 'eval_examples_per_second', 'train_speed_vs_dense',
                'eval_speed_vs_dense')
# Test-split entries that are not method statistics (the standard ones have their own columns).
_NOT_STATS = ('loss', 'accuracy', 'num_examples', 'examples_per_second', 'kept_fraction',
              'sparsity', 'attention_cost', 'model_cost')
_NOT_KNOBS = ('name', 'impl')
SUMMARY_FILES = ('summary.csv', 'summary.json', 'summary.md', 'curves.json',
                 'accuracy_vs_cost.png', 'training_curves.png')


class ReportError(UserError):
    """Nothing to report (no finished runs under the given directories)."""


def find_runs(paths: list[str]) -> list[str]:
    """Every directory at or below ``paths`` that holds a results.json (valid or not), sorted."""
    runs = []
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(f'{path!r} is not a directory')
        for root, _, files in os.walk(path):
            if 'results.json' in files:
                runs.append(root)
    if not runs:
        raise ReportError(f'no finished runs (results.json) under {", ".join(paths)}; '
                          'train first with python -m lra_sparse.main or lra_sparse.sweep')
    return sorted(runs)


def load_runs(workdirs: list[str]) -> list[dict]:
    """The records of the runs that can be read; one warning line on stderr per other run.

    Raises:
      ReportError: none of ``workdirs`` can be read (the message names the first problem).
    """
    records, problems = [], []
    for workdir in workdirs:
        try:
            records.append(load_run(workdir))
        except results_lib.UnreadableResultsError as error:
            problems.append(str(error))
    if not records:
        raise ReportError(f'no finished runs: {len(problems)} run(s) with an unreadable '
                          f'results.json, e.g. {problems[0]}')
    for problem in problems:
        print(f'warning: left out of the report: {problem}', file=sys.stderr)
    return records


def load_run(workdir: str) -> dict:
    """One run as a flat record: identity, knobs, final metrics, statistics, curve, config.

    Raises:
      UnreadableResultsError: results.json is missing, torn or lacks a required key.
    """
    results = results_lib.read_results(workdir)
    attn = results.get('attention_config', {})
    knobs = {k: v for k, v in sorted(attn.items()) if k not in _NOT_KNOBS}
    if results.get('mode') == 'evaluate':  # trained weights of another run, evaluated as is
        knobs['mode'] = 'evaluate'
    val, test = results['validation'], results['test']
    logged = 'kept_fraction' in test
    config = _read_config(workdir)
    for key, value in attn.items():  # a config.json without them (hand-made, older) still labels
        config.setdefault(f'attention.{key}', value)
    events = _read_events(workdir)
    train_events = [e for e in events if e.get('split') == 'train']
    speeds = [e['steps_per_second'] for e in train_events[1:] if 'steps_per_second' in e]
    return {
        'workdir': workdir, 'sweep': os.path.dirname(os.path.abspath(workdir)),
        'task': results['task'], 'method': results['attention'],
        'impl': attn.get('impl', ''), 'knob_values': knobs,
        'knobs': ' '.join(f'{k}={v}' for k, v in knobs.items()),
        'seed': results.get('seed', config.get('seed')),
        'kept_fraction': test['kept_fraction'] if logged else 1.0 - test.get('sparsity', 0.0),
        'attention_cost': test.get('attention_cost'), 'model_cost': test.get('model_cost'),
        'stats_logged': 'kept_fraction' if logged else 'sparsity only',
        'val_accuracy': val.get('accuracy'), 'test_accuracy': test.get('accuracy'),
        'majority_accuracy': results.get('majority_accuracy'),
        'num_params': results.get('num_params'),
        'train_steps_per_second': float(np.median(speeds)) if speeds else results.get(
            'train_steps_per_second'),
        'eval_examples_per_second': test.get('examples_per_second'),
        'stats': {k: v for k, v in test.items() if '/' not in k and k not in _NOT_STATS},
        'curve': [(e['step'], e['accuracy']) for e in events
                  if e.get('split') == 'validation' and 'accuracy' in e],
        'config': config,
    }


def _read_events(workdir: str) -> list[dict]:
    """metrics.jsonl events with a step (a torn file: a warning and no events)."""
    try:
        events = metrics.read_metrics(workdir)
    except (OSError, ValueError) as error:
        print(f'warning: {os.path.join(workdir, "metrics.jsonl")} is not readable ({error}): '
              'its training curve and steps/s are left out', file=sys.stderr)
        return []
    return [e for e in events if isinstance(e, dict) and 'step' in e]


def _read_config(workdir: str) -> dict:
    """The run's config.json flattened to ``{'model.num_layers': 2, ...}`` ({} if unreadable)."""
    try:
        with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return results_lib.flatten(config) if isinstance(config, dict) else {}


def summarize(records: list[dict]) -> list[dict]:
    """Groups runs that differ only in seed; mean and std of accuracies, mean of the rest.

    Returns:
      One row per (task, method, impl, knobs) with :data:`BASE_COLUMNS` and the method statistics;
      keys starting with ``_`` (the knob values, the sweep directories) are for the plots only.
      A std is None for a single run. Speeds relative to dense divide by the dense row of the same
      task that shares a sweep directory (the same implementation preferred); None without one.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r['task'], r['method'], r['impl'], r['knobs']), []).append(r)
    rows = [_summary_row(runs) for runs in groups.values()]
    for row in rows:
        dense = _dense_reference(row, rows)
        for speed in ('train_steps_per_second', 'eval_examples_per_second'):
            ratio = f'{speed.split("_")[0]}_speed_vs_dense'
            row[ratio] = _ratio(row[speed], dense[speed]) if dense else None
    rows.sort(key=lambda r: (r['task'], r['method'] != 'dense', r['method'], r['impl'],
                             -r['kept_fraction'], r['knobs']))
    return rows


def _summary_row(runs: list[dict]) -> dict:
    """The row of one configuration's runs (all seeds)."""
    first = runs[0]
    val = [r['val_accuracy'] for r in runs]
    test = [r['test_accuracy'] for r in runs]
    row = {key: first[key] for key in ('task', 'method', 'impl', 'knobs')}
    row['runs'] = len(runs)
    for key in ('kept_fraction', 'attention_cost', 'model_cost'):
        row[key] = _mean([r[key] for r in runs])
    row['stats_logged'] = ('kept_fraction' if all(r['stats_logged'] == 'kept_fraction'
                                                  for r in runs) else 'sparsity only')
    row.update(val_accuracy=_mean(val), val_accuracy_std=_std(val), test_accuracy=_mean(test),
               test_accuracy_std=_std(test))
    for key in ('majority_accuracy', 'train_steps_per_second', 'eval_examples_per_second'):
        row[key] = _mean([r[key] for r in runs])
    row['num_params'] = first['num_params']
    for key in sorted({k for r in runs for k in r['stats']}):
        row[key] = _mean([r['stats'].get(key) for r in runs])
    row['_knob_values'] = first['knob_values']
    row['_sweeps'] = sorted({r['sweep'] for r in runs})
    return row


def _dense_reference(row: dict, rows: list[dict]) -> dict | None:
    """The dense row measured beside ``row``: same task, a shared sweep directory."""
    dense = [d for d in rows if d['method'] == 'dense' and d['task'] == row['task']
             and set(d['_sweeps']) & set(row['_sweeps'])]
    same_impl = [d for d in dense if d['impl'] == row['impl']]
    return (same_impl or dense or [None])[0]


def _ratio(value, reference):
    if value is None or not reference:
        return None
    return float(value / reference)


def _mean(values):
    values = [v for v in values if v is not None and not _is_nan(v)]
    return float(np.mean(values)) if values else None


def _std(values):
    values = [v for v in values if v is not None]
    return float(np.std(values)) if len(values) > 1 else None


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def columns(rows: list[dict]) -> list[str]:
    """Base columns, then every statistic that appears in any row (internal ``_`` keys left out)."""
    extra = sorted({k for r in rows for k in r if not k.startswith('_')} - set(BASE_COLUMNS))
    return list(BASE_COLUMNS) + extra


def write_csv(rows: list[dict], path: str) -> None:
    """summary.csv: one row per configuration, numbers to 6 significant digits.

    An empty cell: not measured or not logged.
    """
    cols = columns(rows)
    with open(path, 'w', newline='', encoding='utf-8') as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_cell(r.get(c)) for c in cols})


def _csv_cell(value):
    return f'{value:.6g}' if isinstance(value, float) else value


def write_json(rows: list[dict], path: str) -> None:
    """summary.json: the rows as a list of objects (null: not measured or not logged)."""
    cols = columns(rows) + ['_knob_values']
    with open(path, 'w', encoding='utf-8') as f:
        json.dump([{c: r.get(c) for c in cols} for r in rows], f, indent=1)
        f.write('\n')


def read_summary(path: str) -> list[dict]:
    """The rows of a ``summary.json`` written by :func:`report` (for redrawing its plots).

    Args:
      path: a summary.json file, or the directory that holds one.
    """
    if os.path.isdir(path):
        path = os.path.join(path, 'summary.json')
    try:
        with open(path, encoding='utf-8') as f:
            rows = json.load(f)
    except (OSError, ValueError) as error:
        raise ReportError(f'{path} is not a readable summary.json ({error}); write one with '
                          'python -m lra_sparse.report RUN_DIR...') from None
    if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows)):
        raise ReportError(f'{path} is not a summary.json (a list of rows)')
    return rows


def _fmt(value) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.4g}'
    return str(value)


def _accuracy_cell(row: dict, split: str) -> str:
    mean, std = row[f'{split}_accuracy'], row[f'{split}_accuracy_std']
    if mean is None:
        return ''
    if row['runs'] == 1 or std is None:
        return f'{100 * mean:.2f} (1 seed)'
    return f'{100 * mean:.2f} ± {100 * std:.2f}'


def _cost_cell(row: dict, key: str) -> str:
    if row.get(key) is None and row['stats_logged'] != 'kept_fraction':
        return 'not logged'
    return _fmt(row.get(key))


def _kept_cell(row: dict) -> str:
    if row['stats_logged'] != 'kept_fraction':
        return f'{_fmt(row["kept_fraction"])} (1 − sparsity)'
    return _fmt(row['kept_fraction'])


def _percent(value) -> str:
    return '' if value is None else f'{100 * value:.2f}'


MARKDOWN_HEAD = ('task', 'method', 'impl', 'knobs', 'runs', 'kept fraction', 'attention cost',
                 'model cost', 'val acc (%)', 'test acc (%)', 'majority (%)', 'params',
                 'train steps/s', 'eval ex/s', 'train speed vs dense', 'eval speed vs dense')


def markdown_table(rows: list[dict]) -> str:
    """summary.md body: accuracies in percent (mean ± std over seeds, or "1 seed").

    A run that logged only ``sparsity`` shows ``kept fraction`` as ``1 − sparsity`` and its costs
    as ``not logged``.
    """
    stat_cols = [c for c in columns(rows) if c not in BASE_COLUMNS]
    head = list(MARKDOWN_HEAD) + stat_cols
    lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for r in rows:
        cells = [r['task'], r['method'], r['impl'], r['knobs'] or '—', str(r['runs']),
                 _kept_cell(r), _cost_cell(r, 'attention_cost'), _cost_cell(r, 'model_cost'),
                 _accuracy_cell(r, 'val'), _accuracy_cell(r, 'test'),
                 _percent(r.get('majority_accuracy')), _fmt(r['num_params']),
                 _fmt(r['train_steps_per_second']), _fmt(r['eval_examples_per_second']),
                 _fmt(r['train_speed_vs_dense']), _fmt(r['eval_speed_vs_dense'])]
        cells += [_fmt(r.get(c)) for c in stat_cols]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (higher x, higher accuracy).

    Args:
      points: (x, accuracy) pairs; pass ``(-cost, accuracy)`` for a cost that is better lower.
    """
    front = []
    for i, (s, a) in enumerate(points):
        dominated = any((s2 >= s and a2 >= a) and (s2 > s or a2 > a)
                        for j, (s2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def point_labels(rows: list[dict]) -> list[str]:
    """Label of each row's point: the knobs that differ between the rows of its method and task.

    E.g. ``['', 'sparsity=0.9', 'sparsity=0.95']`` for dense and two DSA rows; a method with one
    row gets ``''`` (its knobs are in the table).
    """
    labels = []
    for row in rows:
        mates = [r for r in rows if (r['task'], r['method']) == (row['task'], row['method'])]
        knobs = row.get('_knob_values') or {}
        varying = [k for k in knobs
                   if len({json.dumps((r.get('_knob_values') or {}).get(k), sort_keys=True)
                           for r in mates}) > 1]
        if len({r.get('impl') for r in mates}) > 1:
            varying = ['impl'] + varying
        labels.append(' '.join(f'{k}={row.get("impl") if k == "impl" else knobs[k]}'
                               for k in varying))
    return labels


def plot_accuracy_vs_cost(rows: list[dict]):
    """Test accuracy against attention cost (Pareto front) and against kept fraction.

    One row of two panels per task. Each method is one colour; points are labelled with their
    varying knobs (:func:`point_labels`); error bars are the std over seeds (none: one seed).
    Dense is a dashed line, the majority-class accuracy a dotted one (when the runs recorded it).
    Rows without ``attention_cost`` (runs that logged only sparsity) appear only in the right panel.

    Args:
      rows: summary rows (:func:`summarize` or :func:`read_summary`).

    Returns:
      A ``matplotlib.figure.Figure``.
    """
    from matplotlib.figure import Figure

    tasks = sorted({r['task'] for r in rows})
    fig = Figure(figsize=(12, 4.6 * len(tasks)), dpi=110, layout='constrained')
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    labels = dict(zip(map(id, rows), point_labels(rows)))
    methods = list(dict.fromkeys(r['method'] for r in rows if r['method'] != 'dense'))
    colors = {m: f'C{i}' for i, m in enumerate(methods)}
    for task, (ax_cost, ax_kept) in zip(tasks, axes):
        mine = [r for r in rows if r['task'] == task]
        _draw_accuracy_panel(ax_cost, mine, 'attention_cost', labels, colors, front=True)
        _draw_accuracy_panel(ax_kept, mine, 'kept_fraction', labels, colors, front=False)
        ax_cost.set_xlabel('attention cost (executed attention ops / dense; lower is cheaper)')
        ax_kept.set_xlabel('kept fraction (valid query-key pairs whose exact probability is used)')
        for ax in (ax_cost, ax_kept):
            ax.set_ylabel('test accuracy (%)')
            ax.set_title(task, fontsize=10)
            ax.grid(alpha=0.3)
        missing = sum(r.get('attention_cost') is None for r in mine)
        if missing:
            ax_cost.text(0.01, 0.01, f'{missing} row(s) without a logged cost not shown',
                         transform=ax_cost.transAxes, fontsize=7, color='dimgray')
    handles, names = axes[0][0].get_legend_handles_labels()
    for h, n in zip(*axes[0][1].get_legend_handles_labels()):
        if n not in names:
            handles.append(h)
            names.append(n)
    fig.legend(handles, names, loc='outside right upper', fontsize=8,
               title='error bars: std over seeds\n(none: 1 seed)', title_fontsize=7)
    fig.suptitle('Accuracy against attention cost and kept fraction', fontsize=11)
    return fig


def _draw_accuracy_panel(ax, rows: list[dict], x_key: str, labels: dict, colors: dict,
                         front: bool) -> None:
    """One panel: reference lines, one series per method, labels, optionally the Pareto front."""
    for r in rows:
        if r['method'] == 'dense' and r.get('test_accuracy') is not None:
            ax.axhline(100 * r['test_accuracy'], color='black', ls='--', lw=1, zorder=1,
                       label='dense' + (f' ({r["impl"]})' if len(
                           [d for d in rows if d['method'] == 'dense']) > 1 else ''))
    majority = _mean([r.get('majority_accuracy') for r in rows])
    if majority is not None:
        ax.axhline(100 * majority, color='gray', ls=':', lw=1.2, label='majority class', zorder=1)
    shown = [r for r in rows if r.get(x_key) is not None and r.get('test_accuracy') is not None]
    for method in dict.fromkeys(r['method'] for r in shown):
        series = sorted((r for r in shown if r['method'] == method), key=lambda r: r[x_key])
        x = [r[x_key] for r in series]
        y = [100 * r['test_accuracy'] for r in series]
        err = [100 * (r.get('test_accuracy_std') or 0.0) for r in series]
        color = colors.get(method, 'black')
        ax.errorbar(x, y, yerr=err, marker='o' if method != 'dense' else 's', capsize=3,
                    color=color, label=method if method != 'dense' else 'dense (point)',
                    ls='-' if method != 'dense' else 'none')
        for r, xi, yi in zip(series, x, y):
            if labels.get(id(r)):
                ax.annotate(labels[id(r)], (xi, yi), textcoords='offset points', xytext=(6, 6),
                            fontsize=7, color=color, zorder=1.5,
                            bbox={'boxstyle': 'round,pad=0.15', 'fc': 'white', 'ec': 'none',
                                  'alpha': 0.9})
    if front and shown:
        points = [(-r[x_key], r['test_accuracy']) for r in shown]
        idx = pareto_front(points)
        ax.scatter([shown[i][x_key] for i in idx], [100 * shown[i]['test_accuracy'] for i in idx],
                   s=170, facecolors='none', edgecolors='crimson', linewidths=1.5,
                   label='Pareto front (cost)', zorder=5)
    ax.margins(x=0.08, y=0.12)


def curve_labels(records: list[dict]) -> list[str]:
    """Legend of each run: its method and the config fields that differ between the runs.

    Fields equal in every run (the common overrides) are left out, and so is the ``attention.``
    prefix; a method's own attention fields count only among the runs of that method (another
    method's defaults are not a difference): e.g. ``['dsa sparsity=0.9', 'dsa sparsity=0.95',
    'dense']``.
    """
    def differs(key, runs):
        return len({json.dumps(r['config'].get(key), sort_keys=True) for r in runs}) > 1

    keys = sorted({k for r in records for k in r['config']} - {'attention.name'})
    common = {k for k in keys
              if (not k.startswith('attention.') or k == 'attention.impl') and differs(k, records)}
    labels = []
    for r in records:
        mates = [m for m in records if m['method'] == r['method']]
        shown = [k for k in keys if k in r['config'] and (k in common or (
            k.startswith('attention.') and differs(k, mates)))]
        labels.append(' '.join([r['method'], *(f'{k.removeprefix("attention.")}={r["config"][k]}'
                                               for k in shown)]))
    return labels


def curves(records: list[dict]) -> list[dict]:
    """What the training-curve plot draws: per run its label, task, steps and accuracies."""
    return [{'label': label, 'task': r['task'], 'workdir': os.path.basename(r['workdir']),
             'steps': [s for s, _ in r['curve']], 'accuracy': [a for _, a in r['curve']]}
            for r, label in zip(records, curve_labels(records)) if r['curve']]


def plot_training_curves(runs: list[dict]):
    """Validation accuracy against steps, one line per run, the legend outside the axes.

    Args:
      runs: :func:`curves` entries (or the contents of a ``curves.json``).

    Returns:
      A ``matplotlib.figure.Figure``.
    """
    import matplotlib
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.8), dpi=110, layout='constrained')
    ax = fig.subplots()
    palette = 'tab10' if len(runs) <= 10 else 'tab20'
    colors = matplotlib.colormaps[palette].colors
    styles = ('-', '--', ':', '-.')
    for i, run in enumerate(runs):
        ax.plot(run['steps'], [100 * a for a in run['accuracy']], marker='.', label=run['label'],
                color=colors[i % len(colors)], ls=styles[i // len(colors) % len(styles)])
    ax.set_xlabel('training step')
    ax.set_ylabel('validation accuracy (%)')
    ax.set_title('Training curves (' + ', '.join(sorted({r['task'] for r in runs})) + ')',
                 fontsize=10)
    ax.grid(alpha=0.3)
    if 0 < len(runs) <= 24:
        fig.legend(loc='outside right upper', fontsize=7)
    return fig


def save_figure(fig, path: str) -> None:
    """Writes ``fig`` (a matplotlib Figure) as a PNG at ``path``."""
    fig.savefig(path, format='png')


def report(paths: list[str], out: str | None = None) -> list[dict]:
    """Writes :data:`SUMMARY_FILES` to ``out`` (default: the first path); returns the rows."""
    records = load_runs(find_runs(paths))
    rows = summarize(records)
    out = out or paths[0]
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, 'summary.csv'))
    write_json(rows, os.path.join(out, 'summary.json'))
    with open(os.path.join(out, 'summary.md'), 'w', encoding='utf-8') as f:
        f.write(markdown_table(rows))
    run_curves = curves(records)
    with open(os.path.join(out, 'curves.json'), 'w', encoding='utf-8') as f:
        json.dump(run_curves, f, indent=1)
        f.write('\n')
    save_figure(plot_accuracy_vs_cost(rows), os.path.join(out, 'accuracy_vs_cost.png'))
    save_figure(plot_training_curves(run_curves), os.path.join(out, 'training_curves.png'))
    return rows


@cli.command
def run(argv) -> int:
    """CLI body; returns the exit status."""
    paths = argv[1:]
    out = _OUT.value if flags.FLAGS.is_parsed() else None
    if not paths:
        raise cli.UsageError('give one or more run directories: '
                             'python -m lra_sparse.report RUN_DIR...')
    cli.check_output_dir(out or paths[0], '--out' if out else 'the output directory')
    rows = report(paths, out)
    out = out or paths[0]
    print(markdown_table(rows))
    print(f'wrote {", ".join(SUMMARY_FILES)} to {out}')
    return 0


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
