"""Bad inputs to the real command lines: exit status 2, one line naming the culprit, no change.

Each case runs ``python -m lra_sparse.<command> ...`` in a subprocess, in its own directory that
holds an existing finished run (``{run}``: config.json, metrics.jsonl, results.json, a checkpoint
file) and whatever files the case prepares (config files, data files). The case must exit with
status 2 and print exactly one line on stderr, ``error: ...``, holding the expected text (the
field, flag or file); every file of the case directory must keep its bytes and modification time,
and no file may appear or vanish (the data cache lives in the case directory too).

Every case is its own process running the command as ``python -m`` does; to keep ~90 cases fast,
the processes are forked from one driver that imported jax and the package once (a test checks
that a forked run gives what ``python -m`` gives). The selected cases run once per module; each
test then checks its own case. Progress bars and INFO log lines printed before the error (data
loading) are not counted as lines of the error.
"""

import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from lra_sparse.data import listops, retrieval

TINY = '--config=configs/listops.py:tiny'


# ---------------------------------------------------------------------------------------------
# Case preparation: files written into the case directory before the command runs
# ---------------------------------------------------------------------------------------------


def _write(path, body: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(body.encode() if isinstance(body, str) else body)


def _finished_run(run: str) -> None:
    """A finished run as training leaves it (the files a command must not touch)."""
    results = {'task': 'listops', 'attention': 'dense', 'num_params': 10,
               'attention_config': {'name': 'dense', 'impl': 'reference',
                                    'apply': 'train_and_eval'},
               'validation': {'accuracy': 0.3, 'loss': 1.0}, 'test': {'accuracy': 0.3, 'loss': 1.0}}
    _write(os.path.join(run, 'results.json'), json.dumps(results))
    _write(os.path.join(run, 'config.json'), json.dumps({'task': 'listops', 'seed': 0}))
    _write(os.path.join(run, 'metrics.jsonl'),
           json.dumps({'step': 4, 'split': 'validation', 'accuracy': 0.3}) + '\n')
    _write(os.path.join(run, 'checkpoints', '4', 'state'), b'\x00' * 64)


def _listops_release(tmp: str, test_body: bytes) -> None:
    """An LRA-release ListOps folder in tmp/data whose test split holds ``test_body``."""
    folder = os.path.join(tmp, 'data', 'listops-1000')
    for split, filename in listops.RELEASE_FILES.items():
        body = f'{listops.HEADER}\n[MAX 1 2 ]\t2\n[MIN 3 4 ]\t3\n'.encode()
        _write(os.path.join(folder, filename), test_body if split == 'test' else body)


def _retrieval_files(tmp: str, validation_body: bytes) -> None:
    for split, name in retrieval.FILES.items():
        body = validation_body if split == 'validation' else b'1\ta\tb\tx\ty\n'
        _write(os.path.join(tmp, 'data', 'tsv_data', name), body)


def _noise(n: int) -> bytes:
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()


def _tar_gz(path: str, members: dict[str, bytes]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    _write(path, buffer.getvalue())


def _read_only(path: str) -> None:
    """Makes the directory ``path`` unwritable, also for root (immutable attribute)."""
    os.chmod(path, 0o555)
    if os.access(path, os.W_OK):  # root ignores permission bits
        subprocess.run(['chattr', '+i', path], check=False, capture_output=True)
    if os.access(path, os.W_OK):  # e.g. a file system without the immutable attribute
        pytest.skip(f'cannot make {path} read-only on this file system as this user')


def _writable_again(path: str) -> None:
    if os.path.isdir(path):
        subprocess.run(['chattr', '-i', path], check=False, capture_output=True)
        os.chmod(path, 0o755)


PREPARE = {
    'syntax_error': lambda t: _write(f'{t}/bad_config.py', 'def get_config(arg):\n  return {\n'),
    'no_get_config': lambda t: _write(f'{t}/bad_config.py', 'CONFIG = 1\n'),
    'workdir_file': lambda t: _write(f'{t}/afile', 'not a directory'),
    'read_only': lambda t: _read_only(f'{t}/run'),
    'listops_non_utf8': lambda t: _listops_release(t, b'Source\tTarget\n[MAX 1 2 ]\t2\n\xff\t3\n'),
    'listops_empty': lambda t: _listops_release(t, b''),
    'listops_header_only': lambda t: _listops_release(t, b'Source\tTarget\n'),
    'retrieval_empty': lambda t: _retrieval_files(t, b'\n\n'),
    'retrieval_bad_line': lambda t: _retrieval_files(t, b'1.0\ta\tb\tx\ty\tz\n'),
    'retrieval_bad_label': lambda t: _retrieval_files(t, b'nan\ta\tb\tx\ty\n'),
    'retrieval_missing': lambda t: os.makedirs(f'{t}/data'),
    'imdb_garbage': lambda t: _write(f'{t}/data/aclImdb_v1.tar.gz', _noise(5000)),
    'cifar_garbage': lambda t: _write(f'{t}/data/cifar-10-binary.tar.gz', _noise(5000)),
    'imdb_no_split': lambda t: _tar_gz(f'{t}/data/aclImdb_v1.tar.gz',
                                       {'aclImdb/train/neg/0_1.txt': b'Bad film.'}),
    'empty_runs': lambda t: os.makedirs(f'{t}/runs'),
    'torn_results': lambda t: (_finished_run(f'{t}/runs/a'),
                               _write(f'{t}/runs/a/results.json', '{"task": "listops", "att')),
    'results_no_keys': lambda t: (_finished_run(f'{t}/runs/a'),
                                  _write(f'{t}/runs/a/results.json', '{"task": "listops"}')),
    'results_list': lambda t: (_finished_run(f'{t}/runs/a'),
                               _write(f'{t}/runs/a/results.json', '[]')),
    'out_dir': lambda t: os.makedirs(f'{t}/outdir'),
}

# (case id, command, arguments, text the one line must hold, preparation or None).
# {tmp} is the case directory, {run} the finished run inside it.
CASES = [
    # Config options after ':' and the config file
    ('unknown_attention', 'main', [f'{TINY},attention=nope', '--workdir={run}'],
     "config.attention.name='nope' is not allowed: registered methods are dense", None),
    ('misspelled_option', 'main', ['--config=configs/listops.py:tinyy', '--workdir={run}'],
     "config option 'tinyy' is not allowed: the options are attention=", None),
    ('option_value_typo', 'main', ['--config=configs/listops.py:atention=dsa', '--workdir={run}'],
     "config option 'atention=dsa' is not allowed", None),
    ('duplicated_option', 'main',
     ['--config=configs/listops.py:attention=dsa,attention=dense', '--workdir={run}'],
     "config option 'attention' is given twice ('attention=dsa' and 'attention=dense')", None),
    ('duplicated_flag_option', 'main', [f'{TINY},tiny', '--workdir={run}'],
     "config option 'tiny' is given twice", None),
    ('unknown_impl', 'main', [f'{TINY},impl=cuda', '--workdir={run}'],
     "config.attention.impl='cuda' is not allowed", None),
    ('unknown_apply', 'main', [f'{TINY},apply=sometimes', '--workdir={run}'],
     "config.attention.apply='sometimes' is not allowed", None),
    ('missing_config_file', 'main', ['--config=configs/nope.py:tiny', '--workdir={run}'],
     "config file 'configs/nope.py' does not exist", None),
    ('config_syntax_error', 'main', ['--config={tmp}/bad_config.py', '--workdir={run}'],
     "bad_config.py' has a syntax error at line 2", 'syntax_error'),
    ('config_without_get_config', 'main', ['--config={tmp}/bad_config.py', '--workdir={run}'],
     "bad_config.py' defines no get_config", 'no_get_config'),
    # --config.<field> names and values
    ('unknown_field', 'main', [TINY, '--config.foo=1', '--workdir={run}'],
     'config.foo does not exist: the fields are', None),
    ('misspelled_field', 'main', [TINY, '--config.model.emb_dm=8', '--workdir={run}'],
     'config.model.emb_dm does not exist: did you mean model.emb_dim', None),
    ('field_of_another_method', 'main', [TINY, '--config.attention.sparsity=0.5',
                                         '--workdir={run}'],
     'config.attention.sparsity does not exist', None),
    ('int_field_text', 'main', [TINY, '--config.seed=a', '--workdir={run}'],
     "config.seed='a' is not allowed: an integer", None),
    ('int_field_fraction', 'main', [TINY, '--config.model.num_layers=0.5', '--workdir={run}'],
     "config.model.num_layers='0.5' is not allowed: an integer", None),
    ('float_field_text', 'main', [TINY, '--config.learning_rate=fast', '--workdir={run}'],
     "config.learning_rate='fast' is not allowed: a number", None),
    ('bool_field_text', 'main', [TINY, '--config.model.learn_pos_emb=maybe', '--workdir={run}'],
     "config.model.learn_pos_emb='maybe' is not allowed", None),
    ('group_as_value', 'main', [TINY, '--config.model=3', '--workdir={run}'],
     "config.model='3' is not allowed: one value per field", None),
    ('field_without_value', 'main', [TINY, '--config.seed', '--workdir={run}'],
     '--config.seed needs a value', None),
    ('negated_int_field', 'main', [TINY, '--noconfig.seed', '--workdir={run}'],
     '--noconfig.seed needs a value', None),
    ('override_without_config', 'main', ['--config.seed=1', '--workdir={run}'],
     '--config.seed needs --config=path:options', None),
    # Field values (validation before any data)
    ('grad_clip_negative', 'main', [TINY, '--config.grad_clip_norm=-1', '--workdir={run}'],
     'config.grad_clip_norm=-1.0 is not allowed: a finite number > 0, or None (None disables '
     'clipping)', None),
    ('grad_clip_zero', 'main', [TINY, '--config.grad_clip_norm=0', '--workdir={run}'],
     'config.grad_clip_norm=0.0 is not allowed', None),
    ('learning_rate_inf', 'main', [TINY, '--config.learning_rate=inf', '--workdir={run}'],
     'config.learning_rate=inf is not allowed: a finite number > 0', None),
    ('learning_rate_nan', 'main', [TINY, '--config.learning_rate=nan', '--workdir={run}'],
     'config.learning_rate=nan is not allowed', None),
    ('learning_rate_zero', 'main', [TINY, '--config.learning_rate=0', '--workdir={run}'],
     'config.learning_rate=0.0 is not allowed', None),
    ('weight_decay_nan', 'main', [TINY, '--config.weight_decay=nan', '--workdir={run}'],
     'config.weight_decay=nan is not allowed: a finite number >= 0', None),
    ('warmup_negative', 'main', [TINY, '--config.warmup_steps=-5', '--workdir={run}'],
     'config.warmup_steps=-5 is not allowed', None),
    ('warmup_zero_rsqrt', 'main', [TINY, '--config.warmup_steps=0', '--workdir={run}'],
     'config.warmup_steps=0 is not allowed: an integer > 0 with rsqrt_decay', None),
    ('steps_per_cycle_zero', 'main', [TINY, '--config.schedule=constant * cosine_decay',
                                      '--config.steps_per_cycle=0', '--workdir={run}'],
     'config.steps_per_cycle=0 is not allowed', None),
    ('unknown_schedule_factor', 'main', [TINY, '--config.schedule=constant * warmup',
                                         '--workdir={run}'],
     "config.schedule='constant * warmup' is not allowed", None),
    ('heads_not_dividing', 'main', [TINY, '--config.model.num_heads=5', '--workdir={run}'],
     'config.model.num_heads=5 is not allowed: a divisor of model.qkv_dim=64', None),
    ('dropout_above_one', 'main', [TINY, '--config.model.dropout_rate=1.5', '--workdir={run}'],
     'config.model.dropout_rate=1.5 is not allowed', None),
    ('batch_zero', 'main', [TINY, '--config.batch_size=0', '--workdir={run}'],
     'config.batch_size=0 is not allowed', None),
    ('microbatches_not_dividing', 'main', [TINY, '--config.num_microbatches=3',
                                           '--workdir={run}'],
     'config.num_microbatches=3 is not allowed', None),
    ('train_steps_zero', 'main', [TINY, '--config.num_train_steps=0', '--workdir={run}'],
     'config.num_train_steps=0 is not allowed', None),
    ('eval_steps_zero', 'main', [TINY, '--config.num_eval_steps=0', '--workdir={run}'],
     'config.num_eval_steps=0 is not allowed', None),
    ('absurd_max_length', 'main', [TINY, '--config.max_length=1000000000', '--workdir={run}'],
     'config.max_length=1000000000 is not allowed', None),
    ('unknown_pooling', 'main', [TINY, '--config.model.pooling=MAX', '--workdir={run}'],
     "config.model.pooling='MAX' is not allowed", None),
    ('unknown_dtype', 'main', [TINY, '--config.model.dtype=float16', '--workdir={run}'],
     "config.model.dtype='float16' is not allowed", None),
    ('unknown_source', 'main', [TINY, '--config.data.source=web', '--workdir={run}'],
     "config.data.source='web' is not allowed", None),
    ('unknown_task', 'main', [TINY, '--config.task=pathfinder', '--workdir={run}'],
     "config.task='pathfinder' is not allowed: registered tasks are", None),
    ('listops_depth_zero', 'main', [TINY, '--config.data.listops_max_depth=0', '--workdir={run}'],
     'config.data.listops_max_depth=0 is not allowed', None),
    ('sparsity_one', 'main', [f'{TINY},attention=dsa', '--config.attention.sparsity=1.0',
                              '--workdir={run}'],
     'config.attention.sparsity=1.0 is not allowed', None),
    ('init_from_missing', 'main', [TINY, '--config.init_from={tmp}/nope', '--workdir={run}'],
     'config.init_from=', None),
    ('evaluate_without_init_from', 'main', [TINY, '--mode=evaluate', '--workdir={run}'],
     'config.init_from=None is not allowed in evaluate mode', None),
    # Flags
    ('unknown_flag', 'main', [TINY, '--bogus', '--workdir={run}'],
     "Unknown command line flag 'bogus'", None),
    ('bad_enum_flag', 'main', [TINY, '--mode=describ', '--workdir={run}'],
     'flag --mode=describ: value should be one of <train|evaluate|describe>', None),
    ('bad_bool_flag', 'main', [TINY, '--distributed=maybe', '--workdir={run}'],
     'flag --distributed=maybe', None),
    ('missing_config', 'main', ['--workdir={run}'], '--config is required', None),
    ('missing_workdir', 'main', [TINY], '--workdir is required in train mode', None),
    ('positional_argument', 'main', [TINY, '{run}'], "unexpected argument '", None),
    # Workdirs
    ('workdir_is_a_file', 'main', [TINY, '--workdir={tmp}/afile'],
     "afile' is a file: give a directory you can write to", 'workdir_file'),
    ('workdir_inside_a_file', 'main', [TINY, '--workdir={tmp}/afile/run'],
     "afile/run' is inside the file '", 'workdir_file'),
    ('workdir_read_only', 'main', [TINY, '--workdir={run}'], "run' is not writable",
     'read_only'),
    ('new_workdir_in_read_only_dir', 'main', [TINY, '--workdir={run}/new'],
     "run/new' cannot be created in the unwritable '", 'read_only'),
    # Data (in an empty workdir: the finished run in {run} has another config, which the
    # provenance check refuses before any data is read)
    ('cache_dir_is_a_file', 'main', [TINY, '--config.cache_dir={tmp}/afile', '--workdir={run}'],
     "afile' is not allowed: a directory you can write to (it is a file)", 'workdir_file'),
    ('listops_data_dir_missing', 'main', [TINY, '--config.data_dir={tmp}/nope',
                                          '--workdir={fresh}'],
     "nope' does not exist: point it at the folder", None),
    ('listops_non_utf8', 'main', [TINY, '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'basic_test.tsv, line 3: byte 0xff at column 1 is not UTF-8 text', 'listops_non_utf8'),
    ('listops_empty_split', 'main', [TINY, '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'basic_test.tsv is empty', 'listops_empty'),
    ('listops_header_only', 'main', [TINY, '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'basic_test.tsv holds only the header', 'listops_header_only'),
    ('retrieval_missing', 'main', ['--config=configs/retrieval.py:tiny',
                                   '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'new_aan_pairs.train.tsv', 'retrieval_missing'),
    ('retrieval_empty_split', 'main', ['--config=configs/retrieval.py:tiny',
                                       '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'new_aan_pairs.eval.tsv holds no examples', 'retrieval_empty'),
    ('retrieval_bad_line', 'main', ['--config=configs/retrieval.py:tiny',
                                    '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'new_aan_pairs.eval.tsv, line 1: expected 5 tab-separated fields', 'retrieval_bad_line'),
    ('retrieval_bad_label', 'main', ['--config=configs/retrieval.py:tiny',
                                     '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'new_aan_pairs.eval.tsv, line 1: cannot convert float NaN', 'retrieval_bad_label'),
    ('imdb_garbage_archive', 'main', ['--config=configs/text.py:tiny',
                                      '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'aclImdb_v1.tar.gz: the archive is damaged or not a gzip tar', 'imdb_garbage'),
    ('imdb_archive_without_split', 'main', ['--config=configs/text.py:tiny',
                                            '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'aclImdb_v1.tar.gz', 'imdb_no_split'),
    ('cifar_garbage_archive', 'main', ['--config=configs/image.py:tiny',
                                       '--config.data_dir={tmp}/data', '--workdir={fresh}'],
     'cifar-10-binary.tar.gz: the archive is damaged or not a gzip tar', 'cifar_garbage'),
    # Sweeps
    ('unknown_sweep', 'sweep', [TINY, '--sweep=nope', '--workdir={run}'],
     "--sweep='nope' is not defined for configs/listops.py:tiny: available sweeps are "
     'learning_rate', None),
    ('seeds_not_integers', 'sweep', [TINY, '--sweep=learning_rate', '--seeds=a',
                                     '--workdir={run}'],
     "--seeds='a' is not allowed: comma-separated integers", None),
    ('seeds_repeated', 'sweep', [TINY, '--sweep=learning_rate', '--seeds=1,1',
                                 '--workdir={run}'],
     'identical points (dense__learning_rate=0.05 twice)', None),
    ('sparsities_not_numbers', 'sweep', [TINY, '--sweep=compare', '--sparsities=high',
                                         '--workdir={run}'],
     "--sparsities='high' is not allowed: comma-separated numbers", None),
    ('sweep_point_invalid', 'sweep', [TINY, '--sweep=compare', '--sparsities=1.5',
                                      '--workdir={run}'],
     'config.attention.sparsity=1.5 is not allowed', None),
    ('sweep_override_of_swept_field', 'sweep', [TINY, '--sweep=learning_rate',
                                                '--config.learning_rate=0.2', '--workdir={run}'],
     "--config.learning_rate sets a field that sweep 'learning_rate' varies", None),
    ('sweep_unknown_field', 'sweep', [TINY, '--sweep=learning_rate', '--config.model.emb_dm=8',
                                      '--workdir={run}'],
     'config.model.emb_dm does not exist', None),
    ('sweep_bad_value', 'sweep', [TINY, '--sweep=learning_rate', '--config.grad_clip_norm=-1',
                                  '--workdir={run}'],
     'config.grad_clip_norm=-1.0 is not allowed', None),
    ('sweep_old_set_flag', 'sweep', [TINY, '--sweep=learning_rate', '--set=seed=1',
                                     '--workdir={run}'],
     "Unknown command line flag 'set'", None),
    ('sweep_workdir_is_a_file', 'sweep', [TINY, '--sweep=learning_rate', '--workdir={tmp}/afile'],
     "afile' is a file", 'workdir_file'),
    ('sweep_missing_flags', 'sweep', [TINY, '--workdir={run}'],
     '--config, --sweep and --workdir are required', None),
    # Reports
    ('report_no_runs', 'report', ['{tmp}/runs'], 'no finished runs (results.json) under',
     'empty_runs'),
    ('report_torn_results', 'report', ['{tmp}/runs'],
     'no finished runs: 1 run(s) with an unreadable results.json, e.g. ', 'torn_results'),
    ('report_results_missing_keys', 'report', ['{tmp}/runs'], "has no 'attention'",
     'results_no_keys'),
    ('report_results_not_an_object', 'report', ['{tmp}/runs'], 'holds a list, not an object',
     'results_list'),
    ('report_not_a_directory', 'report', ['{tmp}/nope'], "nope' is not a directory", None),
    ('report_out_is_a_file', 'report', ['{run}', '--out={run}/results.json'],
     "results.json' is a file", None),
    ('report_no_arguments', 'report', [], 'give one or more run directories', None),
    # Throughput
    ('throughput_unknown_field', 'throughput', [TINY, '--config.model.emb_dm=8'],
     'config.model.emb_dm does not exist', None),
    ('throughput_bad_option', 'throughput', ['--config=configs/text.py:attention=nope'],
     "config.attention.name='nope' is not allowed", None),
    ('throughput_invalid_config', 'throughput', [TINY, '--config.model.num_heads=3'],
     'config.model.num_heads=3 is not allowed', None),
    ('throughput_no_config', 'throughput', ['--steps=2'], '--config is required', None),
    ('throughput_zero_steps', 'throughput', [TINY, '--steps=0'], '--steps=0 --warmup=5', None),
    ('throughput_out_is_a_directory', 'throughput', [TINY, '--out={tmp}/outdir'],
     "outdir' is a directory: give a file name", 'out_dir'),
    ('throughput_old_tasks_flag', 'throughput', ['--tasks=listops'],
     "Unknown command line flag 'tasks'", None),
]


# ---------------------------------------------------------------------------------------------
# Running the cases
# ---------------------------------------------------------------------------------------------

# A process that imports the heavy libraries once (jax, flax, the package; no jax backend yet),
# then, for each case read from stdin, forks a child that runs the command exactly as
# ``python -m lra_sparse.<module> ARGS`` would (runpy, as __main__, with the case's argv,
# environment, stdout and stderr) and answers with the child's exit status.
_DRIVER = r"""
import json, os, runpy, sys, time, traceback
import lra_sparse.cli, lra_sparse.config_lib, lra_sparse.data, lra_sparse.describe
for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.update(case['env'])
            for fd, path in ((1, case['stdout']), (2, case['stderr'])):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
            sys.argv = ['-m', *case['argv']]
            runpy.run_module('lra_sparse.' + case['module'], run_name='__main__', alter_sys=True)
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + 300
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(done[1]) if done[0] else 'timed out after 300 s'
    print(json.dumps(status), flush=True)
"""


class _Driver:
    """The forking driver process (one per test module)."""

    def __init__(self):
        env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
        self.process = subprocess.Popen([sys.executable, '-c', _DRIVER], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)

    def run(self, module: str, argv: list[str], env: dict, out_dir: str) -> tuple[int, str]:
        """Runs ``python -m lra_sparse.<module> *argv``; its exit status and stderr."""
        stderr = os.path.join(out_dir, 'stderr.txt')
        request = {'module': module, 'argv': argv, 'env': env, 'stderr': stderr,
                   'stdout': os.path.join(out_dir, 'stdout.txt')}
        self.process.stdin.write(json.dumps(request) + '\n')
        self.process.stdin.flush()
        status = json.loads(self.process.stdout.readline())
        with open(stderr) as f:
            return status, f.read()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def _snapshot(root: str) -> dict[str, tuple[bytes, int] | None]:
    """Every file under ``root`` with its bytes and modification time; directories as None."""
    snapshot = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            snapshot[os.path.join(folder, name)] = None
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                snapshot[path] = (f.read(), os.stat(path).st_mtime_ns)
    return snapshot


def _run_case(driver: _Driver, case: tuple, root: str) -> dict:
    """Prepares and runs one case; its exit status, stderr and the files that changed."""
    case_id, module, args, _, prepare = case
    tmp, out_dir = os.path.join(root, case_id), os.path.join(root, '_output', case_id)
    run, fresh = os.path.join(tmp, 'run'), os.path.join(tmp, 'fresh')
    os.makedirs(out_dir)
    os.makedirs(fresh)
    _finished_run(run)
    if prepare:
        PREPARE[prepare](tmp)
    before = _snapshot(tmp)
    try:
        argv = [a.format(tmp=tmp, run=run, fresh=fresh) for a in args]
        returncode, stderr = driver.run(module, argv,
                                        {'XDG_CACHE_HOME': os.path.join(tmp, 'cache')}, out_dir)
        after = _snapshot(tmp)
    finally:
        _writable_again(run)
    changed = sorted(p for p in set(before) | set(after) if before.get(p, 0) != after.get(p, 0))
    return {'returncode': returncode, 'stderr': stderr, 'changed': changed}


@pytest.fixture(scope='module')
def outcomes(request, tmp_path_factory):
    """{case id: outcome} of the cases selected in this session."""
    selected = {item.callspec.params['case'][0] for item in request.session.items
                if item.module is request.module and hasattr(item, 'callspec')}
    root = str(tmp_path_factory.mktemp('bad_inputs'))
    driver = _Driver()
    try:
        return {case[0]: _run_case(driver, case, root) for case in CASES if case[0] in selected}
    finally:
        driver.close()


def test_the_table_is_large_and_its_ids_unique():
    ids = [case[0] for case in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)
    assert {case[1] for case in CASES} == {'main', 'sweep', 'report', 'throughput'}


def test_the_driver_runs_commands_as_python_m(tmp_path):
    """The forked run of a command gives what ``python -m`` gives (status, stdout, stderr)."""
    args = ['--config=configs/listops.py:tiny', '--mode=describe', '--config.seed=x']
    direct = subprocess.run([sys.executable, '-m', 'lra_sparse.main', *args], text=True,
                            capture_output=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    driver = _Driver()
    try:
        forked = driver.run('main', args, {}, str(tmp_path))
        described = driver.run('main', [*args[:2], '--describe_format=json',
                                         '--nodescribe_memory'], {}, str(tmp_path))
    finally:
        driver.close()
    assert forked == (direct.returncode, direct.stderr) == (2, "error: config.seed='x' is not "
                                                               "allowed: an integer.\n")
    assert described[0] == 0
    assert json.loads((tmp_path / 'stdout.txt').read_text())['num_params'] > 0


# Lines a command may print before it meets the bad input: progress bars of data loading and
# the package's INFO log lines (e.g. how many documents were truncated).
_PROGRESS = re.compile(r'^(\S.*: \d+\w* \[\d\d:\d\d|I\d{4} \d\d:\d\d:\d\d\.\d+ )')


@pytest.mark.parametrize('case', CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, outcomes):
    outcome = outcomes[case[0]]
    lines = [line for line in outcome['stderr'].splitlines()
             if line.strip() and not _PROGRESS.match(line)]
    assert outcome['returncode'] == 2, outcome['stderr']
    assert len(lines) == 1 and lines[0].startswith('error: '), outcome['stderr']
    assert case[3] in lines[0], lines[0]
    assert not outcome['changed'], f'files changed: {outcome["changed"]}'
