"""Fixtures shared by test files."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def installed_only_env(tmp_path_factory):
    """A subprocess environment in which ``binax`` is importable as if installed and the
    repository's ``configs``/``experiments`` are not: PYTHONPATH is a folder holding only a
    link to this checkout's ``binax/`` (so the tests exercise this checkout, not whatever
    ``pip install -e`` points at). Checked: ``import configs`` fails in it."""
    site = tmp_path_factory.mktemp("site")
    (site / "binax").symlink_to(ROOT / "binax", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    return env


def importable(env: dict, module: str, cwd) -> bool:
    """Whether ``module`` imports in a fresh interpreter with ``env``, started in ``cwd``."""
    import subprocess

    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd).returncode == 0
