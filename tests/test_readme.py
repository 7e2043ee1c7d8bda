"""The README's Python examples run as written, and `import binax` reaches every submodule."""

import os
import re
import subprocess
import sys

import pytest
from conftest import importable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


def run(code: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1], ids=["library", "trained_run"])
def test_readme_python_examples_run_from_any_directory_with_the_package_alone(index, tmp_path, installed_only_env):
    blocks = python_blocks()
    assert len(blocks) == 2
    env = dict(installed_only_env, JAX_PLATFORMS="cpu")
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    assert importable(env, "binax", cwd) and not importable(env, "configs", cwd)  # as a user's install
    result = subprocess.run([sys.executable, "-c", blocks[index]], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if index == 1:
        assert re.search(r"step \d+: test accuracy \d+\.\d+%, logits \(297, 10\)", result.stdout), result.stdout
        assert (cwd / "runs" / "digits" / "config.json").exists()  # relative paths land in the cwd


def test_import_binax_is_light_and_every_submodule_is_an_attribute():
    code = (
        "import sys, binax\n"
        "heavy = [m for m in ('orbax.checkpoint', 'tensorboardX', 'tensorflow', 'binax.train', 'binax.export') if m in sys.modules]\n"
        "print('heavy', heavy)\n"
        "print(binax.train.restore_variables.__name__, binax.export.__name__, binax.mismatch.__name__, binax.data.create.__name__)\n"
        "print(sorted(set(binax._LAZY_SUBMODULES) - set(dir(binax))))\n"
    )
    result = run(code, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "heavy []"
    assert lines[1] == "restore_variables binax.export binax.mismatch create"
    assert lines[2] == "[]"


def _project_text_files():
    """The files a user of binax gets: the package, configs, entry points, benchmarks,
    notebooks, docs and tests (what a clone holds, without its virtual environment or runs)."""
    for top in ("binax", "configs", "experiments", "benchmarks", "notebooks", "docs", "tests"):
        for dirpath, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                if name.endswith((".py", ".md")):
                    yield os.path.join(dirpath, name)
    for name in os.listdir(ROOT):
        if name.endswith(".md"):
            yield os.path.join(ROOT, name)


def test_docs_stand_alone_without_the_teams_reference_folder():
    # Users do not have the folder the team was given: a citation must name a paper or official
    # code. The pattern is assembled so that this file does not match itself.
    pattern = re.compile(r"\.\./" + "shared|shared/" + "reference|" + r"methods\.md")
    offenders = []
    for path in _project_text_files():
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if pattern.search(line):
                    offenders.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert not offenders, "cite the paper or official code instead:\n" + "\n".join(offenders)
