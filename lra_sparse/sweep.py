"""Sweeps: run every point of a named sweep in its own sub-workdir, resumably, or print commands.

  python -m lra_sparse.sweep --config=configs/text.py:attention=dsa --sweep=sigma \
      --workdir=runs/dsa_sigma [--seeds=0,1,2] [--print_commands]

A sweep named NAME is, in order of lookup:
  1. a function ``sweep_NAME(add)`` in the config file, calling ``add(**overrides)`` once per point
     (dotted keys as ``add(**{'attention.sigma': 0.1})``; the key ``attention`` switches method);
  2. the attention method's registered sweep ``METHOD.sweeps[NAME]`` (overrides of
     ``config.attention``);
  3. ``compare``: dense and every registered method on the same task, seed, steps and data order,
     methods with a sparsity knob at each of ``--sparsities``.
Each point runs in ``WORKDIR/<point name>``; a point whose ``results.json`` exists is skipped, and
an interrupted point resumes from its checkpoint, so a killed sweep picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import sys

import ml_collections
import tqdm
from absl import flags

from lra_sparse import attention as attention_lib
from lra_sparse import cli, config_lib
from lra_sparse.errors import UserError

_CONFIG = flags.DEFINE_string('config', None, 'Config file and options (as for lra_sparse.main).')
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep name (see the module docstring).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent directory of the points.')
_SEEDS = flags.DEFINE_list('seeds', [], 'Repeat every point for these seeds (default: config).')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.5', '0.9'],
                                'Sparsity levels of the compare sweep for methods with the knob.')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print one command per point and exit.')
_SET = flags.DEFINE_multi_string('set', [], 'Extra override for every point: field=value.')


class SweepError(UserError):
    """A sweep that cannot be built (unknown name, bad override)."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: the attention method and the dotted overrides on top of the config."""

    attention: str
    overrides: tuple[tuple[str, object], ...]

    @property
    def name(self) -> str:
        """Directory-safe name, e.g. 'dsa__attention.sigma=0.1__seed=0'."""
        parts = [self.attention] + [f'{k}={v}' for k, v in self.overrides]
        return re.sub(r'[^A-Za-z0-9_.=,+-]', '-', '__'.join(parts))


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location('lra_sweep_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_spec(spec: str) -> tuple[str, dict]:
    path, _, arg = spec.partition(':')
    return path, config_lib.parse_arg(arg)


def sweep_points(spec: str, name: str, *, seeds=(), sparsities=(0.5, 0.9),
                 extra: dict | None = None) -> list[Point]:
    """The points of sweep ``name`` for the config ``spec`` ('configs/x.py:options')."""
    path, options = _split_spec(spec)
    method = options.get('attention', 'dense')
    raw: list[tuple[str, dict]] = []
    module = _load_module(path)
    if hasattr(module, f'sweep_{name}'):
        def add(**overrides):
            overrides = dict(overrides)
            raw.append((overrides.pop('attention', method), overrides))
        getattr(module, f'sweep_{name}')(add)
    elif name in attention_lib.get_method(method).sweeps:
        for point in attention_lib.get_method(method).sweeps[name]:
            raw.append((method, {f'attention.{k}': v for k, v in point.items()}))
    elif name == 'compare':
        for m_name in attention_lib.REGISTRY:
            fields = config_lib.attention_config(m_name, 'reference', 'train_and_eval')
            if 'sparsity' in fields and m_name != 'dense':
                raw.extend((m_name, {'attention.sparsity': float(s)}) for s in sparsities)
            else:
                raw.append((m_name, {}))
    else:
        available = [n[len('sweep_'):] for n in dir(module) if n.startswith('sweep_')]
        available += list(attention_lib.get_method(method).sweeps) + ['compare']
        raise SweepError(f'--sweep={name!r} is not defined for {spec}: available sweeps are '
                         f'{", ".join(dict.fromkeys(available))}.')
    points = []
    for m_name, overrides in raw:
        overrides = {**overrides, **(extra or {})}
        for seed in seeds or [None]:
            full = {**overrides, **({'seed': int(seed)} if seed is not None else {})}
            points.append(Point(m_name, tuple(sorted(full.items()))))
    return points


def point_config(spec: str, point: Point) -> ml_collections.ConfigDict:
    """The validated config of one point."""
    path, options = _split_spec(spec)
    options['attention'] = point.attention
    arg = ','.join(k if v is True else f'{k}={v}' for k, v in options.items())
    config = config_lib.apply_overrides(config_lib.load(f'{path}:{arg}'), point.overrides)
    config_lib.validate(config)
    return config


def point_command(spec: str, point: Point, workdir: str) -> str:
    """The shell command that runs one point with lra_sparse.main."""
    path, options = _split_spec(spec)
    options['attention'] = point.attention
    arg = ','.join(k if v is True else f'{k}={v}' for k, v in options.items())
    args = [sys.executable, '-m', 'lra_sparse.main', f'--config={path}:{arg}',
            f'--workdir={os.path.join(workdir, point.name)}']
    args += [f'--config.{k}={v}' for k, v in point.overrides]
    return shlex.join(args)


def run_sweep(spec: str, points: list[Point], workdir: str) -> list[dict]:
    """Runs the points in sequence, skipping finished ones; returns their results."""
    from lra_sparse import train  # heavy import only when training

    configs = [point_config(spec, p) for p in points]  # validate every point before any compute
    results = []
    bar = tqdm.tqdm(total=len(points), desc='sweep', unit='run', position=1)
    for point, config in zip(points, configs):
        point_dir = os.path.join(workdir, point.name)
        if os.path.exists(os.path.join(point_dir, 'results.json')):
            bar.update(1)
            continue
        bar.set_postfix_str(point.name)
        results.append(train.train_and_evaluate(config, point_dir))
        bar.update(1)
    bar.close()
    return results


@cli.command
def run(argv) -> int:
    """CLI body; returns the exit status."""
    del argv
    if not (_CONFIG.value and _SWEEP.value and _WORKDIR.value):
        raise cli.UsageError('--config, --sweep and --workdir are required')
    points = sweep_points(_CONFIG.value, _SWEEP.value, seeds=_SEEDS.value,
                          sparsities=[float(s) for s in _SPARSITIES.value],
                          extra=dict(map(config_lib.parse_override, _SET.value)))
    if _PRINT.value:
        for p in points:
            print(point_command(_CONFIG.value, p, _WORKDIR.value))
        return 0
    run_sweep(_CONFIG.value, points, _WORKDIR.value)
    print(f'sweep {_SWEEP.value}: {len(points)} points in {_WORKDIR.value}; '
          f'summarise with: python -m lra_sparse.report {_WORKDIR.value}')
    return 0


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
