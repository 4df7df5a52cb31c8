"""The walkthrough notebook runs top to bottom on CPU, and is committed without outputs.

Executing it is the test that keeps it from rotting: it imports the modules and calls them, so a
renamed function or a changed result fails here. Needs the test-only packages nbformat, nbclient
and ipykernel (the kernel is the interpreter running pytest); without them the tests skip.
"""

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "walkthrough.ipynb"
CELL_TIMEOUT_S = 600


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None or "execution" in cell.metadata)]
    assert not dirty, (f"code cells {dirty} carry outputs or execution counts: clear them before committing "
                       "(jupyter nbconvert --clear-output --inplace notebooks/walkthrough.ipynb)")


def test_notebook_runs_top_to_bottom(monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel must be the interpreter running pytest. Kernel "python3" is found first in this
    # environment (not in a user-wide Jupyter directory), where ipykernel installs a spec whose
    # command "python" jupyter_client replaces by sys.executable; without that spec, jupyter_client
    # falls back to ipykernel's built-in one, which also uses sys.executable.
    monkeypatch.setenv("JUPYTER_PREFER_ENV_PATH", "1")
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
    start = time.perf_counter()
    client.execute(env=env)
    elapsed = time.perf_counter() - start
    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    print(f"walkthrough.ipynb ran in {elapsed:.0f} s with {sys.executable}")
