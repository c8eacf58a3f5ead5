"""Training and evaluation: pure jit-compiled steps and ``train_and_evaluate(config, workdir)``.

One notion of time: optimizer steps. The batch for step ``s`` is a pure function of (seed, s), the
dropout key is ``fold_in(rng, s)``, so a run resumed from a checkpoint at step ``s`` continues
exactly as if it had never stopped. Batches are sharded over every device of every host along the
mesh axis ``data``; parameters are replicated (data parallel). Attention statistics and auxiliary
losses come out of the model as dictionaries and are logged without the loop knowing the method.

:func:`setup_run` builds what training, evaluation (:func:`evaluate_checkpoint`) and the throughput
benchmark share: the mesh, the shardings, the model, the optimizer and the jitted steps.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lra_sparse import attention as attention_lib
from lra_sparse import config_lib, data, files, metrics
from lra_sparse import results as results_lib
from lra_sparse import workdir as workdir_lib
from lra_sparse.errors import UserError
from lra_sparse.models import transformer

_log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Learning-rate schedule and optimizer
# ---------------------------------------------------------------------------------------------


def learning_rate_fn(config: ml_collections.ConfigDict):
    """The LRA ``create_learning_rate_scheduler``: a product of named factors of the step.

    constant = learning_rate; linear_warmup = min(1, step / warmup); rsqrt_decay =
    1 / sqrt(max(step, warmup)); cosine_decay = max(0, 0.5 (1 + cos(pi ((step - warmup) /
    steps_per_cycle mod 1)))). Step 0 therefore has LR 0, as in the reference.
    """
    factors = [f.strip() for f in config.schedule.split('*')]
    warmup, cycle, base = config.warmup_steps, config.steps_per_cycle, config.learning_rate

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        lr = jnp.ones((), jnp.float32)
        for name in factors:
            if name == 'constant':
                lr = lr * base
            elif name == 'linear_warmup':
                lr = lr * jnp.minimum(1.0, step / max(warmup, 1))
            elif name == 'rsqrt_decay':
                lr = lr / jnp.sqrt(jnp.maximum(step, warmup))
            elif name == 'cosine_decay':
                progress = jnp.maximum(0.0, (step - warmup) / float(cycle))
                lr = lr * jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(jnp.pi * (progress % 1.0))))
        return lr

    return schedule


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW(b1 0.9, b2 0.98, eps 1e-9), decoupled decay on all parameters, optional clipping."""
    adamw = optax.adamw(learning_rate_fn(config), b1=0.9, b2=0.98, eps=1e-9,
                        weight_decay=config.weight_decay)
    if config.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), adamw)
    return adamw


# ---------------------------------------------------------------------------------------------
# State and steps
# ---------------------------------------------------------------------------------------------


class TrainState(struct.PyTreeNode):
    """Everything a checkpoint holds.

    Attributes:
      step: int32 scalar, optimizer steps done.
      params: nnx.State of trainable parameters.
      rest: nnx.State of the other variables (fixed random projections, hash parameters, tables).
      opt_state: optax state.
      rng: uint32 [2] base key of dropout and training-time randomness.
    """

    step: jax.Array
    params: Any
    rest: Any
    opt_state: Any
    rng: jax.Array


def targets_and_weights(batch: dict) -> tuple[jax.Array, jax.Array]:
    """batch['targets'] int [B] and batch['weights'] float [B] (1 = real example)."""
    return batch['targets'], batch['weights'].astype(jnp.float32)


def classification_sums(logits: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Example-weighted sums: cross-entropy, correct predictions, example count.

    Args:
      logits: float32 [B, classes].
      batch: with 'targets' [B] and 'weights' [B].

    Returns:
      {'loss_sum', 'correct', 'count'} float32 scalars.
    """
    targets, weights = targets_and_weights(batch)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return {'loss_sum': jnp.sum(ce * weights), 'correct': jnp.sum(correct * weights),
            'count': jnp.sum(weights)}


def split_microbatches(batch: dict, num_microbatches: int) -> dict:
    """[B, ...] leaves -> [num_microbatches, B / num_microbatches, ...] (strided split).

    Microbatch j holds examples j, j + n, j + 2n, ... so every device keeps its own rows of a
    batch sharded along B (needs B divisible by n * devices, which ``config_lib`` checks).
    """
    def split(x):
        x = x.reshape(x.shape[0] // num_microbatches, num_microbatches, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)
    return jax.tree.map(split, batch)


def _accumulate(grad_fn, params, microbatches: dict, rng: jax.Array):
    """Sums ``grad_fn(params, micro, rng_j)`` over the leading axis of ``microbatches`` (scan).

    Returns the summed ((loss, (sums, aux)), grads); one microbatch's activations live at a time.
    """
    first = jax.tree.map(lambda x: x[0], microbatches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, first, rng))

    def body(total, xs):
        index, micro = xs
        out = grad_fn(params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, total, out), None

    n = jax.tree.leaves(microbatches)[0].shape[0]
    total, _ = jax.lax.scan(body, zeros, (jnp.arange(n), microbatches))
    return total


def train_step(state: TrainState, batch: dict, *, graphdef, tx, lr_fn,
               num_microbatches: int = 1) -> tuple[TrainState, dict]:
    """One optimizer step (pure; jit with the static arguments bound).

    Args:
      state: the TrainState.
      batch: 'inputs' int32 [B, L] (or 'inputs1'/'inputs2'), 'targets' int32 [B], 'weights' [B].
      graphdef: the model's nnx GraphDef.
      tx: the optax optimizer.
      lr_fn: the schedule (for logging the LR used by this step).
      num_microbatches: split the batch into this many sequential parts whose gradients are
        summed: the same update as one pass (up to dropout draws and rounding), with the
        activation memory of B / num_microbatches examples.

    Returns:
      (new state, metrics dict of scalars: sums, mean loss, aux loss, attention stats, LR, norms).
    """
    rng = jax.random.fold_in(state.rng, state.step)
    count = jnp.maximum(jnp.sum(targets_and_weights(batch)[1]), 1.0)

    def loss_fn(params, micro, micro_rng):
        model = nnx.merge(graphdef, params, state.rest)
        logits, aux = model(micro, deterministic=False, rng=micro_rng)
        sums = classification_sums(logits, micro)
        return sums['loss_sum'] / count + aux['aux_loss'] / num_microbatches, (sums, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        (loss, (sums, aux)), grads = grad_fn(state.params, batch, rng)
    else:
        (loss, (sums, aux)), grads = _accumulate(
            grad_fn, state.params, split_microbatches(batch, num_microbatches), rng)
        aux = jax.tree.map(lambda x: x / num_microbatches, aux)  # means over microbatches
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    out = {**sums, **aux['stats'], 'total_loss': loss, 'aux_loss': aux['aux_loss'],
           'learning_rate': lr_fn(state.step), 'grad_norm': optax.tree_utils.tree_norm(grads),
           'param_norm': optax.tree_utils.tree_norm(params)}
    return new_state, out


def eval_step(params, rest, batch: dict, *, graphdef) -> dict:
    """Example-weighted sums and attention statistics for one batch (no dropout)."""
    model = nnx.merge(graphdef, params, rest)
    logits, aux = model(batch, deterministic=True)
    return {**classification_sums(logits, batch), **aux['stats'], 'aux_loss': aux['aux_loss']}


SUM_KEYS = ('loss_sum', 'correct', 'count')


def summarize(step_metrics: list[dict]) -> dict[str, float]:
    """Host-side reduction of per-step metrics: example-weighted loss/accuracy, mean of the rest.

    Statistics are averaged weighted by each step's example count.
    """
    host = jax.device_get(step_metrics)
    counts = np.array([m['count'] for m in host], dtype=np.float64)
    total = max(counts.sum(), 1.0)
    out = {'loss': float(sum(m['loss_sum'] for m in host) / total),
           'accuracy': float(sum(m['correct'] for m in host) / total),
           'num_examples': float(counts.sum())}
    for key in host[0]:
        if key not in SUM_KEYS:
            values = np.array([m[key] for m in host], dtype=np.float64)
            out[key] = float((values * counts).sum() / total)
    return out


# ---------------------------------------------------------------------------------------------
# Set-up shared by training, evaluation and throughput
# ---------------------------------------------------------------------------------------------


def create_mesh() -> jax.sharding.Mesh:
    """A 1-D mesh over every device of every host, axis 'data'."""
    return jax.make_mesh((jax.device_count(),), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch: dict, sharding: NamedSharding) -> dict:
    """Host-local numpy batch -> global jax.Array sharded along the batch axis."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def count_params(params) -> int:
    """Number of trainable scalars."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def init_state(config: ml_collections.ConfigDict, info) -> tuple[Any, TrainState,
                                                                 optax.GradientTransformation]:
    """Builds the model and the initial TrainState (on the host, not yet placed)."""
    model = transformer.build_model(config, info)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, rest=rest,
                       opt_state=tx.init(params),
                       rng=jax.random.PRNGKey(config.seed + 1))
    return graphdef, state, tx


@dataclasses.dataclass(frozen=True)
class Run:
    """What a run builds once from its config: device placement, the model, the jitted steps.

    Attributes:
      config: the run's config.
      mesh: 1-D mesh over every device of every host, axis 'data'.
      batch_sharding: batches split along their first axis over 'data'.
      replicated: the same value on every device (parameters, optimizer state, metrics).
      graphdef: the model's nnx GraphDef.
      tx: the optax optimizer.
      abstract_state: shapes, dtypes and (replicated) shardings of the TrainState: the target of
        checkpoint restores.
      num_params: trainable scalars of the model.
      train_step: jitted ``(state, batch) -> (state, metrics)``; donates ``state``.
      eval_step: jitted ``(params, rest, batch) -> metrics`` (no dropout).
    """

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    batch_sharding: NamedSharding
    replicated: NamedSharding
    graphdef: Any
    tx: optax.GradientTransformation
    abstract_state: TrainState
    num_params: int
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, Any, dict], dict]

    def place(self, state: TrainState) -> TrainState:
        """A host (or restored) TrainState replicated on every device."""
        return jax.device_put(state, self.replicated)

    def shard(self, batch: dict) -> dict:
        """A host-local numpy batch as a global array sharded along the batch axis."""
        return shard_batch(batch, self.batch_sharding)

    def evaluate(self, state: TrainState, split: dict) -> dict[str, float]:
        """Exact example-weighted metrics over a split (or ``num_eval_steps`` batches of it).

        Also reports ``examples_per_second``: inference throughput of this evaluation (wall time
        of the whole loop, host batching included; the first evaluation of a run includes
        compilation).
        """
        limit = self.config.num_eval_steps
        batches = data.eval_batches(split, self.config.batch_size,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
        results, t_start = [], time.perf_counter()
        for i, batch in enumerate(batches):
            if limit > 0 and i >= limit:
                break
            results.append(self.eval_step(state.params, state.rest, self.shard(batch)))
        summary = summarize(results)  # device_get: waits for the last step
        summary['examples_per_second'] = summary['num_examples'] / (time.perf_counter() - t_start)
        return summary


def setup_run(config: ml_collections.ConfigDict, info) -> tuple[Run, TrainState]:
    """The mesh, shardings, model, optimizer and jitted steps of ``config``, and its fresh state.

    Args:
      config: a validated config.
      info: the task's metadata (``data.TaskInfo``: classes, vocabulary, sequence length).

    Returns:
      (the Run, the freshly initialised TrainState on the host; place it with ``run.place`` once
      it is restored or initialised from another run).
    """
    mesh = create_mesh()
    batch_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    graphdef, state, tx = init_state(config, info)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    train_fn = jax.jit(
        functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=learning_rate_fn(config),
                          num_microbatches=config.num_microbatches),
        in_shardings=(state_sharding, batch_sharding), out_shardings=(state_sharding, replicated),
        donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, graphdef=graphdef), out_shardings=replicated)
    if jax.process_count() > 1 and jax.default_backend() == 'cpu':
        train_fn, eval_fn = _one_at_a_time(train_fn), _one_at_a_time(eval_fn)
    run = Run(config=config, mesh=mesh, batch_sharding=batch_sharding, replicated=replicated,
              graphdef=graphdef, tx=tx,
              abstract_state=jax.tree.map(  # restored straight onto every device of every host
                  lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state),
              num_params=count_params(state.params), train_step=train_fn, eval_step=eval_fn)
    return run, state


def _one_at_a_time(step_fn: Callable) -> Callable:
    """``step_fn`` that returns only once its computation has finished on this process's devices.

    For multi-process CPU runs: with two programs holding cross-process (gloo) collectives in
    flight at once, a process's devices can enter them in different orders and every process
    waits forever (seen with jax 0.10 and 2 processes x 2 CPU devices). Waiting for each step
    keeps one such program in flight at a time.
    """
    @functools.wraps(step_fn)
    def wait_for(*args):
        return jax.block_until_ready(step_fn(*args))
    return wait_for


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


class CheckpointError(UserError):
    """A run directory holds no checkpoint to restore (the message names the directory)."""


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Orbax manager under ``workdir/checkpoints`` (atomic saves; old ones pruned)."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints_to_keep, create=True))


def restore_state(mngr: ocp.CheckpointManager, step: int, abstract_state) -> TrainState:
    """The TrainState saved at ``step``, with the structure, shapes and dtypes of the target.

    Args:
      mngr: the run's checkpoint manager.
      step: a step the manager holds.
      abstract_state: a TrainState (or its ``jax.ShapeDtypeStruct`` tree) to restore into.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_params(workdir: str) -> dict:
    """Parameters (pure nested dict of numpy arrays) of the latest intact checkpoint of a run.

    Restored to host memory, so a run saved on any number of devices and processes loads here.
    A checkpoint that fails to restore is reported in a warning and the previous one is used.
    """
    directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if not os.path.isdir(directory):
        raise CheckpointError(f'no checkpoints in {workdir!r} (expected {directory})')
    failures = []
    with ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler()) as mngr:
        for step in sorted(mngr.all_steps(), reverse=True):
            try:
                on_host = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                                       mngr.item_metadata(step).tree)
                return mngr.restore(step, args=ocp.args.StandardRestore(on_host))['params']
            except Exception as error:  # noqa: BLE001  (any failure means: try the previous one)
                _log.warning('checkpoint %d in %s cannot be restored (%s); trying the previous '
                             'one', step, directory, workdir_lib.one_line(error))
                failures.append(f'step {step}: {workdir_lib.one_line(error)}')
    if failures:
        raise CheckpointError(f'no checkpoint in {directory} can be restored '
                              f'({"; ".join(failures)})')
    raise CheckpointError(f'no checkpoints in {directory}')


def _leaf_names(tree, strip_value: bool) -> dict[tuple[str, ...], Any]:
    """Flattens a parameter tree to {path as a tuple of strings: leaf}.

    Orbax restores list indices as strings and nnx variables as {'value': array} when no target
    is given; ``strip_value`` drops that last key so both kinds of tree compare equal.
    """
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = tuple(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
        if strip_value and names[-1] == 'value':
            names = names[:-1]
        out[names] = leaf
    return out


def restored_step(workdir: str) -> int:
    """The step of the latest checkpoint of a run (0 if it has none)."""
    directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if not os.path.isdir(directory):
        return 0
    with ocp.CheckpointManager(directory) as mngr:
        return mngr.latest_step() or 0


def init_from_workdir(state: TrainState, source: str) -> TrainState:
    """Loads every parameter present in ``source``'s checkpoint; others keep their fresh init.

    Used to fine-tune a sparse method from a dense run (DSA's predictor starts fresh) and to
    evaluate a dense-trained model with another attention method. A parameter whose shape differs
    raises ConfigError naming it (the model dims must match); a source that shares no parameter
    with this model raises too.
    """
    loaded = _leaf_names(restore_params(source), strip_value=True)
    pure = state.params.to_pure_dict()
    paths, treedef = jax.tree_util.tree_flatten_with_path(pure)
    new_leaves, matched = [], 0
    for names, (_, leaf) in zip(_leaf_names(pure, strip_value=False), paths):
        if names not in loaded:
            new_leaves.append(leaf)
            continue
        value = np.asarray(loaded[names])
        if value.shape != leaf.shape:
            raise config_lib.ConfigError(
                f'config.init_from={source!r} is not allowed: parameter {"/".join(names)} has '
                f'shape {value.shape} there but {leaf.shape} here; the model dims must match.')
        new_leaves.append(jnp.asarray(value, leaf.dtype))
        matched += 1
    if not matched:
        raise config_lib.ConfigError(
            f'config.init_from={source!r} is not allowed: its checkpoint shares no parameter with '
            'this model (a run of another task?).')
    params = state.params
    nnx.replace_by_pure_dict(params, jax.tree_util.tree_unflatten(treedef, new_leaves))
    return state.replace(params=params)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    The workdir is locked for the run, and a config that differs from the one the workdir was
    started with (other than :data:`workdir.CHANGEABLE_FIELDS`) is refused before anything is
    written or loaded. A finished run returns its saved results and changes nothing. Writes
    config.json, config_history.jsonl, metrics.jsonl, TensorBoard events, orbax checkpoints and
    results.json.

    Returns:
      The results dict (also written to results.json): final validation and test metrics,
      num_params, attention method, steps, wall time and throughput.
    """
    config_lib.validate(config)
    with workdir_lib.RunDirectory(workdir, is_main=jax.process_index() == 0,
                                 agree=_all_processes) as rundir:
        rundir.check_config(config, mode='train')
        finished = rundir.finished_results(config, mode='train')
        if finished is not None:
            _log.warning('%s holds the finished run of this config (%d steps): its results are '
                         'returned unchanged', workdir, config.num_train_steps)
            return finished
        results = _train(config, rundir)
        rundir.write_results(results)
    return results


def _train(config: ml_collections.ConfigDict, rundir: workdir_lib.RunDirectory) -> dict:
    """Loads the data, restores or initialises, trains and evaluates; returns the results."""
    task = data.load_task(config)
    run, state = setup_run(config, task.info)
    total = config.num_train_steps
    with checkpoint_manager(rundir.path, config) as mngr:
        state, start_step = restore_or_init(run, state, mngr)
        rundir.record_start(config, start_step)
        writer = metrics.MetricWriter(rundir.path, enabled=rundir.is_main,
                                      resume_step=start_step, config_text=config.to_json(indent=2))
        t_start = time.perf_counter()
        try:
            state, last_eval = train_loop(run, state, start_step, task, writer, mngr)
            mngr.wait_until_finished()
            validation, test = final_evaluation(run, state, task, last_eval)
            if not writer.has(total, 'test'):  # a resumed finished run logged it already
                writer.write(total, 'test', test)
        finally:
            writer.close()
    return _results(config, run.num_params, total, start_step, time.perf_counter() - t_start,
                    validation, test, task)


def restore_or_init(run: Run, state: TrainState,
                    mngr: ocp.CheckpointManager) -> tuple[TrainState, int]:
    """The run's latest intact checkpoint, else the weights of ``config.init_from``, else ``state``.

    A checkpoint that fails to restore, or holds non-finite values, is skipped for the previous
    one. Once one restores, each broken newer one is moved to ``workdir/unreadable_checkpoints/``
    (so the run can save that step again) and reported in one warning line naming its step and
    the reason.

    Args:
      run: the Run.
      state: the fresh TrainState from :func:`setup_run`.
      mngr: the workdir's checkpoint manager.

    Returns:
      (the state placed on the devices, the step it continues from).

    Raises:
      CheckpointError: the workdir has checkpoints but none of them restores.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        if run.config.init_from:
            state = init_from_workdir(state, run.config.init_from)
        return run.place(state), 0
    failures = {}
    for step in steps:
        try:
            restored = restore_state(mngr, step, run.abstract_state)
            if not _all_finite(restored):
                raise ValueError('it holds non-finite values')
        except Exception as error:  # noqa: BLE001  (any failure means: try the previous one)
            failures[step] = workdir_lib.one_line(error)
            continue
        _set_aside(mngr, failures, step)
        return run.place(restored), step
    listed = '; '.join(f'step {step}: {reason}' for step, reason in failures.items())
    raise CheckpointError(
        f'no checkpoint in {mngr.directory} can be restored ({listed}): move that folder away to '
        'train from step 0, or use another workdir.')


def _all_finite(state: TrainState) -> bool:
    """Whether every floating-point value of a (host or device) TrainState is finite."""
    leaves = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)


def _set_aside(mngr: ocp.CheckpointManager, failures: dict[int, str], restored: int) -> None:
    """Moves unrestorable checkpoints to ``<workdir>/unreadable_checkpoints/<step>``.

    One warning line per checkpoint names its step, the reason and where it went. Process 0
    moves; every process reloads the manager.

    Args:
      mngr: the run's checkpoint manager.
      failures: {step: why it cannot be restored}.
      restored: the step restored instead.
    """
    if not failures:
        return
    _sync('lra_sparse_restored')  # every process has read its checkpoint before any moves
    if jax.process_index() == 0:
        directory = os.fspath(mngr.directory)
        aside = os.path.join(os.path.dirname(directory), 'unreadable_checkpoints')
        os.makedirs(aside, exist_ok=True)
        for step, reason in failures.items():
            target = os.path.join(aside, str(step))
            if os.path.exists(target):
                target += f'.{time.strftime("%Y%m%d-%H%M%S")}'
            os.replace(os.path.join(directory, str(step)), target)
            _log.warning('checkpoint %d in %s cannot be restored (%s): moved to %s; resuming from '
                         'checkpoint %d', step, directory, reason, target, restored)
    _sync('lra_sparse_set_aside')
    mngr.reload()


def _all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds in every process of the run (a collective every process calls)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
    """A barrier across processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def train_loop(run: Run, state: TrainState, start_step: int, task, writer: metrics.MetricWriter,
               mngr: ocp.CheckpointManager) -> tuple[TrainState, dict]:
    """Steps ``start_step`` to ``num_train_steps``: logs, evaluates and checkpoints on schedule.

    The last step is always logged, evaluated and saved. Every step's loss, gradient norm and
    parameter norm are checked (:class:`_TrainWindow`) before each log line, evaluation and save,
    so nothing non-finite is ever evaluated or saved.

    Returns:
      (the final state, the metrics of the last validation; empty if no step ran).

    Raises:
      NonFiniteError: a step produced a non-finite value (the message names the first such step).
    """
    config, total = run.config, run.config.num_train_steps
    batches: Iterator[dict] = data.train_batches(
        task.splits['train'], config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())
    window, last_eval = _TrainWindow(start_step), {}
    progress = metrics.Progress(_run_name(config), total, start_step,
                                enabled=jax.process_index() == 0)
    try:
        for step in range(start_step, total):
            state, step_metrics = run.train_step(state, run.shard(next(batches)))
            window.add(step_metrics)
            done = step + 1
            progress.step()
            evaluate_now = done % config.eval_every_steps == 0 or done == total
            save_now = done % config.checkpoint_every_steps == 0 or done == total
            if done % config.log_every_steps == 0 or done == total:
                summary = window.summary(done)
                writer.write(done, 'train', summary)
                progress.report(done, 'train', summary)
            elif evaluate_now or save_now:
                window.check_finite()
            if evaluate_now:
                last_eval = evaluate_during_training(run, state, task, done, writer, progress)
                window.restart_clock()  # keep evaluation time out of steps_per_second
            if save_now:
                mngr.save(done, args=ocp.args.StandardSave(state))
                files.pause_point(f'checkpoint_save:{done}')
            files.pause_point(f'step:{done}')
    finally:
        progress.close()  # before any error message, on a line of its own
    return state, last_eval


class NonFiniteError(UserError):
    """A training step produced a non-finite loss, gradient norm or parameter norm.

    The message names the first such step and the last finite loss. Nothing after the last
    finite state is saved.
    """


# The per-step values the guard checks, and their names in its message.
GUARDED_METRICS = {'total_loss': 'loss', 'grad_norm': 'gradient norm',
                   'param_norm': 'parameter norm'}


class _TrainWindow:
    """Train-step metrics since the last log line, the training time they took, and the guard.

    The guard costs no extra synchronisation on log steps (the summary fetches every metric
    anyway); on an evaluation or checkpoint step between log steps it fetches the three guarded
    scalars of the steps not checked yet.

    Args:
      start_step: steps done before the first step of this window.
    """

    def __init__(self, start_step: int = 0):
        self.step_metrics: list[dict] = []
        self.first_step = start_step  # steps done before step_metrics[0]
        self.checked = 0  # leading entries of step_metrics already checked
        self.last_finite_loss: tuple[int, float] | None = None
        self.t_start = time.perf_counter()

    def add(self, step_metrics: dict) -> None:
        """Records one step's (device) metrics."""
        self.step_metrics.append(step_metrics)

    def restart_clock(self) -> None:
        """Starts the window's time now (after work that is not training)."""
        self.t_start = time.perf_counter()

    def check_finite(self) -> None:
        """Raises NonFiniteError at the first unchecked step with a non-finite guarded value."""
        pending = [{k: m[k] for k in GUARDED_METRICS} for m in self.step_metrics[self.checked:]]
        self._check(jax.device_get(pending))

    def _check(self, host_values: list[dict]) -> None:
        """Checks host values of the steps after the ``checked`` ones, in order."""
        for values in host_values:
            done = self.first_step + self.checked + 1
            loss = float(values['total_loss'])
            if math.isfinite(loss):
                self.last_finite_loss = (done, loss)
            bad = [f'{name} {float(values[key])}' for key, name in GUARDED_METRICS.items()
                   if not math.isfinite(float(values[key]))]
            if bad:
                raise NonFiniteError(self._message(done, bad))
            self.checked += 1

    def _message(self, done: int, bad: list[str]) -> str:
        if self.last_finite_loss is None:
            last = 'no loss of this run was finite'
        else:
            last = 'the last finite loss was {1:.6g} at step {0}'.format(*self.last_finite_loss)
        checked_at = self.first_step + len(self.step_metrics)
        return (f'training diverged at step {done}: non-finite {", ".join(bad)}; {last}. The run '
                f'stopped at step {checked_at} and wrote no checkpoint of a non-finite state: '
                'train in a new workdir with a lower learning_rate (or a grad_clip_norm).')

    def summary(self, done: int) -> dict[str, float]:
        """The window's summary with ``steps_per_second``; empties the window.

        Raises:
          NonFiniteError: a step of the window produced a non-finite guarded value.
        """
        host = jax.device_get(self.step_metrics)
        self._check(host[self.checked:])
        summary = summarize(host)
        elapsed = time.perf_counter() - self.t_start
        summary['steps_per_second'] = len(self.step_metrics) / max(elapsed, 1e-9)
        self.step_metrics, self.checked, self.first_step = [], 0, done
        self.t_start = time.perf_counter()
        return summary


def evaluate_during_training(run: Run, state: TrainState, task, done: int,
                             writer: metrics.MetricWriter,
                             progress: metrics.Progress) -> dict[str, float]:
    """Validation (and test, with ``eval_test_every_eval``) at step ``done``; returns validation.

    Each evaluation is announced on the terminal and its result printed as one line.
    """
    splits = ('validation', 'test') if run.config.eval_test_every_eval else ('validation',)
    results = {}
    for split in splits:
        progress.evaluating(done, split)
        results[split] = run.evaluate(state, task.splits[split])
        writer.write(done, split, results[split])
        progress.report(done, split, results[split])
    return results['validation']


def final_evaluation(run: Run, state: TrainState, task,
                     last_eval: dict) -> tuple[dict[str, float], dict[str, float]]:
    """(validation, test) metrics of the final state.

    The validation of the last step is reused; a resumed finished run (no step ran) evaluates the
    restored state once more.
    """
    validation = last_eval or run.evaluate(state, task.splits['validation'])
    return validation, run.evaluate(state, task.splits['test'])


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the weights of run ``config.init_from`` with the attention of ``config``.

    This is how a method is applied to a dense-trained model without fine-tuning (DFSS's "w/o
    finetune" columns, SpAtten or CTA at inference): parameters the source run has are loaded,
    the method's own extra state (a DSA predictor, CTA hash parameters) keeps its fresh init.
    Writes config.json, config_history.jsonl, metrics.jsonl (validation and test events at the
    source's step) and results.json (``mode: 'evaluate'``) in ``workdir``, which is locked and
    checked like a training run's; a finished evaluation returns its saved results.

    Returns:
      The results dict, as :func:`train_and_evaluate` with ``num_train_steps`` 0.
    """
    if not config.init_from:
        raise config_lib.ConfigError(
            'config.init_from=None is not allowed in evaluate mode: give the workdir of the run '
            'whose weights to evaluate (--config.init_from=runs/dense).')
    config_lib.validate(config)
    with workdir_lib.RunDirectory(workdir, is_main=jax.process_index() == 0,
                                 agree=_all_processes) as rundir:
        rundir.check_config(config, mode='evaluate')
        finished = rundir.finished_results(config, mode='evaluate')
        if finished is not None:
            _log.warning('%s holds the finished evaluation of this config: its results are '
                         'returned unchanged', workdir)
            return finished
        results = _evaluate(config, rundir)
        rundir.write_results(results)
    return results


def _evaluate(config: ml_collections.ConfigDict, rundir: workdir_lib.RunDirectory) -> dict:
    """Loads the data and the weights of ``config.init_from``, evaluates; returns the results."""
    task = data.load_task(config)
    t_start = time.perf_counter()
    run, state = setup_run(config, task.info)
    state = run.place(init_from_workdir(state, config.init_from))
    source_steps = restored_step(config.init_from)
    rundir.record_start(config, 0)
    writer = metrics.MetricWriter(rundir.path, enabled=rundir.is_main)
    splits = {}
    try:
        for split in ('validation', 'test'):
            splits[split] = run.evaluate(state, task.splits[split])
            writer.write(source_steps, split, splits[split])
    finally:
        writer.close()
    results = _results(config, run.num_params, 0, 0, time.perf_counter() - t_start,
                       splits['validation'], splits['test'], task)
    results.update(mode='evaluate', init_from=config.init_from)
    return results


def _results(config, num_params: int, total: int, start_step: int, wall: float,
             validation: dict, test: dict, task) -> dict:
    """The results.json payload of a run: metrics, throughput, what ran and where it came from.

    ``majority_accuracy`` is the test accuracy of always predicting the train split's most
    frequent class (the floor the reports draw).
    """
    device = jax.devices()[0]
    return {
        'task': config.task, 'attention': config.attention.name,
        'attention_config': config.attention.to_dict(),
        'implementation': attention_lib.implementation_used(config.attention),
        'seed': config.seed, 'num_params': num_params,
        'num_train_steps': total, 'resumed_from_step': start_step,
        'wall_time_seconds': wall,
        'train_steps_per_second': (total - start_step) / wall if total > start_step else None,
        'validation': validation, 'test': test,
        'majority_accuracy': results_lib.majority_accuracy(task.splits['train']['targets'],
                                                           task.splits['test']['targets']),
        'devices': jax.device_count(),
        'processes': jax.process_count(), 'platform': device.platform,
        'device_kind': getattr(device, 'device_kind', device.platform),
        'jax_version': jax.__version__, **workdir_lib.run_metadata(),
    }


def _run_name(config) -> str:
    return f'{config.task}/{config.attention.name}'
