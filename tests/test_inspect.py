"""Inspection drawing and saving on hand-made layer records (the contract's map shapes)."""

import numpy as np
import pytest

from lra_sparse import inspect

B, H, L = 2, 4, 12


def _probs(rng, length):
    logits = rng.normal(size=(B, H, length, length))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def _base(rng, length=L, valid=(10, 7), positions=None):
    mask = np.arange(length)[None, :] < np.asarray(valid)[:, None]
    if positions is None:
        positions = np.broadcast_to(np.arange(length, dtype=np.int32), (B, length)).copy()
    return {'dense_probs': _probs(rng, length), 'mask': mask, 'positions': positions,
            'stats': {'kept_fraction': 0.5, 'attention_cost': 0.75}}


def dsa_layers(rng):
    layers = []
    for _ in range(2):
        r = _base(rng)
        r['kept'] = rng.random((B, H, L, L)) < 0.3
        r['predicted_scores'] = rng.normal(size=(B, H, L, L)).astype(np.float32)
        r['oracle'] = rng.random((B, H, L, L)) < 0.3
        layers.append(r)
    return layers


def spatten_layers(rng):
    """Layer 0 holds 12 tokens and keeps 8 (input positions); layer 1 holds those 8, keeps 5."""
    first = _base(rng)
    first['kept_positions'] = np.array([[0, 1, 2, 4, 5, 7, 8, 9], [0, 1, 3, 4, 5, 6, -1, -1]],
                                       np.int32)
    first['kept_heads'] = np.ones((B, H), bool)
    first['kept_values'] = rng.random((B, H, L, L)) < 0.5
    first['kept'] = first['kept_values']
    second = _base(rng, 8, valid=(8, 6), positions=first['kept_positions'])
    second['kept_positions'] = np.array([[0, 2, 5, 8, 9], [0, 3, 4, 6, -1]], np.int32)
    second['kept_heads'] = np.array([[True, False, True, True], [True, True, False, True]])
    second['kept_values'] = rng.random((B, H, 8, 8)) < 0.5
    second['kept'] = second['kept_values']
    return [first, second]


def cta_layers(rng):
    layers = []
    for _ in range(2):
        r = _base(rng)
        for name in ('query_clusters', 'key_clusters', 'residual_clusters'):
            ids = rng.integers(0, 5, (B, L)).astype(np.int32)
            r[name] = np.where(r['mask'], ids, -1)
        r['approx_probs'] = _probs(rng, L)
        layers.append(r)
    return layers


def _map_axes(fig):
    return [ax for ax in fig.axes if ax.images and ax.get_label() != '<colorbar>']


def test_layer_maps_label_every_map_and_add_a_colorbar_per_row():
    layers = dsa_layers(np.random.default_rng(0))
    fig = inspect.plot_layer_maps(layers, example=1, max_heads=3)
    maps = _map_axes(fig)
    assert len(maps) == 2 * 4 * 3  # (layer, map) rows x heads
    assert all(ax.get_xlabel() == 'key' and ax.get_ylabel() == 'query' for ax in maps)
    assert len([ax for ax in fig.axes if ax.get_label() == '<colorbar>']) == 2 * 4
    assert maps[0].images[0].get_array().shape == (7, 7)  # example 1 has 7 valid tokens


def test_spatten_panels_map_kept_tokens_to_input_positions():
    layers = spatten_layers(np.random.default_rng(1))
    kept = inspect.kept_tokens(layers, example=0)
    assert kept.shape == (3, L)
    assert kept[0].tolist() == [True] * 10 + [False] * 2
    assert np.flatnonzero(kept[1]).tolist() == [0, 1, 2, 4, 5, 7, 8, 9]
    assert np.flatnonzero(kept[2]).tolist() == [0, 2, 5, 8, 9]
    assert np.flatnonzero(inspect.kept_tokens(layers, example=1)[2]).tolist() == [0, 3, 4, 6]
    values = layers[1]['kept_values'][1] & (np.arange(8) < 6)[:, None] & (np.arange(8) < 6)
    assert inspect.kept_value_fraction(layers[1], 1) == pytest.approx(
        values.sum(axis=(1, 2)) / 36)
    fig = inspect.plot_spatten(layers, example=0)
    titles = [ax.get_title() for ax in _map_axes(fig)]
    assert titles == ['kept tokens (dark: kept)', 'kept heads',
                      'kept values (fraction of valid pairs)']
    heads = _map_axes(fig)[1].images[0].get_array()
    assert heads.tolist() == [[1, 1, 1, 1], [1, 0, 1, 1]]
    assert 'kept_values' in inspect.square_maps(layers[1])  # and its maps are in the grid


def test_cta_panels_show_clusters_and_the_reconstructed_map_beside_dense():
    layers = cta_layers(np.random.default_rng(2))
    fig = inspect.plot_cta(layers, example=1, head=2)
    maps = _map_axes(fig)
    assert [ax.get_title() for ax in maps[:3]] == [
        'layer 0 cluster id per position', 'layer 0 dense head 2',
        'layer 0 CTA reconstructed head 2']
    clusters = maps[0].images[0].get_array()
    assert clusters.shape == (3, 7)
    assert clusters.tolist() == [list(layers[0][k][1, :7]) for k in (
        'query_clusters', 'key_clusters', 'residual_clusters')]
    assert all(ax.get_xlabel() == 'key' and ax.get_ylabel() == 'query' for ax in maps
               if 'head' in ax.get_title())
    assert maps[1].images[0].get_clim() == maps[2].images[0].get_clim()  # one colour scale


def test_panels_are_drawn_only_when_their_keys_are_present():
    rng = np.random.default_rng(3)
    dense = [_base(rng)]
    assert inspect.plot_spatten(dense) is None and inspect.plot_cta(dense) is None
    assert not inspect.has_spatten_maps(dense) and not inspect.has_cta_maps(dense)
    only_heads = [{**_base(rng), 'kept_heads': np.ones((B, H), bool)}]
    assert [ax.get_title() for ax in _map_axes(inspect.plot_spatten(only_heads))] == [
        'kept heads']
    only_clusters = cta_layers(rng)
    for layer in only_clusters:
        del layer['approx_probs']
    assert len(_map_axes(inspect.plot_cta(only_clusters))) == 2 * 2


def test_save_maps_round_trips_through_numpy(tmp_path):
    layers = spatten_layers(np.random.default_rng(4))
    path = str(tmp_path / 'maps.npz')
    inspect.save_maps(layers, path)
    with np.load(path) as data:
        assert 'layer0/dense_probs' in data.files and 'layer1/kept_positions' in data.files
        assert data['layer0/stats/kept_fraction'] == pytest.approx(0.5)
        np.testing.assert_array_equal(data['layer1/kept_heads'], layers[1]['kept_heads'])
    loaded = inspect.load_maps(path)
    assert len(loaded) == 2 and loaded[1]['stats'] == {'kept_fraction': 0.5,
                                                        'attention_cost': 0.75}
    for original, back in zip(layers, loaded):
        assert set(original) == set(back)
        for key in original:
            if key != 'stats':
                np.testing.assert_array_equal(original[key], back[key])
