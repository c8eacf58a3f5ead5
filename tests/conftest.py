"""Shared test setup: CPU only, a private data cache, small helpers."""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def private_cache(tmp_path_factory):
    """Generated datasets (tiny ListOps) go to a per-session cache, never the user's."""
    cache = tmp_path_factory.mktemp('cache')
    old = os.environ.get('XDG_CACHE_HOME')
    os.environ['XDG_CACHE_HOME'] = str(cache)
    yield cache
    if old is None:
        os.environ.pop('XDG_CACHE_HOME', None)
    else:
        os.environ['XDG_CACHE_HOME'] = old


def tiny_config(task='listops', arg='', /, **overrides):
    """A tiny config for `task` with dotted-key overrides (e.g. {'model.num_layers': 1})."""
    from lra_sparse import config_lib

    config = config_lib.load(f'configs/{task}.py:tiny' + (f',{arg}' if arg else ''))
    return config_lib.apply_overrides(config, overrides)
