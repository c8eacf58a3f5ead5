"""Both notebooks execute headless from a clean checkout and show their figures inline.

The inspection notebook trains tiny models on the spot; the accuracy notebook reads the summaries
shipped in docs/results (or trains a tiny compare sweep when there are none).
"""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = ['notebooks/inspect_attention_masks.ipynb', 'notebooks/accuracy_vs_sparsity.ipynb']


@pytest.mark.parametrize('path', NOTEBOOKS)
def test_notebook_executes_and_shows_figures(path, monkeypatch):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), 'store no outputs'
    monkeypatch.setenv('LRA_REPO', os.getcwd())
    monkeypatch.setenv('LRA_NOTEBOOK_STEPS', '20')
    monkeypatch.setenv('LRA_NOTEBOOK_SPARSITIES', '0.9')  # one point per method keeps CI short
    monkeypatch.setenv('LRA_NOTEBOOK_MAX_LENGTH', '64')  # so do short sequences
    monkeypatch.delenv('MPLBACKEND', raising=False)  # the notebooks' own inline backend
    NotebookClient(nb, timeout=400, kernel_name='python3',
                   resources={'metadata': {'path': os.getcwd()}}).execute()
    images = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
              if 'image/png' in o.get('data', {})]
    figure_cells = [c for c in nb.cells if c.cell_type == 'code' and 'display(' in c.source
                    and 'plot_' in c.source]
    assert len(images) >= len(figure_cells) >= 2, f'{path}: {len(images)} inline images'
