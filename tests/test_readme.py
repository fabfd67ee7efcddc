"""The README's examples written as doctests (```pycon blocks) run as written."""

import doctest
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import fleche

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_doctests(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' stores go here
    result = doctest.testfile(
        str(README), module_relative=False, globs={"__name__": "__main__"},
        optionflags=doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0 and result.failed == 0


def python_blocks() -> list[str]:
    """The README's ```python blocks, in order."""
    blocks, current = [], None
    for line in README.read_text().splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append(textwrap.dedent("\n".join(current)))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_python_snippets_compile():
    blocks = python_blocks()
    assert len(blocks) >= 4
    for i, block in enumerate(blocks):
        compile(block, f"README.md python block {i}", "exec")


def test_readme_dask_snippet_runs_as_a_script(tmp_path):
    pytest.importorskip("distributed")
    (snippet,) = [b for b in python_blocks() if "LocalCluster" in b]
    assert 'if __name__ == "__main__":' in snippet  # LocalCluster spawns: the guard is needed
    script = tmp_path / "sweep.py"
    script.write_text(snippet)
    env = {**os.environ, "PYTHONPATH": str(README.parent / "src")}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = fleche.open(str(tmp_path / "sweep-store"))
    assert stored.query().count() == 3
