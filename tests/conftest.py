"""Fixtures shared by test files."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_JAX_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    """One JAX compilation cache for the whole test session.

    Many tests compile the same programs: the same small models in several files, and the
    runs a test starts as subprocesses (a killed run, its resume, the uninterrupted
    reference). XLA's persistent cache lets the second compile of a program read the
    first's result from disk. Set in the main process before any worker or subprocess
    starts, so pytest-xdist's workers and every subprocess inherit the same folder; a
    ``JAX_COMPILATION_CACHE_DIR`` already set is left alone. The folder is removed when
    the session ends."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or hasattr(config, "workerinput"):
        return
    path = tempfile.mkdtemp(prefix="binax-tests-jax-cache-")
    config.stash[_JAX_CACHE] = path
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    # Every program, not only those compiling for over a second (JAX's default): the
    # tests' small models compile in well under a second, many times over.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def pytest_unconfigure(config):
    path = config.stash.get(_JAX_CACHE, None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


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
