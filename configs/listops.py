"""ListOps (LRA): reference hyperparameters of ``listops/configs/base_listops_config.py``.

Train (locally generated data, no download):
  python -m lra_sparse.main --config=configs/listops.py:attention=dense,tiny \
      --workdir=runs/listops_tiny
Full size: drop ``tiny`` (8.95M params, 5000 steps, length 2000). Reference accuracy: 36.37%.
"""

from lra_sparse import config_lib

REFERENCE = {
    'max_length': 2000, 'batch_size': 32, 'num_train_steps': 5000, 'eval_every_steps': 50,
    'checkpoint_every_steps': 1000, 'learning_rate': 0.05, 'weight_decay': 0.1,
    'schedule': 'constant * linear_warmup * rsqrt_decay', 'warmup_steps': 1000,
    'model.emb_dim': 512, 'model.qkv_dim': 512, 'model.mlp_dim': 1024, 'model.num_heads': 8,
    'model.num_layers': 4, 'model.dropout_rate': 0.1, 'model.attention_dropout_rate': 0.1,
}

TINY = {
    **config_lib.TINY_MODEL,
    'max_length': 200, 'num_train_steps': 600, 'eval_every_steps': 100, 'warmup_steps': 100,
    'learning_rate': 0.05,
    'data.listops_num_train': 6000, 'data.listops_num_val': 500, 'data.listops_num_test': 500,
    'data.listops_min_length': 20, 'data.listops_max_length': 200,
}


def get_config(arg: str | None = None):
    """ListOps config; ``arg`` options are documented in ``lra_sparse.config_lib``."""
    return config_lib.make_config('listops', REFERENCE, TINY, arg)


def sweep_learning_rate(add):
    """Base learning rate of the rsqrt schedule (the reference uses 0.05)."""
    for lr in (0.05, 0.1):
        add(learning_rate=lr)
