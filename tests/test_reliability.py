"""Runs as records: provenance, the workdir lock, kill-safe outputs, the non-finite guard and
checkpoint fallback, with faults injected into real training subprocesses.

Every run here is the tiny synthetic ListOps config (length 64, 2 layers, 8 steps). The killed
runs are compared with one uninterrupted run of the same config: the same metric events in the
same order with the same values, the same results and the same final parameters.
"""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lra_sparse import config_lib, files, metrics, train, workdir
from lra_sparse.errors import DataFormatError

SPEC = 'configs/listops.py:attention=dense,tiny,synthetic'
OVERRIDES = {'max_length': 64, 'model.num_layers': 2, 'batch_size': 8,
             'data.synthetic_examples': 64, 'num_eval_steps': 1, 'num_train_steps': 8,
             'log_every_steps': 1, 'eval_every_steps': 4, 'checkpoint_every_steps': 2,
             'max_checkpoints_to_keep': 3}
TIMING_KEYS = {'steps_per_second', 'examples_per_second'}


def make_config(**changes):
    return config_lib.apply_overrides(config_lib.load(SPEC), {**OVERRIDES, **changes})


def cli_command(workdir_path, **changes):
    flags = [f'--config.{k}={v}' for k, v in {**OVERRIDES, **changes}.items()]
    return [sys.executable, '-m', 'lra_sparse.main', f'--config={SPEC}', *flags,
            f'--workdir={workdir_path}']


def cli_env(pause_at=None, marker=None):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    env.pop(files.PAUSE_ENV, None)
    if pause_at:
        env.update({files.PAUSE_ENV: pause_at, files.PAUSE_MARKER_ENV: str(marker)})
    return env


def run_cli(workdir_path, **changes):
    return subprocess.run(cli_command(workdir_path, **changes), env=cli_env(),
                          capture_output=True, text=True, timeout=300)


def start_paused(workdir_path, point, tmp_path):
    """A CLI run that blocks at pause point ``point``; returns it once it is there."""
    marker = tmp_path / f'paused-{point.replace(":", "_")}'
    proc = subprocess.Popen(cli_command(workdir_path), env=cli_env(point, marker),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f'run ended before {point}: {proc.stderr.read()[-2000:]}')
        assert time.time() < deadline, f'{point} not reached'
        time.sleep(0.05)
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def snapshot(path):
    """{relative path: bytes} of every file under ``path``."""
    out = {}
    for root, _, names in os.walk(path):
        for name in names:
            full = os.path.join(root, name)
            with open(full, 'rb') as f:
                out[os.path.relpath(full, path)] = f.read()
    return out


def comparable(events):
    return [{k: v for k, v in e.items() if k not in TIMING_KEYS} for e in events]


def final_params(path):
    return {'/'.join(k): np.asarray(v) for k, v in _flatten(train.restore_params(str(path)))}


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, (*prefix, k))
        else:
            yield (*prefix, k), v


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
    """The uninterrupted run: its events, results and final parameters."""
    path = tmp_path_factory.mktemp('baseline') / 'run'
    results = train.train_and_evaluate(make_config(), str(path))
    return {'events': comparable(metrics.read_metrics(str(path))), 'results': results,
            'params': final_params(path), 'path': path}


def assert_same_as_baseline(path, baseline, end_of_shorter_run=None):
    """Same events (no duplicate, none missing), results and parameters as the baseline.

    ``end_of_shorter_run``: the run was first finished at this step and then continued, so it
    also holds that step's final validation and test events (once each).
    """
    events = metrics.read_metrics(str(path))
    if end_of_shorter_run:
        expected = {(e['step'], e['split']) for e in baseline['events']}
        extra = [(e['step'], e['split']) for e in events if (e['step'], e['split']) not in expected]
        assert sorted(extra) in ([(end_of_shorter_run, 'test')],
                                 [(end_of_shorter_run, 'test'), (end_of_shorter_run, 'validation')])
        events = [e for e in events if (e['step'], e['split']) in expected]
    assert comparable(events) == baseline['events']
    with open(path / 'results.json') as f:
        results = json.load(f)
    for split in ('validation', 'test'):
        for key in ('loss', 'accuracy', 'num_examples'):
            assert results[split][key] == baseline['results'][split][key], (split, key)
    assert results['num_train_steps'] == baseline['results']['num_train_steps']
    params = final_params(path)
    assert params.keys() == baseline['params'].keys()
    for key, value in baseline['params'].items():
        np.testing.assert_array_equal(params[key], value, err_msg=key)
    assert not (path / 'lock').exists()


# ---------------------------------------------------------------------------------------------
# Provenance
# ---------------------------------------------------------------------------------------------


def test_fields_absent_on_one_side_count_only_when_not_default():
    new = workdir.config_as_json(make_config())
    defaults = workdir.field_defaults('dense')
    saved = json.loads(json.dumps(new))
    saved['data']['text_fields_from_another_version'] = 1
    del saved['data']['listops_max_depth']  # absent, and the new config holds the default (10)
    assert defaults['data.listops_max_depth'] == new['data']['listops_max_depth']
    changes = workdir.config_changes(saved, new, defaults)
    assert list(changes) == ['data.text_fields_from_another_version']
    del saved['data']['listops_num_train']  # absent, the new config holds 6000 (default 96000)
    del saved['data']['text_fields_from_another_version']
    changes = workdir.config_changes(saved, new, defaults)
    assert changes == {'data.listops_num_train': (workdir.ABSENT, 6000)}
    assert workdir.refused_changes(changes, 0) == [
        'data.listops_num_train (absent) -> 6000']


def test_changed_config_is_refused_listing_fields_and_workdir_unchanged(tmp_path, baseline):
    path = tmp_path / 'run'
    train.train_and_evaluate(make_config(num_train_steps=2), str(path))
    before = snapshot(path)
    changed = make_config(num_train_steps=2, learning_rate=0.1, seed=3,
                          **{'model.emb_dim': 32, 'model.qkv_dim': 32})
    with pytest.raises(workdir.ConfigChangedError) as error:
        train.train_and_evaluate(changed, str(path))
    message = str(error.value)
    assert '\n' not in message and 'use a new workdir' in message
    for text in ('learning_rate 0.05 -> 0.1', 'model.emb_dim 64 -> 32', 'model.qkv_dim 64 -> 32',
                 'seed 0 -> 3'):
        assert text in message
    with pytest.raises(workdir.ConfigChangedError, match=r'num_train_steps 2 -> 1 \(the run has '
                                                         r'reached step 2\)'):
        train.train_and_evaluate(make_config(num_train_steps=1), str(path))
    with pytest.raises(workdir.ConfigChangedError, match='data_dir None -> '):
        train.train_and_evaluate(make_config(num_train_steps=2, data_dir=str(tmp_path)),
                                 str(path))
    assert snapshot(path) == before


def test_finished_run_returns_its_results_and_changes_nothing(tmp_path, baseline):
    path = tmp_path / 'run'
    first = train.train_and_evaluate(make_config(num_train_steps=2), str(path))
    before = snapshot(path)
    again = train.train_and_evaluate(make_config(num_train_steps=2), str(path))
    assert again == json.loads(json.dumps(first))  # throughput and wall time kept
    assert snapshot(path) == before


def test_changeable_fields_continue_and_are_recorded(tmp_path, baseline):
    path = tmp_path / 'run'
    train.train_and_evaluate(make_config(num_train_steps=4), str(path))
    results = train.train_and_evaluate(
        make_config(num_train_steps=8, eval_every_steps=4, max_checkpoints_to_keep=5),
        str(path))
    assert results['resumed_from_step'] == 4
    with open(path / 'config_history.jsonl') as f:
        history = [json.loads(line) for line in f]
    assert [h['event'] for h in history] == ['started', 'resumed']
    assert history[0]['changes'] == {} and history[1]['start_step'] == 4
    assert history[1]['changes'] == {'max_checkpoints_to_keep': [3, 5],
                                     'num_train_steps': [4, 8]}
    assert {'command', 'host', 'pid', 'versions', 'time'} <= history[1].keys()
    with open(path / 'config.json') as f:
        assert json.load(f)['num_train_steps'] == 8
    # Steps 1-4 then 5-8 in two runs: the same run as the uninterrupted one.
    assert_same_as_baseline(path, baseline, end_of_shorter_run=4)


def test_evaluate_mode_keeps_to_its_own_workdir(tmp_path, baseline):
    trained = baseline['path']
    before = snapshot(trained)
    config = make_config(init_from=str(trained))
    with pytest.raises(workdir.WorkdirError, match='holds a training run'):
        train.evaluate_checkpoint(config, str(trained))
    assert snapshot(trained) == before
    path = tmp_path / 'eval'
    first = train.evaluate_checkpoint(config, str(path))
    evaluated = snapshot(path)
    assert train.evaluate_checkpoint(config, str(path)) == json.loads(json.dumps(first))
    assert snapshot(path) == evaluated
    with pytest.raises(workdir.WorkdirError, match='holds an evaluation'):
        train.train_and_evaluate(make_config(init_from=str(trained)), str(path))
    assert snapshot(path) == evaluated


def test_cli_refuses_a_changed_config_in_one_line(tmp_path, baseline):
    path = tmp_path / 'run'
    train.train_and_evaluate(make_config(num_train_steps=2), str(path))
    before = snapshot(path)
    done = run_cli(path, num_train_steps=2, **{'model.num_heads': 2})
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and 'model.num_heads 4 -> 2' in lines[0], done.stderr
    assert snapshot(path) == before


# ---------------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------------


def test_lock_is_exclusive_and_a_stale_one_is_taken_over(tmp_path, caplog):
    holder = workdir.WorkdirLock(str(tmp_path))
    holder.acquire()
    with pytest.raises(workdir.WorkdirLockedError, match=rf'in use by pid {os.getpid()} on host'):
        workdir.WorkdirLock(str(tmp_path)).acquire()
    holder.release()
    assert not (tmp_path / 'lock').exists()
    # A lock file that no process holds: left by a killed run.
    (tmp_path / 'lock').write_text(json.dumps({'pid': 2 ** 22 + 7, 'host': 'elsewhere',
                                               'start': '2026-01-01T00:00:00'}))
    taker = workdir.WorkdirLock(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        taker.acquire()
    assert 'taking over the lock left by pid 4194311 on host elsewhere' in caplog.text
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
    taker.release()


def test_second_run_is_refused_and_a_killed_holder_is_taken_over(tmp_path, baseline):
    path = tmp_path / 'run'
    first = start_paused(path, 'step:3', tmp_path)
    second = run_cli(path)
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert f'is in use by pid {first.pid} on host' in lines[0]
    kill(first)
    assert json.loads((path / 'lock').read_text())['pid'] == first.pid  # left behind
    third = run_cli(path)
    assert third.returncode == 0, third.stderr
    assert f'taking over the lock left by pid {first.pid}' in third.stderr
    assert_same_as_baseline(path, baseline)


# ---------------------------------------------------------------------------------------------
# Kills
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize('point', ['checkpoint_save:4', 'replace:config.json',
                                   'replace:results.json'])
def test_kill_at_a_point_then_resume_matches_an_uninterrupted_run(point, tmp_path, baseline):
    path = tmp_path / 'run'
    kill(start_paused(path, point, tmp_path))
    if point == 'replace:results.json':  # every event is written, results.json not yet
        assert not (path / 'results.json').exists()
        assert [e['split'] for e in metrics.read_metrics(str(path))][-1] == 'test'
    done = run_cli(path)
    assert done.returncode == 0, done.stderr
    assert_same_as_baseline(path, baseline)


def test_kill_inside_the_metrics_rewrite_loses_nothing(tmp_path, baseline):
    path = tmp_path / 'run'
    first = start_paused(path, 'step:6', tmp_path)
    while not (path / 'checkpoints' / '4').exists():  # the save of step 4 is asynchronous
        time.sleep(0.05)
    time.sleep(0.5)
    kill(first)
    # Keep only checkpoint 4 so the resume must drop the events of steps 5 and 6.
    for name in os.listdir(path / 'checkpoints'):
        if name != '4' and name.isdigit():
            import shutil
            shutil.rmtree(path / 'checkpoints' / name)
    written = (path / 'metrics.jsonl').read_bytes()
    assert max(e['step'] for e in metrics.read_metrics(str(path))) == 6
    kill(start_paused(path, 'replace:metrics.jsonl', tmp_path))
    assert (path / 'metrics.jsonl').read_bytes() == written  # the old file is intact
    assert (path / 'metrics.jsonl.tmp').exists()
    done = run_cli(path)
    assert done.returncode == 0, done.stderr
    assert not (path / 'metrics.jsonl.tmp').exists()
    assert_same_as_baseline(path, baseline)


def test_random_kills_resume_to_the_uninterrupted_run(tmp_path, baseline):
    path = tmp_path / 'run'
    rng = np.random.default_rng(13)
    reached = 0
    for _ in range(2):
        proc = subprocess.Popen(cli_command(path, checkpoint_every_steps=1), env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        target = reached + int(rng.integers(1, 4))
        deadline = time.time() + 240
        while proc.poll() is None and time.time() < deadline:  # until it saved past `target`
            if max(workdir.checkpoint_steps(str(path)), default=0) >= target:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))
        kill(proc)
        reached = max(workdir.checkpoint_steps(str(path)), default=0)
    done = run_cli(path, checkpoint_every_steps=1)
    assert done.returncode == 0, done.stderr
    with open(path / 'config_history.jsonl') as f:
        starts = [json.loads(line)['start_step'] for line in f]
    assert starts[0] == 0 < starts[1] and starts == sorted(set(starts))  # killed mid-training
    assert_same_as_baseline(path, baseline)


def test_torn_metrics_line_is_repaired(tmp_path, baseline, caplog):
    path = tmp_path / 'run'
    train.train_and_evaluate(make_config(num_train_steps=6), str(path))
    with open(path / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 7, "split": "tra')
    with caplog.at_level(logging.WARNING):
        assert metrics.read_metrics(str(path))[-1]['step'] == 6
    assert 'metrics.jsonl: its last line is incomplete' in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(make_config(), str(path))
    assert 'metrics.jsonl: repaired its incomplete last line' in caplog.text
    assert_same_as_baseline(path, baseline, end_of_shorter_run=6)


def test_damaged_metrics_line_names_the_file_and_line(tmp_path):
    (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "split": "train"}\nnot json\n'
                                            '{"step": 2, "split": "train"}\n')
    with pytest.raises(DataFormatError, match=r'metrics.jsonl line 2 is not a JSON metrics'):
        metrics.read_metrics(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Checkpoint fallback
# ---------------------------------------------------------------------------------------------


def corrupt(step_dir):
    for root, _, names in os.walk(step_dir):
        for name in names:
            with open(os.path.join(root, name), 'wb') as f:
                f.write(b'\x00garbage')


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, baseline, caplog):
    path = tmp_path / 'run'
    train.train_and_evaluate(make_config(num_train_steps=6), str(path))
    corrupt(path / 'checkpoints' / '6')
    with caplog.at_level(logging.WARNING):
        results = train.train_and_evaluate(make_config(), str(path))
    assert results['resumed_from_step'] == 4
    lines = [r.getMessage() for r in caplog.records if 'cannot be restored' in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith('checkpoint 6 in ')
    assert lines[0].endswith('resuming from checkpoint 4') and '\n' not in lines[0]
    assert (path / 'unreadable_checkpoints' / '6').is_dir()
    assert_same_as_baseline(path, baseline)


def test_no_intact_checkpoint_stops_in_one_line(tmp_path):
    path = tmp_path / 'run'
    train.train_and_evaluate(make_config(num_train_steps=4), str(path))
    for step in ('2', '4'):
        corrupt(path / 'checkpoints' / step)
    before = snapshot(path)
    with pytest.raises(train.CheckpointError) as error:
        train.train_and_evaluate(make_config(), str(path))
    message = str(error.value)
    assert '\n' not in message and 'no checkpoint in' in message
    assert 'step 4: ' in message and 'step 2: ' in message
    assert snapshot(path) == before


# ---------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------


def test_guard_names_the_first_non_finite_step_and_the_last_finite_loss():
    window = train._TrainWindow(start_step=10)
    values = [(2.5, 1.0, 3.0), (2.25, 1.0, 3.0), (2.0, float('inf'), 3.0), (float('nan'), 1, 3)]
    for loss, grad_norm, param_norm in values:
        window.add({'total_loss': np.float32(loss), 'grad_norm': np.float32(grad_norm),
                    'param_norm': np.float32(param_norm), 'loss_sum': np.float32(loss),
                    'correct': np.float32(0), 'count': np.float32(1)})
    window.checked = 1  # step 11 was checked already
    with pytest.raises(train.NonFiniteError) as error:
        window.check_finite()
    assert str(error.value).startswith(
        'training diverged at step 13: non-finite gradient norm inf; the last finite loss was 2 '
        'at step 13. The run stopped at step 14 and wrote no checkpoint')
    window = train._TrainWindow(start_step=0)
    window.add({'total_loss': np.float32(np.nan), 'grad_norm': np.float32(np.nan),
                'param_norm': np.float32(1)})
    with pytest.raises(train.NonFiniteError, match='step 1: non-finite loss nan, gradient norm '
                                                   'nan; no loss of this run was finite'):
        window.summary(1)


def test_diverging_run_stops_at_the_first_bad_step_and_saves_nothing_non_finite(tmp_path):
    stops = []
    for log_every_steps in (1, 4):  # 1: checked and logged every step; 4: checked in windows
        path = tmp_path / f'log{log_every_steps}'
        config = make_config(learning_rate=1e30, log_every_steps=log_every_steps,
                             checkpoint_every_steps=1, eval_every_steps=1000)
        with pytest.raises(train.NonFiniteError) as error:
            train.train_and_evaluate(config, str(path))
        message = str(error.value)
        assert '\n' not in message and 'last finite loss' in message
        step = int(message.split('training diverged at step ')[1].split(':')[0])
        stops.append(step)
        saved = workdir.checkpoint_steps(str(path))
        assert saved and max(saved) < step
        assert all(np.isfinite(v).all() for v in final_params(path).values())
        events = [e for e in metrics.read_metrics(str(path)) if e['split'] == 'train']
        assert all(e['step'] < step and np.isfinite(e['loss']) for e in events)
        assert not (path / 'lock').exists() and not (path / 'results.json').exists()
    assert stops[0] == stops[1] and 1 < stops[0] < OVERRIDES['num_train_steps']
    # With a log line every step, the run stopped at the first step it could not log.
    assert max(e['step'] for e in metrics.read_metrics(str(tmp_path / 'log1'))) == stops[0] - 1
