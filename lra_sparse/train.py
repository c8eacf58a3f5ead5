"""Training and evaluation: pure jit-compiled steps and ``train_and_evaluate(config, workdir)``.

One notion of time: optimizer steps. The batch for step ``s`` is a pure function of (seed, s), the
dropout key is ``fold_in(rng, s)``, so a run resumed from a checkpoint at step ``s`` continues
exactly as if it had never stopped. Batches are sharded over every device of every host along the
mesh axis ``data``; parameters are replicated (data parallel). Attention statistics and auxiliary
losses come out of the model as dictionaries and are logged without the loop knowing the method.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx, struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lra_sparse import config_lib, data, metrics
from lra_sparse.models import transformer

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
# The run
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


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """Orbax manager under ``workdir/checkpoints`` (atomic saves; old ones pruned)."""
    return ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, 'checkpoints')),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints_to_keep, create=True))


def restore_params(workdir: str) -> dict:
    """Parameters (pure nested dict) of the latest checkpoint of a finished or running run."""
    directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f'no checkpoints in {workdir!r} (expected {directory})')
    with ocp.CheckpointManager(directory) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise FileNotFoundError(f'no checkpoints in {directory}')
        restored = mngr.restore(step, args=ocp.args.StandardRestore())
    return restored['params']


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


def evaluate(eval_fn, params, rest, split: dict, config, sharding) -> dict[str, float]:
    """Exact example-weighted metrics over a split (or ``num_eval_steps`` batches of it).

    Also reports ``examples_per_second``: inference throughput of this evaluation (wall time of
    the whole loop, host batching included; the first evaluation of a run includes compilation).
    """
    batches = data.eval_batches(split, config.batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count())
    results, t_start = [], time.perf_counter()
    for i, batch in enumerate(batches):
        if config.num_eval_steps > 0 and i >= config.num_eval_steps:
            break
        results.append(eval_fn(params, rest, shard_batch(batch, sharding)))
    summary = summarize(results)  # device_get: waits for the last step
    summary['examples_per_second'] = summary['num_examples'] / (time.perf_counter() - t_start)
    return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and evaluates.

    Writes config.json, metrics.jsonl, TensorBoard events, orbax checkpoints and results.json.

    Returns:
      The results dict (also written to results.json): final validation and test metrics,
      num_params, attention method, steps, wall time and throughput.
    """
    config_lib.validate(config)
    task = data.load_task(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    if is_main:
        _write_json(workdir, 'config.json', json.loads(config.to_json_best_effort()))

    mesh = create_mesh()
    batch_sharding = NamedSharding(mesh, P('data'))
    replicated = NamedSharding(mesh, P())
    graphdef, state, tx = init_state(config, task.info)
    num_params = count_params(state.params)

    mngr = checkpoint_manager(workdir, config)
    start_step = mngr.latest_step() or 0
    if start_step:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(start_step, args=ocp.args.StandardRestore(abstract))
    elif config.init_from:
        state = init_from_workdir(state, config.init_from)
    state = jax.device_put(state, replicated)

    lr_fn = learning_rate_fn(config)
    state_sharding = jax.tree.map(lambda _: replicated, state)
    p_train = jax.jit(functools.partial(train_step, graphdef=graphdef, tx=tx, lr_fn=lr_fn,
                                        num_microbatches=config.num_microbatches),
                      in_shardings=(state_sharding, batch_sharding),
                      out_shardings=(state_sharding, replicated), donate_argnums=0)
    p_eval = jax.jit(functools.partial(eval_step, graphdef=graphdef), out_shardings=replicated)

    writer = metrics.MetricWriter(workdir, enabled=is_main, resume_step=start_step)
    train_iter: Iterator[dict] = data.train_batches(
        task.splits['train'], config.batch_size, seed=config.seed, start_step=start_step,
        process_index=jax.process_index(), process_count=jax.process_count())

    total = config.num_train_steps
    window, t_window, steps_in_window = [], time.perf_counter(), 0
    t_start, last_eval = time.perf_counter(), {}
    bar = tqdm.tqdm(total=total, initial=start_step, disable=not is_main, desc=_run_name(config),
                    unit='step', dynamic_ncols=True)
    for step in range(start_step, total):
        batch = shard_batch(next(train_iter), batch_sharding)
        state, step_metrics = p_train(state, batch)
        window.append(step_metrics)
        steps_in_window += 1
        done = step + 1
        bar.update(1)
        if done % config.log_every_steps == 0 or done == total:
            summary = summarize(window)
            if not math.isfinite(summary['loss']):
                raise FloatingPointError(f'non-finite training loss at step {done}: {summary}')
            elapsed = time.perf_counter() - t_window
            summary['steps_per_second'] = steps_in_window / max(elapsed, 1e-9)
            writer.write(done, 'train', summary)
            bar.set_postfix(loss=f'{summary["loss"]:.3f}', acc=f'{summary["accuracy"]:.3f}')
            window, t_window, steps_in_window = [], time.perf_counter(), 0
        if done % config.eval_every_steps == 0 or done == total:
            last_eval = evaluate(p_eval, state.params, state.rest, task.splits['validation'],
                                 config, batch_sharding)
            writer.write(done, 'validation', last_eval)
            if config.eval_test_every_eval:
                writer.write(done, 'test', evaluate(p_eval, state.params, state.rest,
                                                    task.splits['test'], config, batch_sharding))
            t_window = time.perf_counter()  # keep eval time out of steps_per_second
        if done % config.checkpoint_every_steps == 0 or done == total:
            mngr.save(done, args=ocp.args.StandardSave(state))
    bar.close()
    mngr.wait_until_finished()
    mngr.close()

    if not last_eval:  # resumed a finished run: evaluate the restored state once more
        last_eval = evaluate(p_eval, state.params, state.rest, task.splits['validation'], config,
                             batch_sharding)
    test = evaluate(p_eval, state.params, state.rest, task.splits['test'], config,
                    batch_sharding)
    writer.write(total, 'test', test)
    results = _results(config, num_params, total, start_step, time.perf_counter() - t_start,
                       last_eval, test)
    if is_main:
        _write_json(workdir, 'results.json', results)
    writer.close()
    return results


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Evaluates the weights of run ``config.init_from`` with the attention of ``config``.

    This is how a method is applied to a dense-trained model without fine-tuning (DFSS's "w/o
    finetune" columns, SpAtten or CTA at inference): parameters the source run has are loaded,
    the method's own extra state (a DSA predictor, CTA hash parameters) keeps its fresh init.
    Writes config.json, metrics.jsonl (validation and test events at the source's step) and
    results.json (``mode: 'evaluate'``) in ``workdir``.

    Returns:
      The results dict, as :func:`train_and_evaluate` with ``num_train_steps`` 0.
    """
    if not config.init_from:
        raise config_lib.ConfigError(
            'config.init_from=None is not allowed in evaluate mode: give the workdir of the run '
            'whose weights to evaluate (--config.init_from=runs/dense).')
    config_lib.validate(config)
    task = data.load_task(config)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    t_start = time.perf_counter()
    mesh = create_mesh()
    batch_sharding, replicated = NamedSharding(mesh, P('data')), NamedSharding(mesh, P())
    graphdef, state, _ = init_state(config, task.info)
    state = jax.device_put(init_from_workdir(state, config.init_from), replicated)
    p_eval = jax.jit(functools.partial(eval_step, graphdef=graphdef), out_shardings=replicated)
    source_steps = restored_step(config.init_from)
    writer = metrics.MetricWriter(workdir, enabled=is_main)
    splits = {}
    for split in ('validation', 'test'):
        splits[split] = evaluate(p_eval, state.params, state.rest, task.splits[split], config,
                                 batch_sharding)
        writer.write(source_steps, split, splits[split])
    writer.close()
    results = _results(config, count_params(state.params), 0, 0, time.perf_counter() - t_start,
                       splits['validation'], splits['test'])
    results.update(mode='evaluate', init_from=config.init_from)
    if is_main:
        _write_json(workdir, 'config.json', json.loads(config.to_json_best_effort()))
        _write_json(workdir, 'results.json', results)
    return results


def _results(config, num_params: int, total: int, start_step: int, wall: float,
             validation: dict, test: dict) -> dict:
    """The results.json payload of a run."""
    return {
        'task': config.task, 'attention': config.attention.name,
        'attention_config': config.attention.to_dict(), 'num_params': num_params,
        'num_train_steps': total, 'resumed_from_step': start_step,
        'wall_time_seconds': wall,
        'train_steps_per_second': (total - start_step) / wall if total > start_step else None,
        'validation': validation, 'test': test, 'devices': jax.device_count(),
        'platform': jax.devices()[0].platform, 'jax_version': jax.__version__,
    }


def _write_json(workdir: str, name: str, payload: dict) -> None:
    with open(os.path.join(workdir, name), 'w') as f:
        json.dump(payload, f, indent=2, sort_keys=True)


def _run_name(config) -> str:
    return f'{config.task}/{config.attention.name}'
