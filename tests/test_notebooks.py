"""Every notebook in notebooks/ runs top to bottom (quick settings), so none can rot.

Notebooks are jupytext percent-format ``.py`` files. Each is converted with jupytext and
executed with nbclient in a kernel started from THIS interpreter (the project's venv),
with ``BINAX_NOTEBOOK_QUICK=1`` (read by each notebook's parameter cell) and matplotlib's
headless Agg backend.
"""

import os
import sys
from pathlib import Path

import pytest

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")
from jupyter_client.kernelspec import KernelSpec  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))


class _ThisPythonKernel(KernelManager):
    """An ipykernel on ``sys.executable``, whatever kernelspecs the machine has installed."""

    @property
    def kernel_spec(self):
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="binax", language="python",
        )


def test_there_are_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_estimators.py", "02_mismatch_vs_sigma.py", "03_schedules.py"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
    monkeypatch.setenv("BINAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("BINAX_FIGURE_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("BINAX_MISMATCH_JSON", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    notebook = jupytext.read(path)
    assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells), "no parameter cell"
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_manager_class=_ThisPythonKernel,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # Every notebook saves its figures when asked to.
    assert list(tmp_path.glob("*.png"))
