"""A base install (``pip install fleche``, no extras) in a fresh virtual environment: every
optional import fails with one line naming the extra to install, and the default store works.

The environment is made once per test session: ``python -m venv``, the base dependencies from
``pyproject.toml``, then this checkout with ``pip install --no-deps -e``. Skips, saying why,
where pip cannot reach a package index.
"""

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
OFFLINE = (
    "Could not find a version", "No matching distribution", "Failed to establish a new connection",
    "Network is unreachable", "Temporary failure in name resolution", "ProxyError",
    "Connection refused", "Max retries exceeded",
)


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "FLECHE_CACHE", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


@pytest.fixture(scope="session")
def base_python(tmp_path_factory) -> Path:
    """The interpreter of a fresh virtual environment holding fleche without any extra."""
    venv = tmp_path_factory.mktemp("base-install") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    base = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["project"]["dependencies"]
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for arguments in (base, ["--no-deps", "-e", str(CHECKOUT)]):
        done = subprocess.run([*pip, *arguments], capture_output=True, text=True, timeout=600,
                              env=_clean_env())
        if done.returncode and any(sign in done.stderr for sign in OFFLINE):
            pytest.skip(f"pip cannot reach a package index: {done.stderr.strip()[-300:]}")
        assert done.returncode == 0, done.stderr
    return python


def run(python: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env=_clean_env(**env))


OPTIONAL = {
    "import fleche.dask": "dask",
    "import fleche.ray": "ray",
    "from fleche.storage import Sql": "sql",
    "import fleche.storage.sql": "sql",
    "from fleche.storage import ValueBagOfHoldingH5File": "h5",
    "import fleche; fleche.open('sqlite:///x.db')": "sql",
    "import fleche; fleche.open('store?format=h5')": "h5",
    "import fleche; from fleche.caches import memory_cache; memory_cache().query().table()": "pandas",
}


def test_the_base_install_has_no_extra(base_python, tmp_path):
    done = run(base_python, "-c", "import fleche, importlib.util as u; print(fleche.__file__, "
               "[m for m in ('sqlalchemy', 'dask', 'ray', 'h5py', 'pandas') if u.find_spec(m)])",
               cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, missing = done.stdout.split(" ", 1)
    assert where.startswith(str(CHECKOUT / "src")) and missing.strip() == "[]"


def test_every_optional_import_names_its_extra(base_python, tmp_path):
    probe = textwrap.dedent(f"""
        import json
        found = {{}}
        for code in {list(OPTIONAL)!r}:
            try:
                exec(code, {{}})
            except ImportError as e:
                found[code] = [type(e).__name__, str(e), isinstance(e, ModuleNotFoundError), e.name]
            else:
                found[code] = None
        print(json.dumps(found))
    """)
    done = run(base_python, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    for code, extra in OPTIONAL.items():
        assert found[code] is not None, f"{code} did not fail on a base install"
        kind, message, is_module_not_found, name = found[code]
        assert kind == "MissingExtraError" and is_module_not_found and name, (code, found[code])
        assert "\n" not in message and f"pip install 'fleche[{extra}]'" in message, (code, message)
        assert name in message, (code, message)  # names what is missing


def test_import_fleche_dask_fails_in_a_few_lines(base_python, tmp_path):
    done = run(base_python, "-c", "import fleche.dask", cwd=tmp_path)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert "During handling" not in done.stderr and "direct cause" not in done.stderr
    assert lines[-1].startswith("fleche.extras.MissingExtraError: ")
    assert "pip install 'fleche[dask]'" in lines[-1] and len(lines) <= 8, done.stderr


def test_the_command_line_says_what_to_install_in_one_line(base_python, tmp_path):
    fleche_command = base_python.parent / "fleche"
    for spec, extra in ((f"sqlite:///{tmp_path}/x.db", "sql"), (f"{tmp_path}/h?format=h5", "h5")):
        done = run(fleche_command, "info", spec, cwd=tmp_path)
        assert done.returncode == 1, done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert f"pip install 'fleche[{extra}]'" in done.stderr and not done.stdout


def test_the_default_store_works_on_a_base_install(base_python, tmp_path):
    script = tmp_path / "run.py"
    script.write_text("from fleche import fleche\n\n@fleche\ndef twice(x):\n"
                      "    print('computing')\n    return 2 * x\n\nprint(twice(21))\n")
    home = tmp_path / "home"
    env = {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    first = run(base_python, str(script), cwd=tmp_path, **env)
    second = run(base_python, str(script), cwd=tmp_path, **env)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout.split() == ["computing", "42"] and second.stdout.split() == ["42"]
