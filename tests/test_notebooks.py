"""Both notebooks execute headless from a clean checkout (training tiny models on the spot)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = ['notebooks/inspect_attention_masks.ipynb', 'notebooks/accuracy_vs_sparsity.ipynb']


@pytest.mark.parametrize('path', NOTEBOOKS)
def test_notebook_executes(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'store no outputs'
    monkeypatch.setenv('LRA_REPO', os.getcwd())
    monkeypatch.setenv('LRA_NOTEBOOK_STEPS', '20')
    monkeypatch.setenv('LRA_NOTEBOOK_SPARSITIES', '0.9')  # one point per method keeps CI short
    monkeypatch.setenv('LRA_NOTEBOOK_MAX_LENGTH', '64')  # so do short sequences
    monkeypatch.setenv('MPLBACKEND', 'Agg')
    NotebookClient(nb, timeout=400, kernel_name='python3',
                   resources={'metadata': {'path': os.getcwd()}}).execute()
