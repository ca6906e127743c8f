"""The notebooks run headless, top to bottom, without errors (and draw their plots).

Each notebook runs in a fresh kernel of this interpreter (the venv's python), from the
`notebooks/` directory, with the Agg backend. The committed notebooks have their outputs
cleared; this is what keeps them working.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import real_model_path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CELL_TIMEOUT_S = 300


def run_notebook(path: Path, tmp_path: Path):
    """Execute a notebook in a kernel started from `sys.executable`; returns it with outputs.
    A kernelspec of our own (not whatever `python3` the machine has registered) makes sure the
    kernel imports the tsjax installed here."""
    import nbformat
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    spec = tmp_path / "kernels" / "tsjax-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "tsjax test",
                "language": "python",
            }
        )
    )
    km = KernelManager(
        kernel_name="tsjax-test",
        kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")]),
    )
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()
    return nb


@pytest.mark.slow
def test_sampling_notebook(tmp_path, monkeypatch):
    real_model_path("smollm2-135m")  # skips unless pulled
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = run_notebook(NOTEBOOKS / "sampling.ipynb", tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors  # (execute() raises first; this guards allow_errors)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no plots"
