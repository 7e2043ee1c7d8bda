"""Every notebook in notebooks/ runs top to bottom (quick settings), so none can rot.

Notebooks are jupytext percent-format ``.py`` files. Each is converted with jupytext and
executed with nbclient in a kernel started from THIS interpreter (the project's venv),
with ``BINAX_NOTEBOOK_QUICK=1`` (read by each notebook's parameter cell) and matplotlib's
headless Agg backend, in a directory outside the repository and with only the package
importable (as for a user who installed binax): a notebook may not reach for the
repository's ``experiments/`` or ``configs/``. One also runs through ``jupytext --execute``
(the README's command), from another directory.
"""

import json
import os
import subprocess
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
def test_notebook_runs_from_any_directory_with_the_package_alone(path, monkeypatch, tmp_path, installed_only_env):
    monkeypatch.setenv("BINAX_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("BINAX_FIGURE_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.delenv("BINAX_MISMATCH_JSON", raising=False)
    monkeypatch.setenv("PYTHONPATH", installed_only_env["PYTHONPATH"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    notebook = jupytext.read(path)
    assert any("parameters" in c.metadata.get("tags", []) for c in notebook.cells), "no parameter cell"
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_manager_class=_ThisPythonKernel,
        resources={"metadata": {"path": str(elsewhere)}},  # the kernel's working directory
    )
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    # Every notebook saves its figures when asked to.
    assert list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_jupytext_execute_runs_a_notebook_from_another_directory(tmp_path, installed_only_env):
    """The README's ``jupytext --to ipynb --execute`` (nbconvert underneath), started
    outside the repository: the .ipynb it writes holds the outputs and no error."""
    pytest.importorskip("nbconvert")
    env = dict(installed_only_env, BINAX_NOTEBOOK_QUICK="1", MPLBACKEND="Agg", BINAX_FIGURE_DIR=str(tmp_path))
    out = tmp_path / "01.ipynb"
    command = [sys.executable, "-m", "jupytext", "--to", "ipynb", "--execute", str(NOTEBOOKS[0]), "-o", str(out)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cells = [c for c in json.loads(out.read_text())["cells"] if c["cell_type"] == "code"]
    outputs = [o for c in cells for o in c["outputs"]]
    assert outputs and not [o for o in outputs if o["output_type"] == "error"]
    assert all(c["execution_count"] for c in cells)  # every cell ran
