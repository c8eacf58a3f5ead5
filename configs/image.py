"""Pixel-level CIFAR-10 (grayscale, LRA): reference ``cifar10`` base + transformer configs.

1 layer, 8 heads, 128/64/128, learned positions, dropout 0.3/0.2, lr 5e-4 with linear warmup and
cosine decay, no weight decay, batch 256, 35000 steps. By default pixel value 0 is masked as
padding and a fully masked attention row outputs the sum of V, exactly as in the reference (this
mode reproduces the published number); ``--config.data.image_pixel0_is_padding=False`` fixes the
quirk (no pixel is padding).
  python -m lra_sparse.main --config=configs/image.py:attention=dense --workdir=runs/image
Reference accuracy: 42.44% (248k params).
"""

from lra_sparse import config_lib

REFERENCE = {
    'max_length': 1024, 'batch_size': 256, 'num_train_steps': 35000, 'eval_every_steps': 175,
    'checkpoint_every_steps': 17500, 'learning_rate': 5e-4, 'weight_decay': 0.0,
    'schedule': 'constant * linear_warmup * cosine_decay', 'warmup_steps': 175,
    'steps_per_cycle': 35000,
    'model.emb_dim': 128, 'model.qkv_dim': 64, 'model.mlp_dim': 128, 'model.num_heads': 8,
    'model.num_layers': 1, 'model.dropout_rate': 0.3, 'model.attention_dropout_rate': 0.2,
    'model.learn_pos_emb': True,
    # Reference-exact with pixel 0 as padding: the CLS row of an image whose first pixel is 0 has no
    # valid key and outputs the sum of V, as the reference computes (no effect when no pixel is
    # padding, i.e. with --config.data.image_pixel0_is_padding=False).
    'model.fully_masked_rows': 'reference',
}

TINY = {
    **config_lib.TINY_MODEL,
    'max_length': 1024, 'batch_size': 16, 'num_train_steps': 200, 'eval_every_steps': 100,
    'warmup_steps': 20,
    'steps_per_cycle': 200, 'model.num_layers': 1, 'learning_rate': 1e-3,
}


def get_config(arg: str | None = None):
    """Image config; ``arg`` options are documented in ``lra_sparse.config_lib``."""
    return config_lib.make_config('image', REFERENCE, TINY, arg)
