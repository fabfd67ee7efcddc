"""The README's examples written as doctests (```pycon blocks) run as written."""

import doctest
import tempfile
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_doctests(tmp_path, monkeypatch):
    pytest.importorskip("pandas")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' stores go here
    result = doctest.testfile(
        str(README), module_relative=False, globs={"__name__": "__main__"},
        optionflags=doctest.NORMALIZE_WHITESPACE,
    )
    assert result.attempted > 0 and result.failed == 0
