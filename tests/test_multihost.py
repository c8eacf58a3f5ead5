"""Multi-process runs: joining a run, per-process data, the local launcher, 2 hosts == 1 host.

The end-to-end tests start real processes on localhost, each with its own CPU devices, joined with
``jax.distributed`` and gloo CPU collectives, and compare them with one process holding as many
devices.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lra_sparse import data, distributed, launch, metrics, train
from lra_sparse.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
MAIN_ARGS = [
    f'--config={ROOT / "configs/listops.py"}:attention=dense,tiny,synthetic',
    '--config.max_length=16', '--config.model.num_layers=1', '--config.batch_size=8',
    f'--config.num_train_steps={STEPS}', '--config.warmup_steps=4', '--config.log_every_steps=1',
    f'--config.eval_every_steps={STEPS}', '--config.checkpoint_every_steps=2',
    '--config.data.synthetic_examples=44',
]  # 11 validation and test examples: the second evaluation batch is mostly padding


def test_resolve_reads_flags_before_environment():
    env = {'LRA_COORDINATOR_ADDRESS': 'node0:1234', 'LRA_NUM_PROCESSES': '4',
           'LRA_PROCESS_ID': '3'}
    assert distributed.resolve(distributed=False, environ=env) == distributed.ProcessGroup(
        'node0:1234', 4, 3)
    assert distributed.resolve(distributed=False, process_id=1, environ=env) == (
        distributed.ProcessGroup('node0:1234', 4, 1))
    assert distributed.resolve(distributed=False, environ={}) is None
    # --distributed alone: JAX detects everything (SLURM, Open MPI, TPU pods)
    assert distributed.resolve(distributed=True, environ={}) == distributed.ProcessGroup()


@pytest.mark.parametrize('kwargs, env, message', [
    ({'coordinator_address': 'localhost'}, {}, '--coordinator_address'),
    ({'coordinator_address': 'localhost:99999'}, {}, '--coordinator_address'),
    ({}, {'LRA_NUM_PROCESSES': 'two'}, 'LRA_NUM_PROCESSES'),
    ({'num_processes': 0}, {}, '--num_processes'),
    ({'num_processes': 2, 'process_id': 2}, {}, '--process_id'),
    ({}, {'LRA_NUM_PROCESSES': '2', 'LRA_PROCESS_ID': '-1'}, 'LRA_PROCESS_ID'),
])
def test_resolve_names_the_bad_flag_or_variable(kwargs, env, message):
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.resolve(distributed=False, environ=env, **kwargs)


def _indexed_split(num_examples: int, length: int = 3) -> dict:
    """A split whose example i has inputs[i, 0] == i + 1 (0 stays padding) and target i % 5."""
    inputs = np.zeros((num_examples, length), np.int32)
    inputs[:, 0] = np.arange(num_examples) + 1
    return {'inputs': inputs, 'targets': (np.arange(num_examples) % 5).astype(np.int32)}


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_split_every_training_batch(process_count):
    """Per step, the processes' batches concatenate to the one-process batch; resumable."""
    split, batch_size, steps = _indexed_split(13), 8, 6  # batches straddle epochs
    whole = data.train_batches(split, batch_size, seed=3)
    parts = [data.train_batches(split, batch_size, seed=3, process_index=p,
                                process_count=process_count) for p in range(process_count)]
    resumed = [data.train_batches(split, batch_size, seed=3, start_step=4, process_index=p,
                                  process_count=process_count) for p in range(process_count)]
    for step in range(steps):
        expected = next(whole)
        local = [next(it) for it in parts]
        for key in ('inputs', 'targets', 'weights'):
            assert all(len(b[key]) == batch_size // process_count for b in local)
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])
        if step >= 4:
            for it, b in zip(resumed, local):
                np.testing.assert_array_equal(next(it)['inputs'], b['inputs'])


@pytest.mark.parametrize('process_count', [2, 4])
def test_processes_evaluate_every_example_once(process_count):
    split, batch_size = _indexed_split(21), 8  # 3 batches, the last with 3 padding rows
    seen = []
    whole = list(data.eval_batches(split, batch_size))
    parts = [list(data.eval_batches(split, batch_size, process_index=p,
                                    process_count=process_count)) for p in range(process_count)]
    assert all(len(batches) == len(whole) for batches in parts)
    for i, expected in enumerate(whole):
        local = [batches[i] for batches in parts]
        for key in ('inputs', 'targets', 'weights'):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), expected[key])
        for b in local:
            seen.extend(b['inputs'][b['weights'] > 0, 0] - 1)
    assert sorted(seen) == list(range(21))


# ---------------------------------------------------------------------------------------------
# The launcher, with stand-in processes
# ---------------------------------------------------------------------------------------------

STAND_IN = textwrap.dedent('''
    import json, os, signal, sys, time
    process = int(os.environ['LRA_PROCESS_ID'])
    if process == 1 and sys.argv[2] == 'ignore_sigterm':
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    keys = ('LRA_COORDINATOR_ADDRESS', 'LRA_NUM_PROCESSES', 'XLA_FLAGS', 'JAX_PLATFORMS')
    with open(os.path.join(sys.argv[1], f'{process}.json'), 'w') as f:
        json.dump({'pid': os.getpid(), **{k: os.environ[k] for k in keys}}, f)
    if process == 1 and sys.argv[2] == 'fail':
        sys.exit(3)
    time.sleep(120)
''')


def _stand_in_reports(directory, count, timeout=60):
    deadline = time.time() + timeout
    while len(os.listdir(directory)) < count and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the last report be written
    return [json.loads((directory / f'{i}.json').read_text()) for i in range(count)]


def _is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_launcher_stops_every_process_when_one_fails(tmp_path):
    reports = tmp_path / 'reports'
    reports.mkdir()
    t_start = time.time()
    status = launch.launch([sys.executable, '-c', STAND_IN, str(reports), 'fail'], 3, 2,
                           log_dir=str(tmp_path / 'logs'), kill_after_seconds=5)
    assert status == 3 and time.time() - t_start < 60  # not the 120 s the others sleep
    found = _stand_in_reports(reports, 3)
    assert not any(_is_running(r['pid']) for r in found)
    assert len({r['LRA_COORDINATOR_ADDRESS'] for r in found}) == 1
    assert all(r['LRA_NUM_PROCESSES'] == '3' and r['JAX_PLATFORMS'] == 'cpu' for r in found)
    assert all('--xla_force_host_platform_device_count=2' in r['XLA_FLAGS'] for r in found)
    assert sorted(os.listdir(tmp_path / 'logs')) == ['process_1.log', 'process_2.log']


def test_launcher_forwards_sigterm_and_kills_what_ignores_it(tmp_path):
    reports = tmp_path / 'reports'
    reports.mkdir()
    script = ('import sys; from lra_sparse import launch; sys.exit(launch.launch(sys.argv[1:], '
              '2, 1, kill_after_seconds=2))')
    launcher = subprocess.Popen([sys.executable, '-c', script, sys.executable, '-c', STAND_IN,
                                 str(reports), 'ignore_sigterm'], cwd=ROOT)
    found = _stand_in_reports(reports, 2)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    assert not any(_is_running(r['pid']) for r in found)


def test_command_line_errors_name_the_flag():
    out = subprocess.run([sys.executable, '-m', 'lra_sparse.main', *MAIN_ARGS,
                          '--workdir=unused', '--num_processes=2', '--process_id=2'],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == (
        "error: --process_id=2 is not allowed: 0 .. 1 (--num_processes=2).")
    out = subprocess.run([sys.executable, '-m', 'lra_sparse.launch', '--num_processes=2'],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert out.stderr.startswith('error: give the arguments of lra_sparse.main after "--"')
    assert issubclass(distributed.DistributedSetupError, UserError)


# ---------------------------------------------------------------------------------------------
# Real runs: 2 processes x 2 CPU devices against 1 process x 4 devices
# ---------------------------------------------------------------------------------------------


def _cpu_env(devices):
    return {**os.environ, 'JAX_PLATFORMS': 'cpu',
            'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


@pytest.fixture(scope='module')
def one_process(tmp_path_factory):
    """The reference: one process with 4 CPU devices."""
    workdir = tmp_path_factory.mktemp('one_process')
    subprocess.run([sys.executable, '-m', 'lra_sparse.main', *MAIN_ARGS, f'--workdir={workdir}'],
                   cwd=ROOT, env=_cpu_env(4), check=True, capture_output=True, timeout=600)
    return workdir


def _launch(workdir, log_dir):
    return subprocess.run(
        [sys.executable, '-m', 'lra_sparse.launch', '--num_processes=2',
         '--devices_per_process=2', f'--process_log_dir={log_dir}', '--', *MAIN_ARGS,
         f'--workdir={workdir}'], cwd=ROOT, env=_cpu_env(1), capture_output=True, text=True,
        timeout=600)


def _assert_same_run(one, two):
    """Train losses at every step, final metrics and final parameters agree."""
    def losses(workdir):
        return {(e['step'], e['split']): e['loss'] for e in metrics.read_metrics(str(workdir))}
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) and len(a) == STEPS + 2  # every train step, validation, test
    np.testing.assert_allclose([b[k] for k in sorted(a)], [a[k] for k in sorted(a)], rtol=1e-5)
    results = [json.loads((w / 'results.json').read_text()) for w in (one, two)]
    assert results[0]['devices'] == results[1]['devices'] == 4
    for split in ('validation', 'test'):
        assert results[1][split]['num_examples'] == results[0][split]['num_examples'] == 11
        assert results[1][split]['accuracy'] == results[0][split]['accuracy']
    params = [train._leaf_names(train.restore_params(str(w)), strip_value=False)
              for w in (one, two)]
    assert params[0].keys() == params[1].keys()
    for name, value in params[0].items():
        np.testing.assert_allclose(params[1][name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def _assert_written_once(workdir):
    events = [(e['step'], e['split']) for e in metrics.read_metrics(str(workdir))]
    assert len(events) == len(set(events))
    assert [s for s, split in events if split == 'train'] == list(range(1, STEPS + 1))


def test_two_processes_train_like_one(one_process, tmp_path):
    workdir = tmp_path / 'two_processes'
    out = _launch(workdir, tmp_path / 'logs')
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'final validation accuracy' in out.stdout  # process 0's output reaches the terminal
    _assert_same_run(one_process, workdir)
    _assert_written_once(workdir)
    assert len(os.listdir(workdir / 'tensorboard')) == 1  # one events file: process 0's
    assert 'final validation accuracy' not in (tmp_path / 'logs/process_1.log').read_text()


def test_killed_processes_resume_to_the_same_result(one_process, tmp_path):
    workdir = tmp_path / 'killed'
    address = f'localhost:{launch.free_port()}'
    processes = [subprocess.Popen(
        [sys.executable, '-m', 'lra_sparse.main', *MAIN_ARGS, f'--workdir={workdir}'], cwd=ROOT,
        env=launch.process_environment(os.environ, coordinator_address=address, num_processes=2,
                                       process_id=i, devices_per_process=2),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    checkpoints, deadline = workdir / 'checkpoints', time.time() + 300
    while time.time() < deadline and not (
            checkpoints.is_dir() and any(d.isdigit() and int(d) >= 4 for d in
                                         os.listdir(checkpoints))):
        assert all(p.poll() is None for p in processes), 'a process ended before the kill'
        time.sleep(0.05)
    for p in processes:
        p.kill()
        p.wait()
    assert not (workdir / 'results.json').exists(), 'the run finished before it was killed'
    out = _launch(workdir, tmp_path / 'logs')
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((workdir / 'results.json').read_text())
    assert 4 <= results['resumed_from_step'] < STEPS
    _assert_same_run(one_process, workdir)
    _assert_written_once(workdir)


def test_locked_workdir_stops_every_process(tmp_path):
    """Process 0 finds the workdir in use: every process of the run stops with an error (started
    by hand, as under SLURM, so no launcher stops the others)."""
    from lra_sparse import workdir as workdir_lib  # noqa: PLC0415

    workdir = tmp_path / 'locked'
    address = f'localhost:{launch.free_port()}'
    with workdir_lib.RunDirectory(str(workdir)):  # this test process holds the lock
        processes = [subprocess.Popen(
            [sys.executable, '-m', 'lra_sparse.main', *MAIN_ARGS, f'--workdir={workdir}',
             f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}'],
            cwd=ROOT, env=_cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
        outs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [2, 2]
    assert 'is in use by pid' in outs[0][1]
    assert 'cannot be used by another process of this run' in outs[1][1]
    assert not workdir.exists()  # nothing written: the holder removed the directory it made
