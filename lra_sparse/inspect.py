"""Inspection: attention maps and each method's masks for a trained workdir and chosen inputs.

  from lra_sparse import inspect
  model, config, task = inspect.load_workdir('runs/listops_tiny')        # or inspect.train_tiny()
  layers = inspect.attention_maps(model, inspect.examples(task, [0, 1]))
  layers[0]['dense_probs']   # [batch, heads, q_len, kv_len] full attention of layer 0
  layers[0]['kept']          # method's attended pairs (DSA/DFSS), when the method reports them

Every layer's record holds the dense attention map of that layer's weights (``dense_probs``), the
padding ``mask``, the original ``positions`` of the tokens entering the layer (SpAtten drops tokens;
positions map them back to the input) and whatever the method's ``inspect_maps`` returns (see
``lra_sparse/attention/base.py``). Arrays are numpy, with the batch axis first.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
from flax import nnx

from lra_sparse import data, train
from lra_sparse.errors import UserError


class InspectError(UserError):
    """The workdir cannot be inspected (missing, no checkpoint)."""


def load_workdir(workdir: str):
    """Model with the latest checkpoint's weights, its config and task data.

    Returns:
      (model, config, task) — model is an nnx.Module ready for ``attention_maps``.
    """
    config_path = os.path.join(workdir, 'config.json')
    if not os.path.exists(config_path):
        raise InspectError(f'{workdir!r} is not a run directory (no config.json); train one with '
                           'python -m lra_sparse.main or call inspect.train_tiny()')
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    task = data.load_task(config)
    graphdef, state, _ = train.init_state(config, task.info)
    with train.checkpoint_manager(workdir, config) as mngr:
        step = mngr.latest_step()
        if step is None:
            raise InspectError(f'no checkpoint in {workdir!r}/checkpoints')
        state = train.restore_state(mngr, step, state)
    return nnx.merge(graphdef, state.params, state.rest), config, task


def train_tiny(workdir: str, task: str = 'listops', attention: str = 'dense', steps: int = 200,
               **overrides) -> str:
    """Trains a tiny model on the spot (CPU, about a minute) and returns its workdir."""
    from lra_sparse import config_lib

    config = config_lib.load(f'configs/{task}.py:attention={attention},tiny')
    config_lib.apply_overrides(
        config, {'num_train_steps': steps, 'eval_every_steps': steps, **overrides})
    train.train_and_evaluate(config, workdir)
    return workdir


def examples(task, indices, split: str = 'validation') -> dict:
    """A batch of chosen examples of a split (numpy, with 'weights')."""
    arrays = task.splits[split]
    idx = np.asarray(indices)
    batch = {k: np.asarray(v[idx], np.int32) for k, v in arrays.items()}
    batch['weights'] = np.ones(len(idx), np.float32)
    return batch


def _attention_layers(model) -> list:
    return [block.attention for block in model.encoder.blocks]


def attention_maps(model, batch: dict) -> list[dict]:
    """Per-layer maps for ``batch`` (first encoder input for the dual encoder).

    Returns:
      One dict per layer: 'dense_probs' [B, H, L, L], 'mask' [B, L], 'positions' [B, L], the
      method's own maps, and 'stats' (the layer's statistics from the forward pass).
    """
    layers = _attention_layers(model)
    for layer in layers:
        layer.record_maps = True
    try:
        (_, aux), captured = nnx.capture(model, nnx.Intermediate)(batch, deterministic=True)
    finally:
        for layer in layers:
            layer.record_maps = False
    blocks = captured['encoder']['blocks']
    records = []
    for i in range(len(layers)):
        sown = blocks[i]['attention']['maps']
        maps = sown.get_value()[0] if hasattr(sown, 'get_value') else sown[0]
        record = {k: np.asarray(v) for k, v in maps.items()}
        record['stats'] = {k.split('/', 1)[1]: float(v) for k, v in aux['stats'].items()
                           if k.startswith(f'layer{i}/')}
        records.append(record)
    return records


def mask_sparsity(kept: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of valid query-key pairs not kept. kept: [B, H, L, L]; mask: [B, L]."""
    valid = (mask[:, None, :, None] & mask[:, None, None, :])
    valid = np.broadcast_to(valid, kept.shape)
    return float(1.0 - (kept & valid).sum() / max(valid.sum(), 1))


def kept_text(tokens: np.ndarray, positions: np.ndarray) -> str:
    """Byte-level inputs (ids = byte + 1): the kept bytes as text, dropped ones as '·'.

    Args:
      tokens: int [L] one example's input ids.
      positions: int [L'] original positions kept (CLS-shifted positions are handled by caller).
    """
    keep = np.zeros(len(tokens), bool)
    keep[positions[(positions >= 0) & (positions < len(tokens))]] = True
    chars = [chr(t - 1) if (k and 32 <= t - 1 < 127) else ('·' if t > 0 else '')
             for t, k in zip(tokens, keep)]
    return ''.join(chars)


def square_maps(record: dict) -> dict[str, np.ndarray]:
    """The [batch, heads, L, L] maps of a layer record (dense_probs, kept, predicted, ...)."""
    probs = record['dense_probs']
    return {k: v for k, v in record.items()
            if isinstance(v, np.ndarray) and v.ndim == 4 and v.shape[:1] == probs.shape[:1]
            and v.shape[-2:] == probs.shape[-2:]}


def plot_layer_maps(records: list[dict], example: int = 0, max_heads: int = 4, title: str = ''):
    """Grid of images: one row per (layer, map), one column per head, valid tokens only.

    Returns:
      The matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    rows = [(i, name, m) for i, r in enumerate(records) for name, m in square_maps(r).items()]
    heads = min(max_heads, max(m.shape[1] for _, _, m in rows))
    fig, axes = plt.subplots(len(rows), heads, figsize=(2.4 * heads, 2.3 * len(rows)),
                             squeeze=False)
    for (layer, name, m), row_axes in zip(rows, axes):
        valid = records[layer]['mask'][example].astype(bool)
        for h, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if h >= m.shape[1]:
                ax.axis('off')
                continue
            img = m[example, h][np.ix_(valid, valid)].astype(np.float32)
            ax.imshow(img, cmap='viridis' if name == 'dense_probs' else 'Greys',
                      interpolation='nearest')
            ax.set_title(f'L{layer} {name} h{h}', fontsize=7)
    fig.suptitle(title or 'attention maps (rows: layer and map; columns: heads)', fontsize=9)
    fig.tight_layout()
    return fig
