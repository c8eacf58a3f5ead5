"""A run's ``results.json``: what makes a run finished, read the same way by sweeps and reports.

A run is finished when its ``results.json`` is a JSON object with the task, the attention method
and the validation and test accuracies. Anything else (no file, a file torn by a kill, keys
missing) is an unfinished run: a sweep runs it again, a report names it and leaves it out.
"""

from __future__ import annotations

import json
import os

import numpy as np

from lra_sparse.errors import UserError

# Keys of results.json a finished run has: (key, key inside it or None).
REQUIRED = (('task', None), ('attention', None), ('validation', 'accuracy'), ('test', 'accuracy'))


class UnreadableResultsError(UserError):
    """A run's results.json is missing, not valid JSON or lacks a required key."""


def read_results(workdir: str) -> dict:
    """The results dict of a finished run.

    Args:
      workdir: the run directory.

    Returns:
      The parsed ``workdir/results.json``.

    Raises:
      UnreadableResultsError: one line naming the file and what is wrong with it.
    """
    path = os.path.join(workdir, 'results.json')
    try:
        with open(path, encoding='utf-8') as f:
            results = json.load(f)
    except FileNotFoundError:
        raise UnreadableResultsError(f'{path} does not exist (the run did not finish)') from None
    except (OSError, ValueError) as error:
        raise UnreadableResultsError(f'{path} is not readable JSON ({error})') from None
    if not isinstance(results, dict):
        raise UnreadableResultsError(f'{path} holds a {type(results).__name__}, not an object')
    for key, inner in REQUIRED:
        value = results.get(key)
        if value is None or (inner and not (isinstance(value, dict) and inner in value)):
            name = f'{key}.{inner}' if inner else key
            raise UnreadableResultsError(f'{path} has no {name!r} (written by another version, '
                                         'or edited)')
    return results


def is_finished(workdir: str) -> bool:
    """Whether ``workdir`` holds a valid results.json (see :func:`read_results`)."""
    try:
        read_results(workdir)
    except UnreadableResultsError:
        return False
    return True


def majority_accuracy(train_targets, test_targets) -> float:
    """Accuracy on the test split of always predicting the train split's most frequent class.

    The floor a classifier has to beat, recorded in results.json as ``majority_accuracy``.

    Args:
      train_targets: int [N_train] class ids of the train split.
      test_targets: int [N_test] class ids of the split the run is scored on.

    Returns:
      The fraction of ``test_targets`` equal to the most frequent train class (ties: the lower id).
    """
    train_targets, test_targets = np.asarray(train_targets), np.asarray(test_targets)
    if not (train_targets.size and test_targets.size):
        return float('nan')
    majority = np.argmax(np.bincount(train_targets.astype(np.int64)))
    return float(np.mean(test_targets == majority))


__all__ = ['REQUIRED', 'UnreadableResultsError', 'flatten', 'is_finished', 'majority_accuracy',
           'read_results']


def flatten(tree: dict, prefix: str = '') -> dict:
    """{'model': {'emb_dim': 64}} -> {'model.emb_dim': 64} (dicts only; lists are leaves)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out
