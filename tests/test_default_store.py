"""The default store: persistent, in the user's cache directory; specs as ``cache=``; clear
errors for a ``FLECHE_CACHE`` that cannot be a store.

Every test that reaches the real default runs in a subprocess whose ``HOME`` and
``XDG_CACHE_HOME`` are temporary directories, so nothing is written into the user's own cache.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import fleche
from fleche import decorator
from fleche.errors import SpecError
from fleche.spec import CACHE_ENV

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent

SCRIPT = """\
from fleche import fleche

@fleche
def square(x):
    print("computing", x)
    return x * x

print("result", square(3))
"""


def home_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment without ``FLECHE_CACHE`` whose user cache directory is under ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in (CACHE_ENV, "XDG_CACHE_HOME")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"),
               PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    return {**env, **extra}


def run_script(tmp_path: Path, env: dict[str, str], code: str = SCRIPT) -> str:
    script = tmp_path / "run.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout


def run_cli(env: dict[str, str], *args: str, status: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "fleche", *args], env={**env, "COLUMNS": "100"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == status, f"{done.stdout}\n{done.stderr}"
    return done


def test_a_script_is_cached_across_runs_in_the_user_cache_directory(tmp_path):
    env = home_env(tmp_path / "home")
    first = run_script(tmp_path, env)
    second = run_script(tmp_path, env)
    assert "computing 3" in first and "result 9" in first
    assert "computing" not in second and "result 9" in second  # loaded: persistent by default
    store = tmp_path / "home" / ".cache" / "fleche"
    assert (store / "index.sqlite").is_file()  # the index layout, a new store's
    assert not (store / "calls").exists() and not (store / "values").exists()  # 9 is inline
    where = run_script(tmp_path, env, "import fleche\nprint(fleche.spec.spec_of(fleche.cache()))\n")
    assert where.strip() == str(store)


def test_fleche_info_without_a_spec_shows_the_default_store(tmp_path):
    env = home_env(tmp_path / "home")
    store = tmp_path / "home" / ".cache" / "fleche"
    empty = run_cli(env, "info").stdout  # nothing stored yet: says where, and that it is empty
    assert str(store) in empty and re.search(r"calls\s+0 in", empty) and "default" in empty
    assert not store.exists()  # inspecting creates nothing
    run_script(tmp_path, env)
    shown = run_cli(env, "info").stdout
    assert str(store) in shown and re.search(r"calls\s+1 in", shown) and "__main__.square" in shown
    json_out = run_cli(env, "info", "--json").stdout
    assert f'"spec": "{store}"' in json_out and '"n_calls": 1' in json_out
    other = tmp_path / "other"
    named = run_cli({**env, CACHE_ENV: str(other)}, "info").stdout
    assert str(other) in named and CACHE_ENV in named  # the store FLECHE_CACHE names


def test_memory_stays_available_by_spec(tmp_path):
    env = home_env(tmp_path / "home", FLECHE_CACHE="memory://")
    assert "computing 3" in run_script(tmp_path, env)
    assert "computing 3" in run_script(tmp_path, env)  # nothing kept between runs
    assert not (tmp_path / "home" / ".cache" / "fleche").exists()


class Runs(list):
    """The calls a function made; digests as nothing, so a closure over it keeps its key."""

    def __digest__(self):
        return "runs"


def test_cache_takes_a_spec(tmp_path):
    pytest.importorskip("sqlalchemy")
    runs = Runs()

    def body(x):
        runs.append(x)
        return -x

    in_dir = fleche.fleche(cache=str(tmp_path / "dir"))(body)
    in_path = fleche.fleche(cache=tmp_path / "dir")(body)
    in_sqlite = fleche.fleche(cache=f"sqlite:///{tmp_path}/calls.db")(body)
    assert in_dir(1) == in_path(1) == -1 and runs == [1]  # one store, however it is named
    assert fleche.open(str(tmp_path / "dir")).load_result(in_dir.digest(1)) == -1
    assert in_sqlite(2) == in_sqlite(2) == -2 and runs == [1, 2]
    assert fleche.open(f"sqlite:///{tmp_path}/calls.db").contains(in_sqlite.digest(2))
    assert in_sqlite.fleche.cache == fleche.open(f"sqlite:///{tmp_path}/calls.db")
    with pytest.raises(SpecError, match="unknown scheme"):
        fleche.fleche(cache="ftp://nowhere")(body)
    with pytest.raises(TypeError, match="cache="):
        fleche.fleche(cache=42)(body)


def test_fleche_cache_naming_a_regular_file_is_a_spec_error(tmp_path, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a store")
    with pytest.raises(SpecError, match="not a directory"):
        fleche.open(str(a_file))
    with pytest.raises(SpecError, match="not a directory"):
        fleche.open(str(a_file / "store"))
    monkeypatch.setenv(CACHE_ENV, str(a_file))
    monkeypatch.setattr(decorator, "_from_env", None)  # as in a new process
    work = fleche.fleche(lambda x: x)
    with pytest.raises(SpecError, match=f"not a directory.*{CACHE_ENV}"):
        work(1)
    done = run_cli(home_env(tmp_path / "home"), "info", str(a_file), status=2)
    assert "not a directory" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_sqlite_spec_naming_a_directory_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="is a directory"):
        fleche.open(f"sqlite:///{tmp_path}")
