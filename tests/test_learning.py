"""Every registered attention method learns tiny ListOps: clearly above the majority class.

One short run per method (registry-driven, so a new method is picked up): ListOps of length 10-100,
the tiny 2-layer width-64 model, 200 steps with the method's default knobs (DSA at 90% sparsity,
SpAtten pruning to half the tokens, DFSS 2:4, CTA with its default bucket widths). On this setup
dense reaches about 32% validation accuracy and the sparse methods 27-31%, against a majority class
of 16%; the bound below leaves room for seed-to-seed noise while failing a method that does not
learn at all.
"""

import math

import numpy as np
import pytest
from conftest import tiny_config

from lra_sparse import attention, data, train

LEARNING = {
    'num_train_steps': 200, 'eval_every_steps': 200, 'checkpoint_every_steps': 200,
    'log_every_steps': 50, 'warmup_steps': 50, 'max_length': 100,
    'data.listops_min_length': 10, 'data.listops_max_length': 100,
    'data.listops_num_train': 3000, 'data.listops_num_val': 300, 'data.listops_num_test': 300,
}
MARGIN = 0.06  # accuracy points above the majority class


@pytest.mark.parametrize('name', list(attention.REGISTRY))
def test_method_learns_tiny_listops(name, tmp_path):
    impls = attention.get_method(name).impls  # xla where it applies attention dropout
    impl = 'xla' if 'xla' in impls and impls['xla'].attention_dropout else 'reference'
    config = tiny_config('listops', f'attention={name},impl={impl}', **LEARNING)
    results = train.train_and_evaluate(config, str(tmp_path))
    targets = data.load_task(config).splits['validation']['targets']
    majority = np.bincount(targets).max() / len(targets)
    val = results['validation']
    assert math.isfinite(val['loss']) and math.isfinite(results['test']['loss'])
    assert val['accuracy'] > majority + MARGIN, (name, val['accuracy'], majority)
    if name != 'dense':
        assert val['sparsity'] > 0.0, (name, val['sparsity'])
