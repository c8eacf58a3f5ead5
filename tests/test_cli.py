"""Command lines: user errors are one line on stderr and exit status 2, in every command."""

import os
import subprocess
import sys

import pytest

from lra_sparse import cli, report, sweep
from lra_sparse.errors import ConfigError, UserError


def test_command_turns_user_errors_into_one_line_and_status_2(capsys):
    @cli.command
    def body(argv):
        raise ConfigError(f'config.seed={argv[1]!r} is not allowed: an integer.')

    assert body(['prog', 'x']) == 2
    assert capsys.readouterr().err == "error: config.seed='x' is not allowed: an integer.\n"


def test_command_returns_the_body_status_and_lets_bugs_through():
    assert cli.command(lambda argv: 0)(['prog']) == 0
    assert cli.command(lambda argv: 3)(['prog']) == 3

    @cli.command
    def buggy(argv):
        raise KeyError('a bug, not a user error')

    with pytest.raises(KeyError):
        buggy(['prog'])


def test_every_command_error_class_is_a_user_error():
    for error in (sweep.SweepError, report.ReportError, cli.UsageError):
        assert issubclass(error, UserError)


def _cli(module, *args):
    return subprocess.run([sys.executable, '-m', f'lra_sparse.{module}', *args],
                          capture_output=True, text=True,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.parametrize('module,args,needle', [
    ('main', ['--mode=describe'], '--config is required'),
    ('main', ['--config=configs/listops.py:tiny'], '--workdir is required in train mode'),
    ('sweep', ['--config=configs/listops.py:tiny', '--sweep=nope', '--workdir=unused'],
     'available sweeps are'),
    ('sweep', ['--config=configs/listops.py:tiny'], '--config, --sweep and --workdir'),
    ('report', ['no/such/dir'], "'no/such/dir' is not a directory"),
    ('report', [], 'give one or more run directories'),
    ('throughput', ['--config=configs/listops.py:tiny', '--config.model.emb_dm=8'],
     'config.model.emb_dm does not exist: did you mean model.emb_dim'),
    ('throughput', ['--config=configs/listops.py:tiny', '--config.model.learn_pos_emb=maybe'],
     "config.model.learn_pos_emb='maybe' is not allowed"),
    ('throughput', ['--steps=3'], '--config is required'),
    ('sweep', ['--config=configs/listops.py:tiny', '--sweep=learning_rate', '--workdir=unused',
               '--config.learning_rate=0.2'], "--config.learning_rate sets a field that sweep"),
])
def test_cli_user_error_is_one_line_and_status_2(module, args, needle):
    out = _cli(module, *args)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2, out.stderr
    assert len(lines) == 1 and lines[0].startswith('error: ') and needle in lines[0], out.stderr


def test_verbosity_1_adds_the_traceback():
    out = _cli('report', 'no/such/dir', '--verbosity=1')
    assert out.returncode == 2
    assert 'Traceback' in out.stderr and 'ReportError' in out.stderr
    assert out.stderr.splitlines()[-1] == "error: 'no/such/dir' is not a directory"


@pytest.mark.parametrize('args,overrides,rest', [
    (['--config.seed=3', '--mode=x'], [('seed', '3')], ['--mode=x']),
    (['--config.schedule', 'constant', 'pos'], [('schedule', 'constant')], ['pos']),
    (['-config.model.learn_pos_emb', '--workdir=w'], [('model.learn_pos_emb', 'True')],
     ['--workdir=w']),
    (['--noconfig.model.learn_pos_emb'], [('model.learn_pos_emb', 'False')], []),
    (['--config.init_from=a=b', '--config=c.py'], [('init_from', 'a=b')], ['--config=c.py']),
    (['--', '--config.seed=3'], [], ['--', '--config.seed=3']),
])
def test_config_overrides_are_split_from_the_other_flags(args, overrides, rest):
    got_rest, got = cli._split_overrides(['prog', *args])
    assert got == overrides and got_rest == ['prog', *rest]


@pytest.mark.parametrize('module', ['main', 'sweep', 'throughput'])
def test_help_lists_the_config_options(module):
    from lra_sparse import attention

    out = _cli(module, '--help')
    text = ' '.join(out.stdout.split())
    assert f'attention={"|".join(attention.REGISTRY)}' in text, out.stdout
    for option in ('impl=reference|xla|pallas', 'apply=train_and_eval|eval_only', 'tiny',
                   'synthetic', '--config.<field>=value'):
        assert option in text, option


def test_sweep_print_commands_use_the_config_syntax(tmp_path):
    out = _cli('sweep', '--config=configs/listops.py:tiny', '--sweep=learning_rate',
               f'--workdir={tmp_path}', '--config.num_train_steps=7', '--seeds=0,1',
               '--print_commands')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4
    assert f'--workdir={tmp_path}/dense__learning_rate=0.05__seed=1' in lines[1]
    assert '--config.num_train_steps=7' in lines[1] and '--config.seed=1' in lines[1]
