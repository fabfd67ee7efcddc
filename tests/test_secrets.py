"""Secrets: a database password never appears where fleche prints, logs or names a store, and a
process that opens a shared store without a secret key is told so, once.

The PostgreSQL server of the tests trusts local connections, so a spec with any password opens
it: the password here is a real one in a real URL, only never checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import subprocess
from pathlib import Path
import sys
import warnings

import pytest

import fleche
from fleche.call import Call
from fleche.errors import UnsignedStoreWarning
from fleche.spec import mask, parse, spec_of
from faults import child_env

PASSWORD = "s3cret-Pw"


def with_password(url: str, password: str = PASSWORD) -> str:
    sa = pytest.importorskip("sqlalchemy")
    return sa.engine.make_url(url).set(password=password).render_as_string(hide_password=False)


@pytest.fixture
def postgres_spec(tmp_path):
    url = os.environ.get("FLECHE_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("no PostgreSQL server: set FLECHE_TEST_POSTGRES_URL")
    return f"{with_password(url)}?values={tmp_path}/values"


def test_a_parsed_spec_never_shows_the_password():
    spec = f"postgresql://me:{PASSWORD}@db-host:5432/fleche?values=/v&sslmode=require"
    parsed = parse(spec)
    for shown in (str(parsed), repr(parsed), mask(spec)):
        assert PASSWORD not in shown and "me:***@db-host" in shown
    assert PASSWORD in parsed.reveal()  # what opens it elsewhere, asked for by name
    assert parse(parsed.reveal()) == parsed
    as_option = parse(f"postgresql://me@db/f?password={PASSWORD}&values=/v")
    for shown in (str(as_option), repr(as_option), mask(as_option.reveal())):
        assert PASSWORD not in shown and "password=***" in shown


def test_spec_of_and_reprs_of_caches_and_storages_mask_the_password():
    pytest.importorskip("sqlalchemy")
    spec = f"postgresql://me:{PASSWORD}@db-host/fleche?values=/v"
    cache = fleche.open(spec)
    assert PASSWORD not in spec_of(cache)
    assert fleche.open(spec_of(cache, reveal=True)) == cache
    read_only = fleche.caches.ReadOnlyCache(cache)
    for shown in (repr(cache), str(cache), repr(cache.calls), repr(read_only)):
        assert PASSWORD not in shown


def test_the_dask_plugin_name_carries_nothing_of_the_password():
    pytest.importorskip("distributed")
    pytest.importorskip("sqlalchemy")
    from fleche.dask import FlecheCache

    spec = f"postgresql://me:{PASSWORD}@db-host/fleche?values=/v"
    plugin = FlecheCache(spec)
    assert PASSWORD not in repr(plugin)
    # The name is the same whatever the password: it says which store, never which secret.
    assert plugin.name == FlecheCache(spec.replace(PASSWORD, "another")).name
    assert plugin.name == FlecheCache(fleche.open(spec)).name  # a spec or its cache: one plugin
    full = str(parse(spec).reveal())
    assert plugin.name != "fleche-" + hashlib.sha256(full.encode()).hexdigest()[:16]
    assert plugin.name != FlecheCache(spec.replace("db-host", "other-host")).name


def test_a_plugin_name_for_a_cache_without_a_spec_is_salted_in_each_process(tmp_path):
    pytest.importorskip("distributed")
    from fleche.dask import FlecheCache

    script = (
        "import pickle, sys; from fleche.dask import FlecheCache; "
        "print(FlecheCache(pickle.loads(sys.stdin.buffer.read())).name)"
    )
    signed = fleche.caches.Cache(
        fleche.storage.ValuePickleFile(tmp_path / "v", secret_key="key-in-a-field"),
        fleche.storage.CallPickleFile(tmp_path / "c", secret_key="key-in-a-field"),
    )
    here = FlecheCache(signed).name
    assert here == FlecheCache(pickle.loads(pickle.dumps(signed))).name  # idempotent here
    elsewhere = subprocess.run(
        [sys.executable, "-c", script], input=pickle.dumps(signed), capture_output=True,
        env=child_env(), timeout=60, check=True,
    ).stdout.decode().strip()
    assert elsewhere.startswith("fleche-") and elsewhere != here  # no fixed hash to attack


def test_the_command_line_never_prints_the_password(postgres_spec, tmp_path):
    from test_cli import run_here

    cache = fleche.open(postgres_spec)
    with fleche.cache(cache):
        import cli_tasks

        cli_tasks.square(3)
    key = cli_tasks.square.digest(3)
    outputs = [
        run_here("info", postgres_spec), run_here("ls", postgres_spec),
        run_here("show", postgres_spec, key[:8]), run_here("verify", postgres_spec),
        run_here("copy", postgres_spec, str(tmp_path / "copy")),
        run_here("gc", postgres_spec, "--dry-run"), run_here("evict", postgres_spec, key),
        run_here("show", postgres_spec, key, status=1),
        run_here("info", postgres_spec, "--json"),
        run_here("ls", postgres_spec.replace("@127.0.0.1:5432/", "@127.0.0.1:1/"), status=1),
    ]
    cache.close()
    for done in outputs:
        assert PASSWORD not in done.stdout + done.stderr
    assert "***" in outputs[0].stdout


def test_errors_warnings_and_logs_never_show_the_password(tmp_path, caplog):
    pytest.importorskip("sqlalchemy")
    from fleche._tasks import ComputeAndSave

    gone = fleche.open(f"postgresql://me:{PASSWORD}@127.0.0.1:1/fleche?values={tmp_path}/v")
    with pytest.raises(fleche.errors.DatabaseError) as info:
        gone.load_result("ab" * 32)
    assert PASSWORD not in str(info.value)

    @fleche.fleche(cache=gone)
    def double(x):
        return 2 * x

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert double(4) == 8
    assert caught and all(PASSWORD not in str(w.message) for w in caught)
    with caplog.at_level(logging.WARNING, logger="fleche.tasks"):
        assert ComputeAndSave(gone, Call("double", {"x": 5}), lambda x: 2 * x)(5) == 10
    assert "not cached" in caplog.text and PASSWORD not in caplog.text


# -- the warning for unsigned shared stores -------------------------------------------------


def opens_a_store(spec: str, *, env: dict, first: str = "") -> str:
    """Run a process that saves and loads 50 calls through ``spec`` (after running ``first``);
    return its stderr."""
    code = (
        f"{first}\n"
        "import fleche\n"
        f"cache = fleche.open({spec!r})\n"
        "@fleche.fleche(cache=cache)\n"
        "def f(x):\n    return 'v' * 3000 + str(x)\n"
        "for x in range(50):\n    f(x); f(x)\n"
        "copy = fleche.open(" + repr(spec) + ")\n"
        "assert copy.load_result(f.digest(3)).endswith('3')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


def without_key(**extra: str) -> dict:
    """The environment of a child process without the test suite's FLECHE_SECRET_KEY."""
    return {**{k: v for k, v in child_env().items() if k != "FLECHE_SECRET_KEY"}, **extra}


def shared_directory(tmp_path) -> str:
    """A directory others may write to (group-writable): a shared store's home."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o775)
    return str(shared)


def test_an_unsigned_shared_store_warns_once_per_process(tmp_path):
    stderr = opens_a_store(shared_directory(tmp_path) + "/store", env=without_key())
    assert stderr.count("UnsignedStoreWarning") == 1, stderr
    assert "FLECHE_SECRET_KEY" in stderr and "none" in stderr


def test_a_store_only_its_user_can_write_does_not_warn(tmp_path):
    """Whoever could plant an entry in a directory only you can write could run code as you
    anyway: a private store (the default one in your cache directory) is not warned about."""
    private = tmp_path / "private"
    private.mkdir(mode=0o755)
    assert "UnsignedStoreWarning" not in opens_a_store(str(private / "store"), env=without_key())
    assert "UnsignedStoreWarning" not in opens_a_store(
        f"sqlite:///{private}/calls.db", env=without_key())
    shared = shared_directory(tmp_path)
    assert "UnsignedStoreWarning" in opens_a_store(f"sqlite:///{shared}/calls.db", env=without_key())


def test_no_warning_with_a_key_or_an_opt_out_or_in_memory(tmp_path):
    tmp_path = Path(shared_directory(tmp_path))
    spec = str(tmp_path / "store")
    assert "UnsignedStoreWarning" not in opens_a_store(spec, env=without_key(FLECHE_SECRET_KEY="k"))
    assert "UnsignedStoreWarning" not in opens_a_store(
        str(tmp_path / "other"), env=without_key(FLECHE_SECRET_KEY="none"))
    assert "UnsignedStoreWarning" not in opens_a_store(
        str(tmp_path / "third"), env=without_key(),
        first="import warnings, fleche.errors; warnings.filterwarnings('ignore', "
        "category=fleche.errors.UnsignedStoreWarning)")
    assert "UnsignedStoreWarning" not in opens_a_store("memory://", env=without_key())


def test_the_opt_out_is_not_taken_for_a_key(tmp_path, monkeypatch):
    from fleche.storage import ValuePickleFile
    from fleche.storage.envelope import environment_secrets

    monkeypatch.setenv("FLECHE_SECRET_KEY", "none")
    assert environment_secrets() == ()
    values = ValuePickleFile(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsignedStoreWarning)
        assert values.load(values.save([1, 2])) == [1, 2]
    monkeypatch.setenv("FLECHE_SECRET_KEY", "real-key")
    with pytest.raises(fleche.errors.SignatureError, match="unsigned"):
        ValuePickleFile(tmp_path).load(fleche.digest([1, 2]))  # they were written unsigned


def test_the_test_suite_opts_out():
    assert os.environ.get("FLECHE_SECRET_KEY")  # "none" (conftest.py), or a key of your own
