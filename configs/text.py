"""Byte-level text classification on IMDB (LRA): reference values of ``base_tc_config.py``.

Needs IMDB (see README "Getting the datasets"). Sequence length 1000 as in the reference code;
``--config.max_length=4000`` gives the 4K variant most papers report.
  python -m lra_sparse.main --config=configs/text.py:attention=dense --workdir=runs/text
Reference accuracy: 64.27% (3.49M params, 20000 steps).
"""

from lra_sparse import config_lib

REFERENCE = {
    'max_length': 1000, 'batch_size': 32, 'num_train_steps': 20000, 'eval_every_steps': 100,
    'checkpoint_every_steps': 2000, 'learning_rate': 0.05, 'weight_decay': 0.1,
    'schedule': 'constant * linear_warmup * rsqrt_decay', 'warmup_steps': 8000,
    'model.emb_dim': 256, 'model.qkv_dim': 256, 'model.mlp_dim': 1024, 'model.num_heads': 4,
    'model.num_layers': 4,
}

TINY = {
    **config_lib.TINY_MODEL,
    'max_length': 128, 'num_train_steps': 200, 'eval_every_steps': 100, 'warmup_steps': 50,
}


def get_config(arg: str | None = None):
    """Text config; ``arg`` options are documented in ``lra_sparse.config_lib``."""
    return config_lib.make_config('text', REFERENCE, TINY, arg)
