"""Specs of object stores: the spellings, canonical forms, options, refusals and ``spec_of``.
Nothing here reaches a server: opening a spec connects to nothing."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

import fleche
from fleche.caches import Cache
from fleche.errors import SpecError
from fleche.spec import parse, spec_of
from fleche.storage import CallObjectStore, ValueObjectStore, ValuePickleFile


@pytest.mark.parametrize("text, canonical", [
    ("s3://bucket/sweep", "s3://bucket/sweep"),
    ("s3://bucket/sweep/", "s3://bucket/sweep"),
    ("S3://bucket", "s3://bucket"),
    ("gs://bucket/a/b?format=cloudpickle", "gs://bucket/a/b?format=cloudpickle"),
    ("az://container/p?lock_timeout=5", "az://container/p?lock_timeout=5"),
    ("s3://b/p?lock_timeout=none&endpoint_url=http://127.0.0.1:9000",
     "s3://b/p?endpoint_url=http://127.0.0.1:9000&lock_timeout=none"),
    ("fsspec+memory://trial", "fsspec+memory://trial"),
    ("fsspec+file:///data/store", "fsspec+file:///data/store"),
])
def test_canonical_forms_round_trip(text, canonical):
    spec = parse(text)
    assert spec.kind == "objects" and spec.values_are_objects
    assert str(spec) == spec.reveal() == canonical
    assert parse(spec.reveal()) == spec
    assert spec_of(spec.open()) == canonical


def test_a_relative_local_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(parse("fsspec+file://sub/store")) == f"fsspec+file://{tmp_path}/sub/store"


def test_opening_gives_object_storages_with_the_layout_of_a_directory_store():
    cache = fleche.open("s3://bucket/sweep?format=cloudpickle&lock_timeout=3"
                        "&client_kwargs.region_name=eu-west-1&anon=false&max_concurrency=4")
    options = {"client_kwargs": {"region_name": "eu-west-1"}, "anon": False, "max_concurrency": 4}
    assert cache.values == ValueObjectStore("s3://bucket/sweep/values", options, lock_timeout=3,
                                            serializer="cloudpickle")
    assert cache.calls == CallObjectStore("s3://bucket/sweep/calls", options, lock_timeout=3,
                                          serializer="cloudpickle")
    memory = fleche.open("fsspec+memory://trial")
    assert memory.values.url == "memory://trial/values" and memory.calls.url == "memory://trial/calls"
    assert fleche.open("memory://trial") is not memory  # fleche's own memory cache is another thing


def test_values_of_a_sql_store_as_objects(tmp_path):
    pytest.importorskip("sqlalchemy")
    spec = parse(f"sqlite:///{tmp_path}/calls.db?values=s3://bucket/v%3Fendpoint_url%3Dhttp://h:9")
    assert spec.kind == "sql" and spec.values == "s3://bucket/v?endpoint_url=http://h:9"
    assert spec.values_are_objects and parse(spec.reveal()) == spec
    cache = spec.open()
    assert cache.values == ValueObjectStore("s3://bucket/v", {"endpoint_url": "http://h:9"})
    assert spec_of(cache) == spec.reveal()
    # "+" in an option reads as a space; fsspec+ stays unambiguous anyway
    assert parse(f"sqlite:///{tmp_path}/c.db?values=fsspec+memory://v").values == "fsspec+memory://v"
    server = parse("postgresql://user:pw@db-host/fleche?values=s3://bucket/v")
    assert server.values == "s3://bucket/v" and "pw" not in str(server) + repr(server)
    assert "pw" in server.reveal()


def test_hand_built_caches_have_a_spec_where_one_can_say_them():
    def cache(url, options=(), calls_url=None, calls_options=None):
        return Cache(ValueObjectStore(f"{url}/values", options),
                     CallObjectStore(calls_url or f"{url}/calls",
                                     options if calls_options is None else calls_options))

    assert spec_of(cache("memory://x")) == "fsspec+memory://x"
    assert spec_of(cache("s3://b/p", {"endpoint_url": "http://h:9"})) == "s3://b/p?endpoint_url=http://h:9"
    assert spec_of(cache("s3://b/p", {"client_kwargs": {"region_name": "r"}, "anon": True})) == (
        "s3://b/p?anon=true&client_kwargs.region_name=r")
    assert spec_of(cache("s3://b/p", calls_url="s3://b/elsewhere")) is None
    assert spec_of(cache("s3://b/p", {"anon": True}, calls_options={})) is None
    assert spec_of(cache("s3://b/p", {"secret": "s3cr3t"})) is None  # never put into a spec
    assert spec_of(cache("s3://b/p", {"profile": "true"})) is None  # would come back as a bool
    assert spec_of(Cache(ValueObjectStore("s3://b/v"), ValuePickleFile("/tmp/x"))) is None


@pytest.mark.parametrize("text, reason", [
    ("s3://", "give a location after s3://"),
    ("fsspec+://x", "fsspec\\+PROTOCOL"),
    ("s3://AKIA:abc@bucket/p", "credentials do not belong in a spec"),
    ("s3://bucket/p?secret=abc", "'secret' is a credential"),
    ("s3://bucket/p?key=AKIA", "'key' is a credential"),
    ("gs://bucket/p?token=abc", "'token' is a credential"),
    ("az://c/p?account_key=abc", "'account_key' is a credential"),
    ("s3://bucket/p?client_kwargs.aws_secret_access_key=abc", "is a credential"),
    ("s3://bucket/p?secret_key=abc", "FLECHE_SECRET_KEY"),
    ("s3://bucket/p?endpoint_url=http://AKIA:abc@minio:9000", "'endpoint_url' is a credential"),
    ("s3://bucket/p?format=h5", "format=h5 needs files"),
    ("s3://bucket/p?format=json", "format must be one of"),
    ("s3://bucket/p?durable=true", "'durable' does not apply"),
    ("s3://bucket/p?values=/x", "'values' does not apply"),
    ("s3://bucket/p?lock_timeout=soon", "lock_timeout"),
    ("sqlite:///x.db?values=s3://bucket/p%3Fsecret%3Dabc", "is a credential"),
    ("sqlite:///x.db?values=s3://bucket/p%3Fformat%3Dcloudpickle", "'format' does not apply"),
])
def test_bad_specs_are_refused_naming_the_problem(text, reason):
    with pytest.raises(SpecError, match=reason) as info:
        parse(text)
    assert "abc@" not in str(info.value)


def test_fleche_cache_names_an_object_store_for_every_process(tmp_path):
    """A process started with FLECHE_CACHE=<object store> caches there without code changes."""
    spec = f"fsspec+file://{tmp_path}/store"
    code = (
        "import fleche\n"
        "@fleche.fleche\n"
        "def square(x):\n"
        "    return x * x\n"
        "print(square(7), square.digest(7))\n"
    )
    env = {**os.environ, "FLECHE_CACHE": spec,
           "PYTHONPATH": str(Path(fleche.__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    result, key = done.stdout.split()
    store = fleche.open(spec)
    assert result == "49" and store.load_result(key) == 49
    assert isinstance(store.calls, CallObjectStore) and pickle.loads(pickle.dumps(store)) == store
