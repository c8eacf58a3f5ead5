"""Inspection: attention maps and each method's masks for a trained workdir and chosen inputs.

  from lra_sparse import inspect
  model, config, task = inspect.load_workdir('runs/listops_tiny')        # or inspect.train_tiny()
  layers = inspect.attention_maps(model, inspect.examples(task, [0, 1]))
  layers[0]['dense_probs']   # [batch, heads, q_len, kv_len] full attention of layer 0
  layers[0]['kept']          # method's attended pairs (DSA/DFSS), when the method reports them
  inspect.plot_layer_maps(layers)          # every square map, per layer and head
  inspect.plot_spatten(layers)             # SpAtten: kept tokens / heads / values (None if absent)
  inspect.plot_cta(layers)                 # CTA: cluster ids, reconstructed map beside dense
  inspect.save_maps(layers, 'maps.npz')    # np.load('maps.npz')['layer0/dense_probs']

Every layer's record holds the dense attention map of that layer's weights (``dense_probs``), the
padding ``mask``, the original ``positions`` of the tokens entering the layer (SpAtten drops tokens;
positions map them back to the input) and whatever the method's ``inspect_maps`` returns (see
``lra_sparse/attention/base.py``): ``kept`` bool [batch, heads, q_len, kv_len]; SpAtten's
``kept_positions`` int32 [batch, n_next] (-1: padding), ``kept_heads`` bool [batch, heads],
``kept_values`` bool [batch, heads, q_len, kv_len]; CTA's ``query_clusters`` / ``key_clusters`` /
``residual_clusters`` int32 [batch, length] (-1: padding) and ``approx_probs`` float32
[batch, heads, q_len, kv_len]. Arrays are numpy, with the batch axis first. A panel is drawn only
when its keys are present.

The plotting functions draw on ``matplotlib.figure.Figure`` objects and return them (shown inline
by a notebook); ``fig.savefig(path)`` writes one. Nothing here selects a matplotlib backend.
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


# Square maps drawn as probabilities / scores (a continuous colour scale); others are bool masks.
_CONTINUOUS = ('dense_probs', 'approx_probs', 'predicted_scores')
_CLUSTER_KEYS = ('query_clusters', 'key_clusters', 'residual_clusters')
_SPATTEN_KEYS = ('kept_positions', 'kept_heads', 'kept_values')


def square_maps(record: dict) -> dict[str, np.ndarray]:
    """The [batch, heads, L, L] maps of a layer record (dense_probs, kept, predicted, ...)."""
    probs = record['dense_probs']
    return {k: v for k, v in record.items()
            if isinstance(v, np.ndarray) and v.ndim == 4 and v.shape[:1] == probs.shape[:1]
            and v.shape[-2:] == probs.shape[-2:]}


def _new_figure(width: float, height: float):
    """A pyplot-free Figure with constrained layout (titles, labels and colorbars never overlap)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _draw_map(ax, image: np.ndarray, name: str, title: str):
    """One query-key map on ``ax`` with key / query axis labels; returns the image artist."""
    continuous = name in _CONTINUOUS
    artist = ax.imshow(image.astype(np.float32), interpolation='nearest',
                       cmap='viridis' if continuous else _mask_colormap(),
                       vmin=None if continuous else 0.0, vmax=None if continuous else 1.0)
    ax.set_title(title, fontsize=7)
    ax.set_xlabel('key', fontsize=7, labelpad=1)
    ax.set_ylabel('query', fontsize=7, labelpad=1)
    ax.tick_params(labelsize=5, length=2, pad=1)
    return artist


def _colorbar(fig, artist, axes, name: str) -> None:
    """A colorbar for a row of maps: probability / score, or dropped / kept for a mask."""
    bar = fig.colorbar(artist, ax=axes, shrink=0.9, pad=0.01, aspect=15)
    bar.ax.tick_params(labelsize=6)
    if name in _CONTINUOUS:
        bar.set_label('score' if name == 'predicted_scores' else 'probability', fontsize=6)
    else:
        bar.set_ticks([0.25, 0.75], labels=['dropped', 'kept'])


def _mask_colormap():
    """Two colours for a bool map: white for dropped, black for kept."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(['white', 'black'])


def plot_layer_maps(records: list[dict], example: int = 0, max_heads: int = 4, title: str = '',
                    names: tuple[str, ...] | None = None):
    """Grid of maps: one row per (layer, map), one column per head, valid tokens only.

    Every map has key / query axis labels; each row has its own colorbar (probability or score for
    ``dense_probs`` / ``approx_probs`` / ``predicted_scores``, dropped / kept for a mask).

    Args:
      records: :func:`attention_maps` output (one dict per layer).
      example: which example of the batch.
      max_heads: at most this many heads (columns).
      title: the figure title.
      names: only these maps (default: every [batch, heads, L, L] map of the records).

    Returns:
      A ``matplotlib.figure.Figure``.
    """
    rows = [(i, name, m) for i, r in enumerate(records) for name, m in square_maps(r).items()
            if names is None or name in names]
    heads = min(max_heads, max(m.shape[1] for _, _, m in rows))
    fig = _new_figure(2.3 * heads + 1.0, 2.2 * len(rows) + 0.4)
    axes = fig.subplots(len(rows), heads, squeeze=False)
    for (layer, name, m), row_axes in zip(rows, axes):
        valid = records[layer]['mask'][example].astype(bool)
        artist = None
        for h, ax in enumerate(row_axes):
            if h >= m.shape[1]:
                ax.axis('off')
                continue
            artist = _draw_map(ax, m[example, h][np.ix_(valid, valid)], name,
                               f'layer {layer} {name} head {h}')
        _colorbar(fig, artist, list(row_axes), name)
    fig.suptitle(title or 'attention maps (rows: layer and map; columns: heads)', fontsize=9)
    return fig


def has_spatten_maps(records: list[dict]) -> bool:
    """Whether any layer carries SpAtten's maps ('kept_positions', 'kept_heads', 'kept_values')."""
    return any(k in r for r in records for k in _SPATTEN_KEYS)


def has_cta_maps(records: list[dict]) -> bool:
    """Whether any layer carries CTA's maps (cluster ids or 'approx_probs')."""
    return any(k in r for r in records for k in (*_CLUSTER_KEYS, 'approx_probs'))


def kept_tokens(records: list[dict], example: int = 0) -> np.ndarray:
    """Which input positions are still held after each layer (from 'kept_positions').

    Returns:
      bool [1 + num_layers, input_len]: row 0 the valid input tokens; row i + 1 the positions in
      layer i's 'kept_positions' (a layer without the key keeps what it received).
    """
    first = records[0]
    length = first['mask'].shape[1]
    rows = [np.zeros(length, bool)]
    rows[0][_valid_positions(first['positions'][example], first['mask'][example], length)] = True
    for record in records:
        row = rows[-1].copy()
        if 'kept_positions' in record:
            kept = np.asarray(record['kept_positions'][example])
            row = np.zeros(length, bool)
            row[kept[(kept >= 0) & (kept < length)]] = True
        rows.append(row)
    return np.stack(rows)


def _valid_positions(positions: np.ndarray, mask: np.ndarray, length: int) -> np.ndarray:
    positions = np.asarray(positions)[np.asarray(mask).astype(bool)]
    return positions[(positions >= 0) & (positions < length)]


def kept_value_fraction(record: dict, example: int = 0) -> np.ndarray:
    """Per head, the fraction of valid (query, key) pairs whose value 'kept_values' keeps.

    Returns:
      float [heads].
    """
    kept = np.asarray(record['kept_values'][example]).astype(bool)  # [H, L, L]
    valid = np.asarray(record['mask'][example]).astype(bool)
    pairs = valid[:, None] & valid[None, :]
    return (kept & pairs).sum(axis=(1, 2)) / max(int(pairs.sum()), 1)


def plot_spatten(records: list[dict], example: int = 0, title: str = ''):
    """SpAtten panels: kept tokens per layer at their input positions, kept heads, kept values.

    Each panel is drawn when its key is present in the layer records: 'kept_positions' int32
    [batch, n_next] (-1: padding), 'kept_heads' bool [batch, heads], 'kept_values' bool
    [batch, heads, q_len, kv_len] (shown as the kept fraction of valid pairs per layer and head;
    the maps themselves are in :func:`plot_layer_maps`).

    Returns:
      A ``matplotlib.figure.Figure``, or None when no layer has any of the three keys.
    """
    panels = [name for name, key in (('tokens', 'kept_positions'), ('heads', 'kept_heads'),
                                     ('values', 'kept_values'))
              if any(key in r for r in records)]
    if not panels:
        return None
    widths = {'tokens': 3.0, 'heads': 1.0, 'values': 1.0}
    fig = _new_figure(4.2 * sum(widths[p] for p in panels) / 1.6 + 2, 3.2)
    axes = fig.subplots(1, len(panels), squeeze=False,
                        width_ratios=[widths[p] for p in panels])[0]
    for panel, ax in zip(panels, axes):
        if panel == 'tokens':
            _spatten_tokens(fig, ax, records, example)
        elif panel == 'heads':
            _layer_head_panel(fig, ax, records, example, 'kept_heads', 'kept heads',
                              lambda r: np.asarray(r['kept_heads'][example], np.float32))
        else:
            _layer_head_panel(fig, ax, records, example, 'kept_values',
                              'kept values (fraction of valid pairs)',
                              lambda r: kept_value_fraction(r, example))
    fig.suptitle(title or f'SpAtten: what each layer keeps (example {example})', fontsize=9)
    return fig


def _spatten_tokens(fig, ax, records: list[dict], example: int) -> None:
    kept = kept_tokens(records, example)
    artist = ax.imshow(kept.astype(np.float32), aspect='auto', interpolation='nearest',
                       cmap=_mask_colormap(), vmin=0.0, vmax=1.0)
    ax.set_yticks(range(kept.shape[0]),
                  labels=['input'] + [f'after layer {i}' for i in range(len(records))])
    ax.set_xlabel('input position', fontsize=8)
    ax.set_title('kept tokens (dark: kept)', fontsize=8)
    ax.tick_params(labelsize=7)
    bar = fig.colorbar(artist, ax=ax, pad=0.01, aspect=15)
    bar.set_ticks([0.25, 0.75], labels=['dropped', 'kept'])
    bar.ax.tick_params(labelsize=6)


def _layer_head_panel(fig, ax, records: list[dict], example: int, key: str, title: str,
                      values) -> None:
    """An image [layer, head] of ``values(record)`` for the layers that have ``key``."""
    layers = [i for i, r in enumerate(records) if key in r]
    grid = np.stack([values(records[i]) for i in layers])
    artist = ax.imshow(grid, aspect='auto', interpolation='nearest', cmap='viridis',
                       vmin=0.0, vmax=1.0)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(layers)), labels=[f'layer {i}' for i in layers])
    ax.set_xlabel('head', fontsize=8)
    ax.set_title(title, fontsize=8)
    ax.tick_params(labelsize=7)
    for (li, h), value in np.ndenumerate(grid):
        ax.text(h, li, f'{value:.2g}', ha='center', va='center', fontsize=6,
                color='white' if value < 0.5 else 'black')
    bar = fig.colorbar(artist, ax=ax, pad=0.02, aspect=15)
    bar.ax.tick_params(labelsize=6)


def plot_cta(records: list[dict], example: int = 0, head: int = 0, title: str = ''):
    """CTA panels per layer: cluster id per position for each family, dense and reconstructed maps.

    Drawn from 'query_clusters' / 'key_clusters' / 'residual_clusters' int32 [batch, length]
    (-1 on padding; white) and 'approx_probs' float32 [batch, heads, q_len, kv_len] beside
    'dense_probs' on one colour scale; a panel whose key is absent is left out.

    Returns:
      A ``matplotlib.figure.Figure``, or None when no layer has any of these keys.
    """
    layers = [i for i, r in enumerate(records)
              if any(k in r for k in (*_CLUSTER_KEYS, 'approx_probs'))]
    if not layers:
        return None
    with_approx = any('approx_probs' in records[i] for i in layers)
    cols = 3 if with_approx else 2
    fig = _new_figure(4.6 + 3.2 * (cols - 1), 3.0 * len(layers) + 0.4)
    axes = fig.subplots(len(layers), cols, squeeze=False,
                        width_ratios=[1.6] + [1.0] * (cols - 1))
    for layer, row in zip(layers, axes):
        record = records[layer]
        _cta_clusters(fig, row[0], record, example, layer)
        valid = record['mask'][example].astype(bool)
        maps = [('dense_probs', 'dense')] + ([('approx_probs', 'CTA reconstructed')]
                                             if with_approx else [])
        shown = [record[k][example, head][np.ix_(valid, valid)] for k, _ in maps if k in record]
        vmax = max(float(m.max()) for m in shown) if shown else 1.0
        artist = None
        for ax, (key, label) in zip(row[1:], maps):
            if key not in record:
                ax.axis('off')
                continue
            artist = _draw_map(ax, record[key][example, head][np.ix_(valid, valid)], key,
                               f'layer {layer} {label} head {head}')
            artist.set_clim(0.0, vmax)
        if artist is not None:
            _colorbar(fig, artist, list(row[1:]), 'dense_probs')
    fig.suptitle(title or f'CTA: clusters and attention (example {example})', fontsize=9)
    return fig


def _cta_clusters(fig, ax, record: dict, example: int, layer: int) -> None:
    present = [k for k in _CLUSTER_KEYS if k in record]
    if not present:
        ax.axis('off')
        return
    valid = record['mask'][example].astype(bool)
    ids = np.stack([np.asarray(record[k][example])[valid] for k in present]).astype(np.float32)
    ids = np.ma.masked_less(ids, 0)
    artist = ax.imshow(ids, aspect='auto', interpolation='nearest', cmap='viridis')
    ax.set_yticks(range(len(present)), labels=[k.removesuffix('_clusters') for k in present])
    ax.set_xlabel('position (valid tokens)', fontsize=8)
    ax.set_title(f'layer {layer} cluster id per position', fontsize=8)
    ax.tick_params(labelsize=7)
    bar = fig.colorbar(artist, ax=ax, pad=0.01, aspect=15)
    bar.set_label('cluster id', fontsize=6)
    bar.ax.tick_params(labelsize=6)
    bar.ax.yaxis.get_major_locator().set_params(integer=True)


def save_maps(layers: list[dict], path: str) -> None:
    """Writes the layer records to one ``.npz`` that numpy alone can load elsewhere.

    Keys: ``layer{i}/{name}`` for every array of layer i (e.g. ``layer0/dense_probs`` float32
    [batch, heads, L, L], ``layer0/mask``, ``layer1/kept_positions``) and
    ``layer{i}/stats/{name}`` for its statistics (0-d float arrays). Read it back with
    ``np.load(path)`` or :func:`load_maps`.

    Args:
      layers: :func:`attention_maps` output.
      path: the file to write (``.npz`` is added by numpy when missing).
    """
    arrays = {}
    for i, record in enumerate(layers):
        for name, value in record.items():
            if name == 'stats':
                arrays.update({f'layer{i}/stats/{k}': np.asarray(v, np.float64)
                               for k, v in value.items()})
            else:
                arrays[f'layer{i}/{name}'] = np.asarray(value)
    np.savez_compressed(path, **arrays)


def load_maps(path: str) -> list[dict]:
    """The layer records written by :func:`save_maps` (stats as floats)."""
    with np.load(path) as data:
        items = {k: data[k] for k in data.files}
    count = 1 + max(int(k.split('/', 1)[0].removeprefix('layer')) for k in items)
    layers = [{'stats': {}} for _ in range(count)]
    for key, value in items.items():
        layer, name = key.split('/', 1)
        record = layers[int(layer.removeprefix('layer'))]
        if name.startswith('stats/'):
            record['stats'][name.removeprefix('stats/')] = float(value)
        else:
            record[name] = value
    return layers
