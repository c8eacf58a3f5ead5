"""Byte-level document retrieval on AAN (LRA): reference values of ``base_match_config.py``.

A shared-weight dual encoder (no CLS token, first-position pooling), 4000 bytes per document.
Needs the LRA release TSVs (see README "Getting the datasets").
  python -m lra_sparse.main --config=configs/retrieval.py:attention=dense --workdir=runs/aan
Reference accuracy: 57.46% (1.09M params, 5000 steps; warmup 8000 > steps, literal in the ref).
"""

from lra_sparse import config_lib

REFERENCE = {
    'max_length': 4000, 'batch_size': 32, 'num_train_steps': 5000, 'eval_every_steps': 100,
    'checkpoint_every_steps': 1000, 'learning_rate': 0.05, 'weight_decay': 0.1,
    'schedule': 'constant * linear_warmup * rsqrt_decay', 'warmup_steps': 8000,
    'eval_test_every_eval': True,
    'model.emb_dim': 128, 'model.qkv_dim': 128, 'model.mlp_dim': 512, 'model.num_heads': 4,
    'model.num_layers': 4,
}

TINY = {
    **config_lib.TINY_MODEL,
    'max_length': 128, 'num_train_steps': 200, 'eval_every_steps': 100, 'warmup_steps': 50,
    'eval_test_every_eval': False,
}


def get_config(arg: str | None = None):
    """Retrieval config; ``arg`` options are documented in ``lra_sparse.config_lib``."""
    return config_lib.make_config('retrieval', REFERENCE, TINY, arg)
