"""The training loop: schedule, every task end to end, learning, resume, data parallelism."""

import functools
import json
import os
import subprocess
import sys
import textwrap

import chex
import jax
import numpy as np
import pytest
from conftest import tiny_config

from lra_sparse import config_lib, data, metrics, train
from lra_sparse import results as results_lib

SMOKE = {'num_train_steps': 3, 'log_every_steps': 1, 'eval_every_steps': 2,
         'checkpoint_every_steps': 2, 'batch_size': 4, 'num_eval_steps': 1,
         'model.num_layers': 1, 'data.synthetic_examples': 16}


def test_schedule_matches_reference():
    config = tiny_config('listops', **{'learning_rate': 0.05, 'warmup_steps': 1000})
    lr = train.learning_rate_fn(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(1000)), 0.05 / np.sqrt(1000), rtol=1e-6)
    np.testing.assert_allclose(float(lr(5000)), 0.05 / np.sqrt(5000), rtol=1e-6)
    np.testing.assert_allclose(float(lr(500)), 0.05 * 0.5 / np.sqrt(1000), rtol=1e-6)
    image = tiny_config('image', **{'learning_rate': 5e-4, 'warmup_steps': 175,
                                    'steps_per_cycle': 35000})
    lr = train.learning_rate_fn(image)
    np.testing.assert_allclose(float(lr(175)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(175 + 17500)), 2.5e-4, rtol=1e-4)


@pytest.mark.parametrize('task', list(data.REGISTRY))
def test_every_task_trains_and_writes_outputs(task, tmp_path):
    config = tiny_config(task, 'synthetic' if task != 'listops' else '', **SMOKE)
    if task == 'listops':
        config.data.listops_num_train, config.data.listops_num_val = 64, 16
        config.data.listops_num_test = 16
    results = train.train_and_evaluate(config, str(tmp_path))
    for name in ('config.json', 'metrics.jsonl', 'results.json'):
        assert (tmp_path / name).exists(), name
    assert os.listdir(tmp_path / 'tensorboard')
    assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '3']
    events = metrics.read_metrics(str(tmp_path))
    assert {e['split'] for e in events} == {'train', 'validation', 'test'}
    train_events = [e for e in events if e['split'] == 'train']
    assert [e['step'] for e in train_events] == [1, 2, 3]
    for e in train_events:
        assert np.isfinite(e['loss']) and 'sparsity' in e and 'learning_rate' in e
    assert results['num_params'] > 0 and np.isfinite(results['test']['loss'])
    saved = json.loads((tmp_path / 'results.json').read_text())
    assert saved['attention'] == 'dense' and saved['implementation'] == 'reference'
    assert saved['seed'] == config.seed and saved['device_kind'] and saved['command']
    assert saved['versions']['jax'] == jax.__version__ and saved['versions']['flax']
    assert 'git_commit' in saved and 'git_dirty' in saved


def test_log_without_a_terminal_shows_each_evaluation_as_it_happens(tmp_path):
    """stdout is a pipe: plain lines, and validation accuracy appears before the run ends."""
    command = [sys.executable, '-m', 'lra_sparse.main',
               '--config=configs/listops.py:attention=dense,tiny,synthetic',
               '--config.max_length=32', '--config.model.num_layers=1',
               '--config.data.synthetic_examples=64', '--config.batch_size=8',
               '--config.num_train_steps=6', '--config.eval_every_steps=3',
               '--config.log_every_steps=3', f'--workdir={tmp_path}']
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert '\r' not in done.stdout + done.stderr  # no progress-bar fragments in a log
    first_eval = next(i for i, line in enumerate(lines)
                      if line.startswith('[listops/dense] step 3/6 validation loss')
                      and ' accuracy ' in line and ' ex/s' in line)
    assert lines[first_eval - 1] == '[listops/dense] step 3/6 evaluating validation'
    assert any(line.startswith('[listops/dense] step 3/6 train loss') for line in lines)
    final = next(i for i, line in enumerate(lines) if line.startswith('final validation accuracy'))
    assert first_eval < final


def _one_step(config, batch, num_microbatches):
    """(state after one train step, its metrics) from the same init."""
    info = data.load_task(config).info
    graphdef, state, tx = train.init_state(config, info)
    step = jax.jit(functools.partial(train.train_step, graphdef=graphdef, tx=tx,
                                     lr_fn=train.learning_rate_fn(config),
                                     num_microbatches=num_microbatches))
    return step(state, batch)


@pytest.mark.parametrize('attention', ['dense', 'dsa'])
def test_microbatches_give_the_same_update_as_one_pass(attention):
    """Gradient accumulation over 4 microbatches == one pass (no dropout), padding rows included.

    DSA adds an auxiliary loss, which must be averaged (not summed) over the microbatches.
    """
    config = tiny_config('listops', f'synthetic,attention={attention}', **{
        'model.num_layers': 1, 'model.dropout_rate': 0.0, 'model.attention_dropout_rate': 0.0,
        'batch_size': 8, 'data.synthetic_examples': 16, 'schedule': 'constant',
        'learning_rate': 1e-3})  # a learning rate > 0 at step 0, so the update is compared
    rng = np.random.default_rng(0)
    length = config.max_length
    inputs = rng.integers(1, 15, size=(8, length)).astype(np.int32)
    inputs[:, length // 2:] = 0  # padded positions
    batch = {'inputs': inputs, 'targets': rng.integers(0, 10, size=8).astype(np.int32),
             'weights': np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)}  # 2 padding examples
    one_state, one = _one_step(config, batch, 1)
    four_state, four = _one_step(config, batch, 4)
    for key in ('total_loss', 'aux_loss', 'loss_sum', 'correct', 'count', 'grad_norm'):
        np.testing.assert_allclose(four[key], one[key], rtol=2e-5, atol=1e-7, err_msg=key)
    if attention == 'dsa':
        assert float(one['aux_loss']) > 0
    chex.assert_trees_all_close(four_state.params, one_state.params, rtol=2e-5, atol=1e-6)
    initial = _flatten_state(train.init_state(config, data.task_info(config))[1])
    for a, start in zip(_flatten_state(one_state), initial, strict=True):
        assert np.isfinite(a).all() and not np.array_equal(a, start)  # a real update happened


def _flatten_state(state):
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]


def _final_params(workdir):
    return {k: np.asarray(v) for k, v in
            results_lib.flatten(train.restore_params(workdir)).items()}


def test_resume_reproduces_uninterrupted_run(tmp_path):
    base = {**SMOKE, 'num_train_steps': 6, 'checkpoint_every_steps': 3, 'eval_every_steps': 3}
    straight = tiny_config('text', 'synthetic', **base)
    train.train_and_evaluate(straight, str(tmp_path / 'straight'))
    first = tiny_config('text', 'synthetic', **{**base, 'num_train_steps': 3})
    train.train_and_evaluate(first, str(tmp_path / 'resumed'))
    results = train.train_and_evaluate(straight, str(tmp_path / 'resumed'))
    assert results['resumed_from_step'] == 3
    a, b = _final_params(str(tmp_path / 'straight')), _final_params(str(tmp_path / 'resumed'))
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, atol=1e-7, err_msg=key)
    steps = [e['step'] for e in metrics.read_metrics(str(tmp_path / 'resumed'))
             if e['split'] == 'train']
    assert steps == sorted(set(steps)) == list(range(1, 7))


KILL_SCRIPT = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, 'tests')
    from conftest import tiny_config
    from lra_sparse import train
    config = tiny_config('text', 'synthetic', num_train_steps=int(sys.argv[2]),
                         checkpoint_every_steps=2, eval_every_steps=1000, log_every_steps=1,
                         batch_size=4, num_eval_steps=1, **{'model.num_layers': 1,
                         'data.synthetic_examples': 16})
    train.train_and_evaluate(config, sys.argv[1])
''')


def test_killed_run_resumes_to_the_same_step_count(tmp_path):
    workdir = str(tmp_path / 'run')
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.Popen([sys.executable, '-c', KILL_SCRIPT, workdir, '400'], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(workdir, 'checkpoints')
    import time
    deadline = time.time() + 240
    while time.time() < deadline:
        if os.path.isdir(ckpt_dir) and any(d.isdigit() and int(d) >= 4
                                           for d in os.listdir(ckpt_dir)):
            break
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    subprocess.run([sys.executable, '-c', KILL_SCRIPT, workdir, '12'], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = json.loads(open(os.path.join(workdir, 'results.json')).read())
    assert results['num_train_steps'] == 12 and results['resumed_from_step'] >= 4
    assert '12' in os.listdir(ckpt_dir)
    _final_params(workdir)  # the latest checkpoint restores cleanly


MULTI_DEVICE_SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, 'tests')
    import jax
    from conftest import tiny_config
    from lra_sparse import metrics, train
    config = tiny_config('text', 'synthetic', num_train_steps=3, log_every_steps=1,
                         eval_every_steps=3, checkpoint_every_steps=3, batch_size=8,
                         num_eval_steps=2, **{'model.num_layers': 1,
                         'data.synthetic_examples': 32, 'model.dropout_rate': 0.0,
                         'model.attention_dropout_rate': 0.0,
                         'num_microbatches': int(sys.argv[2])})
    train.train_and_evaluate(config, sys.argv[1])
    losses = [e['loss'] for e in metrics.read_metrics(sys.argv[1]) if e['split'] == 'train']
    print(json.dumps({'devices': jax.device_count(), 'losses': losses}))
''')


def _run_with_devices(n, workdir, num_microbatches=1):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
    out = subprocess.run([sys.executable, '-c', MULTI_DEVICE_SCRIPT, workdir,
                          str(num_microbatches)], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_four_devices_match_one(tmp_path):
    one = _run_with_devices(1, str(tmp_path / 'one'))
    four = _run_with_devices(4, str(tmp_path / 'four'))
    assert one['devices'] == 1 and four['devices'] == 4
    np.testing.assert_allclose(one['losses'], four['losses'], rtol=1e-5)
    # gradient accumulation composes with data parallelism: 2 microbatches of 4 over 4 devices
    four_accumulated = _run_with_devices(4, str(tmp_path / 'four_micro'), num_microbatches=2)
    np.testing.assert_allclose(one['losses'], four_accumulated['losses'], rtol=1e-5)


def test_evaluate_mode_applies_a_method_to_a_trained_run(tmp_path):
    base = {**SMOKE, 'num_train_steps': 2, 'eval_every_steps': 2}
    dense = tiny_config('text', 'synthetic', **base)
    trained = train.train_and_evaluate(dense, str(tmp_path / 'dense'))
    same = tiny_config('text', 'synthetic', init_from=str(tmp_path / 'dense'), **base)
    again = train.evaluate_checkpoint(same, str(tmp_path / 'dense_eval'))
    assert again['mode'] == 'evaluate' and again['num_train_steps'] == 0
    np.testing.assert_allclose(again['test']['loss'], trained['test']['loss'], rtol=1e-6)
    dfss = tiny_config('text', 'synthetic,attention=dfss', init_from=str(tmp_path / 'dense'),
                       **base)
    results = train.evaluate_checkpoint(dfss, str(tmp_path / 'dfss_eval'))
    assert results['attention'] == 'dfss' and np.isfinite(results['test']['loss'])
    assert results['validation']['sparsity'] > 0.4
    events = metrics.read_metrics(str(tmp_path / 'dfss_eval'))
    assert [(e['step'], e['split']) for e in events] == [(2, 'validation'), (2, 'test')]


def test_init_from_a_run_of_another_shape_fails_before_compute(tmp_path):
    base = {**SMOKE, 'num_train_steps': 1, 'eval_every_steps': 1, 'checkpoint_every_steps': 1}
    train.train_and_evaluate(tiny_config('text', 'synthetic', **base), str(tmp_path / 'a'))
    wider = tiny_config('text', 'synthetic', init_from=str(tmp_path / 'a'),
                        **{**base, 'model.emb_dim': 32})
    with pytest.raises(config_lib.ConfigError, match=r'init_from.*model\.emb_dim'):
        config_lib.validate(wider)
    missing = tiny_config('text', 'synthetic', init_from=str(tmp_path / 'nope'), **base)
    with pytest.raises(config_lib.ConfigError, match='config.json and checkpoints'):
        train.evaluate_checkpoint(missing, str(tmp_path / 'b'))
