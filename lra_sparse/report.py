"""Reports: aggregate any set of workdirs into a table and plots.

  python -m lra_sparse.report RUN_DIR [RUN_DIR ...] [--out=DIR]

Finds every run (a folder with ``results.json``) under the given directories and writes to ``--out``
(default: the first directory): ``summary.csv`` and ``summary.md`` (one row per configuration: task,
method, knobs, achieved sparsity, validation and test accuracy as mean ± std over seeds, params,
steps/s, method statistics), ``accuracy_vs_sparsity.png`` (one curve per method, dense as a
reference line, the Pareto front marked) and ``training_curves.png`` (validation accuracy against
steps; the legend names the method and the config fields that differ between the runs).

A run whose ``results.json`` is torn or incomplete is named in one warning line and left out; with
no readable run at all the report stops with one line.
"""

from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np
from absl import flags

from lra_sparse import cli, metrics
from lra_sparse import results as results_lib
from lra_sparse.errors import UserError

_OUT = flags.DEFINE_string('out', None, 'Output directory (default: the first run directory).')

# Columns every row has, in order; method statistics follow.
BASE_COLUMNS = ('task', 'method', 'knobs', 'runs', 'sparsity', 'val_accuracy', 'val_accuracy_std',
                'test_accuracy', 'test_accuracy_std', 'num_params', 'steps_per_second')
_NOT_KNOBS = ('name', 'impl')


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
    val, test = results['validation'], results['test']
    stats = {k: v for k, v in test.items()
             if '/' not in k and k not in ('loss', 'accuracy', 'num_examples')}
    events = _read_events(workdir)
    train_events = [e for e in events if e.get('split') == 'train']
    speeds = [e['steps_per_second'] for e in train_events[1:] if 'steps_per_second' in e]
    config = _read_config(workdir)
    return {
        'workdir': workdir, 'task': results['task'], 'method': results['attention'],
        'knobs': ' '.join(f'{k}={v}' for k, v in knobs.items()),
        'seed': config.get('seed'), 'sparsity': test.get('sparsity', 0.0),
        'val_accuracy': val.get('accuracy'), 'test_accuracy': test.get('accuracy'),
        'num_params': results.get('num_params'),
        'steps_per_second': float(np.median(speeds)) if speeds else results.get(
            'train_steps_per_second'),
        'stats': stats,
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
    """Groups runs that differ only in seed; mean ± std of accuracies, mean of the rest."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r['task'], r['method'], r['knobs']), []).append(r)
    rows = []
    for (task, method, knobs), runs in groups.items():
        val = [r['val_accuracy'] for r in runs]
        test = [r['test_accuracy'] for r in runs]
        row = {'task': task, 'method': method, 'knobs': knobs, 'runs': len(runs),
               'sparsity': _mean([r['sparsity'] for r in runs]),
               'val_accuracy': _mean(val), 'val_accuracy_std': float(np.std(val)),
               'test_accuracy': _mean(test), 'test_accuracy_std': float(np.std(test)),
               'num_params': runs[0]['num_params'],
               'steps_per_second': _mean([r['steps_per_second'] for r in runs])}
        for key in sorted({k for r in runs for k in r['stats']} - {'sparsity'}):
            row[key] = _mean([r['stats'].get(key) for r in runs])
        rows.append(row)
    rows.sort(key=lambda r: (r['task'], r['method'] != 'dense', r['method'], r['sparsity']))
    return rows


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def columns(rows: list[dict]) -> list[str]:
    """Base columns, then every statistic that appears in any row."""
    extra = sorted({k for r in rows for k in r} - set(BASE_COLUMNS))
    return list(BASE_COLUMNS) + extra


def write_csv(rows: list[dict], path: str) -> None:
    """summary.csv: one row per configuration."""
    cols = columns(rows)
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        for r in rows:
            writer.writerow({c: r.get(c) for c in cols})


def _fmt(value) -> str:
    if value is None:
        return ''
    if isinstance(value, float):
        return f'{value:.4g}'
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    """summary.md body: accuracies as mean ± std (percent)."""
    head = ['task', 'method', 'knobs', 'runs', 'sparsity', 'val acc (%)', 'test acc (%)',
            'params', 'steps/s']
    stat_cols = [c for c in columns(rows) if c not in BASE_COLUMNS]
    lines = ['| ' + ' | '.join(head + stat_cols) + ' |', '|' + '---|' * (len(head) + len(
        stat_cols))]
    for r in rows:
        cells = [r['task'], r['method'], r['knobs'] or '—', str(r['runs']), _fmt(r['sparsity']),
                 f'{100 * r["val_accuracy"]:.2f} ± {100 * r["val_accuracy_std"]:.2f}',
                 f'{100 * r["test_accuracy"]:.2f} ± {100 * r["test_accuracy_std"]:.2f}',
                 _fmt(r['num_params']), _fmt(r['steps_per_second'])]
        cells += [_fmt(r.get(c)) for c in stat_cols]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated in (higher sparsity, higher accuracy)."""
    front = []
    for i, (s, a) in enumerate(points):
        dominated = any((s2 >= s and a2 >= a) and (s2 > s or a2 > a)
                        for j, (s2, a2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def plot_accuracy_vs_sparsity(rows: list[dict], path: str) -> None:
    """One curve per method (test accuracy against achieved sparsity), dense line, Pareto front."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    tasks = sorted({r['task'] for r in rows})
    for r in rows:
        if r['method'] == 'dense':
            ax.axhline(100 * r['test_accuracy'], color='black', ls='--', lw=1,
                       label=f'dense ({r["task"]})' if len(tasks) > 1 else 'dense')
    methods = [m for m in dict.fromkeys(r['method'] for r in rows) if m != 'dense']
    for method in methods:
        mine = sorted((r for r in rows if r['method'] == method), key=lambda r: r['sparsity'])
        x = [100 * r['sparsity'] for r in mine]
        y = [100 * r['test_accuracy'] for r in mine]
        err = [100 * r['test_accuracy_std'] for r in mine]
        ax.errorbar(x, y, yerr=err, marker='o', capsize=3, label=method)
    pts = [(r['sparsity'], r['test_accuracy']) for r in rows]
    front = pareto_front(pts)
    ax.scatter([100 * pts[i][0] for i in front], [100 * pts[i][1] for i in front], s=160,
               facecolors='none', edgecolors='crimson', linewidths=1.5, label='Pareto front',
               zorder=5)
    ax.set_xlabel('achieved attention sparsity (% of valid query-key pairs not computed)')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'Accuracy vs sparsity — {", ".join(tasks)}')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curve_labels(records: list[dict]) -> list[str]:
    """Legend of each run: its method and the config fields that differ between the runs.

    Fields equal in every run (the common overrides) are left out, and so is the ``attention.``
    prefix: e.g. ``['dsa sparsity=0.9', 'dsa sparsity=0.95', 'dense']``.
    """
    keys = sorted({k for r in records for k in r['config']} - {'attention.name'})
    varying = [k for k in keys
               if len({json.dumps(r['config'].get(k), sort_keys=True) for r in records}) > 1]
    labels = []
    for r in records:
        knobs = [f'{k.removeprefix("attention.")}={r["config"][k]}' for k in varying
                 if k in r['config']]
        labels.append(' '.join([r['method'], *knobs]))
    return labels


def plot_training_curves(records: list[dict], path: str) -> None:
    """Validation accuracy against steps, one line per run."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    curves = [(r, label) for r, label in zip(records, curve_labels(records)) if r['curve']]
    for r, label in curves:
        steps, accuracies = zip(*r['curve'])
        ax.plot(steps, [100 * a for a in accuracies], marker='.', label=label)
    ax.set_xlabel('training step')
    ax.set_ylabel('validation accuracy (%)')
    ax.set_title('Training curves')
    ax.grid(alpha=0.3)
    if 0 < len(curves) <= 16:
        ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(paths: list[str], out: str | None = None) -> list[dict]:
    """Writes summary.csv, summary.md and the two PNGs; returns the summary rows."""
    records = load_runs(find_runs(paths))
    rows = summarize(records)
    out = out or paths[0]
    os.makedirs(out, exist_ok=True)
    write_csv(rows, os.path.join(out, 'summary.csv'))
    with open(os.path.join(out, 'summary.md'), 'w') as f:
        f.write(markdown_table(rows))
    plot_accuracy_vs_sparsity(rows, os.path.join(out, 'accuracy_vs_sparsity.png'))
    plot_training_curves(records, os.path.join(out, 'training_curves.png'))
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
    print(f'wrote summary.csv, summary.md, accuracy_vs_sparsity.png, training_curves.png to {out}')
    return 0


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
