"""Sweeps: run every point of a named sweep in its own sub-workdir, resumably, or print commands.

  python -m lra_sparse.sweep --config=configs/text.py:attention=dsa --sweep=sigma \
      --workdir=runs/dsa_sigma [--seeds=0,1,2] [--config.num_train_steps=400] [--print_commands]

``--config=path:options`` and ``--config.<field>=value`` are those of ``lra_sparse.main``; the
overrides apply to every point. A sweep named NAME is, in order of lookup:
  1. a function ``sweep_NAME(add)`` in the config file, calling ``add(**overrides)`` once per point
     (dotted keys as ``add(**{'attention.sigma': 0.1})``; the key ``attention`` switches method);
  2. the attention method's registered sweep ``METHOD.sweeps[NAME]`` (overrides of
     ``config.attention``);
  3. ``compare``: dense (its reference implementation, the oracle) and every registered method on
     the same task, seed, steps and data order,
     methods with a sparsity knob at each of ``--sparsities``.
Each point runs in ``WORKDIR/<point name>``, named by its method and the fields that differ between
the points, without the ``attention.`` prefix (e.g. ``dsa__sigma=0.1``). A point whose
``results.json`` is valid and whose ``config.json`` equals its config is skipped; any other point
runs (an interrupted one resumes from its checkpoint, a torn ``results.json`` is written again), so
a killed sweep picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable, Mapping

import ml_collections
import tqdm
from absl import flags

from lra_sparse import attention as attention_lib
from lra_sparse import cli, config_lib
from lra_sparse import results as results_lib
from lra_sparse.errors import UserError

_CONFIG = cli.define_config(help_text='Config file and options of every point')
_SWEEP = flags.DEFINE_string('sweep', None, 'Sweep name (see the module docstring).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Parent directory of the points.')
_SEEDS = flags.DEFINE_list('seeds', [], 'Repeat every point for these seeds (default: config).')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.5', '0.9'],
                                'Sparsity levels of the compare sweep for methods with the knob.')
_PRINT = flags.DEFINE_bool('print_commands', False, 'Print one command per point and exit.')

_MISSING = object()


class SweepError(UserError):
    """A sweep that cannot be built (unknown name, bad seeds, an override of a swept field)."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One run of a sweep: the attention method and the dotted overrides on top of the config.

    Attributes:
      attention: the method (registry name).
      overrides: every ``(field, value)`` of the point (swept fields, seed, common overrides).
      name: directory-safe name: the method and the fields that differ between the sweep's
        points, e.g. ``'dsa__sigma=0.1__seed=0'``.
    """

    attention: str
    overrides: tuple[tuple[str, object], ...]
    name: str = ''


def _load_module(path: str):
    """The config file as a module (for its ``sweep_NAME`` functions); it loads as a config."""
    config_lib.load(path)  # a missing or broken file: one line naming it
    spec = importlib.util.spec_from_file_location('lra_sweep_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _split_spec(spec: str) -> tuple[str, dict]:
    path, _, arg = spec.partition(':')
    return path, config_lib.parse_arg(arg)


def sweep_points(spec: str, name: str, *, seeds: Iterable = (), sparsities: Iterable = (0.5, 0.9),
                 extra: Mapping[str, object] | Iterable[tuple[str, object]] | None = None
                 ) -> list[Point]:
    """The points of sweep ``name`` for the config ``spec`` ('configs/x.py:options').

    Args:
      spec: the config file and options of every point.
      name: the sweep (see the module docstring).
      seeds: repeat every point for these seeds (integers or their text); empty: the config's.
      sparsities: levels of the ``compare`` sweep (numbers or their text).
      extra: overrides of every point (``--config.<field>=value``); they may not set a field the
        sweep varies.

    Raises:
      SweepError: an unknown sweep, seeds or sparsities that are not numbers, an override of a
        swept field, or identical points.
    """
    path, options = _split_spec(spec)
    raw = _sweep_overrides(spec, path, options, name, _numbers(sparsities, float, '--sparsities'))
    seeds = _numbers(seeds, int, '--seeds')
    if seeds:
        raw = [(method, {**overrides, 'seed': seed}) for method, overrides in raw for seed in seeds]
    extra = dict(extra.items() if isinstance(extra, Mapping) else extra or ())
    swept = sorted({key for _, overrides in raw for key in overrides} & set(extra))
    if swept:
        raise SweepError(f'--config.{swept[0]} sets a field that sweep {name!r} varies: drop it, '
                         f'or use a sweep that leaves {swept[0]} alone')
    names = _point_names(raw)
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise SweepError(f'sweep {name!r} has identical points ({duplicated[0]} twice): give each '
                         'seed once')
    return [Point(method, tuple(sorted({**overrides, **extra}.items())), point_name)
            for (method, overrides), point_name in zip(raw, names)]


def _sweep_overrides(spec: str, path: str, options: dict, name: str,
                     sparsities: list[float]) -> list[tuple[str, dict]]:
    """(method, overrides) of every point of sweep ``name``, before seeds and common overrides."""
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
                raw.extend((m_name, {'attention.sparsity': s}) for s in sparsities)
            elif m_name == 'dense' and options.get('impl', 'reference') != 'reference':
                # the oracle: dense xla (a fused call) has no attention dropout, no kernel exists
                raw.append((m_name, {'attention.impl': 'reference'}))
            else:
                raw.append((m_name, {}))
    else:
        available = [n[len('sweep_'):] for n in dir(module) if n.startswith('sweep_')]
        available += list(attention_lib.get_method(method).sweeps) + ['compare']
        raise SweepError(f'--sweep={name!r} is not defined for {spec}: available sweeps are '
                         f'{", ".join(dict.fromkeys(available))}.')
    return raw


def _numbers(values: Iterable, kind: type, flag: str) -> list:
    """``values`` (numbers or their text) as ints or floats; anything else raises SweepError."""
    values = list(values)
    try:
        return [kind(str(v).strip()) for v in values]
    except ValueError:
        what = 'integers' if kind is int else 'numbers'
        raise SweepError(f'{flag}={",".join(map(str, values))!r} is not allowed: comma-separated '
                         f'{what}, e.g. {flag}={"0,1,2" if kind is int else "0.5,0.9"}') from None


def _point_names(raw: list[tuple[str, dict]]) -> list[str]:
    """Directory names: the method and ``field=value`` of each field that differs between points.

    Fields equal in every point are left out, and so is the ``attention.`` prefix (kept only when
    another varying field has the same short name): e.g. ``dsa__sparsity=0.9__seed=1``.
    """
    keys = sorted({key for _, overrides in raw for key in overrides})
    varying = [k for k in keys
               if len({repr(overrides.get(k, _MISSING)) for _, overrides in raw}) > 1]
    short = {k: k.removeprefix('attention.') for k in varying}
    clashes = {n for n in short.values() if list(short.values()).count(n) > 1}
    short = {k: k if n in clashes else n for k, n in short.items()}
    names = ['__'.join([method] + [f'{short[k]}={overrides[k]}' for k in varying
                                   if k in overrides])
             for method, overrides in raw]
    return [re.sub(r'[^A-Za-z0-9_.=,+-]', '-', n) for n in names]


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
    """Runs the points in sequence, skipping finished ones; returns the results of those run.

    A point is finished when its results.json is valid and its config.json holds its config.
    """
    from lra_sparse import train  # heavy import only when training

    configs = [point_config(spec, p) for p in points]  # validate every point before any compute
    cli.check_output_dir(workdir, '--workdir')
    for point in points:
        cli.check_output_dir(os.path.join(workdir, point.name), 'the point directory')
    results = []
    bar = tqdm.tqdm(total=len(points), desc='sweep', unit='run', position=1)
    for point, config in zip(points, configs):
        point_dir = os.path.join(workdir, point.name)
        if results_lib.is_finished(point_dir) and _saved_config_is(point_dir, config):
            bar.update(1)
            continue
        bar.set_postfix_str(point.name)
        results.append(train.train_and_evaluate(config, point_dir))
        bar.update(1)
    bar.close()
    return results


def _saved_config_is(workdir: str, config: ml_collections.ConfigDict) -> bool:
    """Whether ``workdir/config.json`` has every field of ``config`` with the same value."""
    try:
        with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    wanted = json.loads(config.to_json_best_effort())
    return isinstance(saved, dict) and all(saved.get(k) == v for k, v in wanted.items())


@cli.command
def run(argv) -> int:
    """CLI body; returns the exit status."""
    cli.no_arguments(argv)
    if not (_CONFIG.spec and _SWEEP.value and _WORKDIR.value):
        raise cli.UsageError('--config, --sweep and --workdir are required')
    points = sweep_points(_CONFIG.spec, _SWEEP.value, seeds=_SEEDS.value,
                          sparsities=_SPARSITIES.value, extra=_CONFIG.overrides)
    if _PRINT.value:
        for p in points:
            print(point_command(_CONFIG.spec, p, _WORKDIR.value))
        return 0
    run_sweep(_CONFIG.spec, points, _WORKDIR.value)
    print(f'sweep {_SWEEP.value}: {len(points)} points in {_WORKDIR.value}; '
          f'summarise with: python -m lra_sparse.report {_WORKDIR.value}')
    return 0


def main() -> None:
    """Console entry point."""
    cli.main(run)


if __name__ == '__main__':
    main()
