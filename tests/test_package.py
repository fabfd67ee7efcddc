"""The package's attributes: submodules stay reachable as modules, in fresh interpreters."""

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fleche

SRC = str(Path(fleche.__file__).parent.parent)


def run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter that imports this checkout's fleche; fail on error."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


DIGEST_NAMES = "fleche.digest.Digest, fleche.digest.Indigestible, fleche.digest.register_digest_hook"


@pytest.mark.parametrize(
    "imports",
    [
        "import fleche.digest",
        "import fleche",
        "import fleche; import fleche.digest",
        "import fleche.digest; from fleche import digest",
    ],
)
def test_fleche_digest_is_the_module(imports):
    run_python(
        f"{imports}\n"
        "import sys, types\n"
        "import fleche\n"
        "assert fleche.digest is sys.modules['fleche.digest'], fleche.digest\n"
        "assert isinstance(fleche.digest, types.ModuleType)\n"
        f"{DIGEST_NAMES}\n"
        "assert fleche.digest.digest(1) == fleche.digest(1)\n"
    )


@pytest.mark.parametrize(
    "code",
    [
        "from fleche import digest\nd = digest([1, 2])",
        "from fleche.digest import digest\nd = digest([1, 2])",
        "import fleche\nd = fleche.digest([1, 2])",
        "from fleche import *\nd = digest([1, 2])",
    ],
)
def test_digest_is_still_callable_as_documented(code):
    run_python(
        f"{code}\n"
        "from fleche.digest import Digest, digest as function\n"
        "assert isinstance(d, Digest) and d == function([1, 2])\n"
    )


def _submodules(package):
    return sorted(m.name for m in pkgutil.iter_modules(package.__path__))


@pytest.mark.parametrize("package", ["fleche", "fleche.storage"])
def test_every_submodule_the_package_exports_is_the_module(package):
    """After importing the package alone and after importing each submodule, an attribute named
    like a submodule is that submodule."""
    module = __import__(package, fromlist=["_"])
    names = [n for n in _submodules(module) if n != "__main__"]  # importing that one runs the CLI
    run_python(
        f"import sys, {package} as package\n"
        f"exported = [n for n in {names!r} if n in vars(package)]\n"
        "for name in exported:\n"
        f"    assert vars(package)[name] is sys.modules['{package}.' + name], name\n"
        f"for name in {names!r}:\n"
        f"    __import__('{package}.' + name)\n"
        f"    assert getattr(package, name) is sys.modules['{package}.' + name], name\n"
    )


def test_the_wheel_ships_the_license_and_the_typing_marker(tmp_path):
    """A built wheel carries ``py.typed`` (type checkers use fleche's hints) and the LICENSE."""
    import shutil
    import zipfile

    root = tmp_path / "fleche"  # a copy: building leaves build/ behind, not in the checkout
    checkout = Path(SRC).parent
    shutil.copytree(checkout / "src", root / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(checkout / name, root / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0 and "Could not find a version" in done.stderr:
        pytest.skip(f"no build backend reachable: {done.stderr.strip()[-200:]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("fleche-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fleche/py.typed" in names
    assert any(n.endswith("licenses/LICENSE") or n.endswith("/LICENSE") for n in names), names
