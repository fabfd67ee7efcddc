"""The ``fleche`` command line on object stores: a real S3 API server (moto's, started here),
reached through the environment's AWS settings as a cluster would reach S3."""

from __future__ import annotations

import pytest

pytest.importorskip("fsspec", reason="the object storages need the s3 extra (fsspec)")


from test_cli import WIDTH, populate, run, run_here, run_json, spec_for, tasks  # noqa: E402

import fleche  # noqa: E402
from fleche.testing import flip_a_byte_of_object  # noqa: E402


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.delenv("FLECHE_CACHE", raising=False)


def test_copy_a_directory_store_into_s3_and_back(tmp_path, s3, bucket):
    """A laptop's directory store into a bucket, inspected there, and back into a directory."""
    laptop = spec_for("pickle", tmp_path)
    populate(laptop)
    remote = f"s3://{bucket}/sweep"
    done = run("copy", laptop, remote)  # a fresh process: credentials from the environment only
    assert done.stdout.startswith(f"copied 6 calls from {laptop} to {remote}")
    assert run_json("copy", laptop, remote, here=True) == {"copied": 0, "already_there": 6}

    info = run_json("info", remote, here=True)
    assert info["kind"] == "objects" and info["n_calls"] == 6 and info["size_bytes"] > 0
    assert info["calls_in"] == f"pickle objects in {remote}/calls"
    assert info["values_in"] == f"pickle objects in {remote}/values"
    assert info["functions"] == run_json("info", laptop, here=True)["functions"]
    text = run_here("info", remote).stdout
    assert f"calls   6 in pickle objects in {remote}/calls" in text

    (two,) = run_json("ls", remote, "--where", "x=2", here=True)
    assert two["arguments"] == {"x": 2}
    shown = run_json("show", remote, two["short_key"], here=True)
    assert shown["result"]["value"] == 4 and shown["key"] == tasks.square.digest(2)
    assert run_here("verify", remote).stdout.startswith("checked 6 calls")

    back = str(tmp_path / "back")
    assert run_here("copy", remote, back).stdout.startswith("copied 6 calls")
    home = fleche.open(back)
    assert home.load_result(tasks.square.digest(3)) == 9
    simulated = home.load_result(tasks.simulate.digest(1.5))
    assert simulated["temperature"] == 1.5 and list(simulated["trace"]) == [0.0, 0.75, 1.5]
    run_here("verify", back)


def test_verify_repair_and_gc_on_s3(tmp_path, s3, bucket):
    spec = f"s3://{bucket}/sweep"
    populate(spec)
    cache = fleche.open(spec)
    square_3 = tasks.square.digest(3)
    flip_a_byte_of_object(cache.calls, square_3)
    report = run_json("verify", spec, status=1, here=True)
    assert {(p["kind"], p["where"], p["key"]) for p in report["problems"]} == {
        ("corrupt", "call", square_3)}
    assert "checksum mismatch" in run_here("verify", spec, status=1).stdout
    run_here("verify", spec, "--repair")
    run_here("verify", spec)
    before = run_json("info", spec, here=True)
    assert before["n_calls"] == 5
    gc = run_json("gc", spec, here=True)
    assert gc["values"] and gc["size_after"] < gc["size_before"]  # square(3)'s values
    assert run_json("info", spec, here=True)["n_values"] == before["n_values"] - len(gc["values"])
    with fleche.cache(fleche.open(spec)):
        assert tasks.square(3) == 9  # computed again


def test_an_empty_or_missing_object_store_is_a_usage_error(s3, bucket):
    assert "no store at s3://" in run_here("info", f"s3://{bucket}/nothing", status=2).stderr
    assert "no store at" in run_here("ls", "s3://fleche-no-such-bucket/x", status=2).stderr
    assert "credential" in run_here("ls", f"s3://{bucket}/x?secret=abc", status=2).stderr


def test_a_sqlite_store_with_its_values_on_s3(tmp_path, s3, bucket):
    pytest.importorskip("sqlalchemy")
    spec = f"sqlite:///{tmp_path}/calls.db?values=s3://{bucket}/values"
    populate(spec)
    info = run_json("info", spec, here=True)
    assert info["n_calls"] == 6 and info["values_in"] == f"pickle objects in s3://{bucket}/values"
    assert info["size_bytes"] > (tmp_path / "calls.db").stat().st_size  # the objects count too
    assert run_here("copy", spec, str(tmp_path / "dir")).stdout.startswith("copied 6 calls")
    run_here("verify", spec)
