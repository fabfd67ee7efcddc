"""The ``fleche`` command line, run as ``python -m fleche`` in subprocesses against real stores."""

import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import cli_tasks as tasks
import fleche
from fleche.cli import main
from fleche.digest import MIN_PREFIX_LENGTH
from fleche.testing import flip_a_byte_of_row
from tests_support import plant

SRC = Path(__file__).resolve().parents[1] / "src"
TESTS = Path(__file__).resolve().parent
WIDTH = 90


@pytest.fixture(autouse=True)
def _columns(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(WIDTH))  # for the commands run in this process
    monkeypatch.delenv("FLECHE_CACHE", raising=False)


def run(*args, status=0):
    """Run ``python -m fleche ARGS``; check its exit status; return the finished process."""
    env = {k: v for k, v in os.environ.items() if k != "FLECHE_CACHE"}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]), COLUMNS=str(WIDTH))
    done = subprocess.run(
        [sys.executable, "-m", "fleche", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == status, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def run_here(*args, status=0):
    """``fleche ARGS`` run in this process (the same ``main`` without the start-up cost of a
    new interpreter, for the many variations of one command)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
    assert code == status, f"exit {code}\n{out.getvalue()}\n{err.getvalue()}"
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_json(*args, status=0, here=False):
    return json.loads((run_here if here else run)(*args, "--json", status=status).stdout)


LONG_LABEL = "a label far too long for any table column " * 4


def populate(spec, inline=False):
    """Store six calls; unless ``inline``, every value goes to the value storage (small values
    would otherwise live in pickle call records, and these tests corrupt value files)."""
    cache = fleche.open(spec)
    if not inline:
        cache = dataclasses.replace(cache, inline_bytes=0)
    with fleche.cache(cache):
        for x in range(4):
            tasks.square(x)
        tasks.simulate(1.5)
        tasks.simulate(2.5, label=LONG_LABEL)


def spec_for(kind, tmp_path):
    if kind == "pickle":
        return str(tmp_path / "store")  # the index layout, a new directory store's
    if kind == "files":
        return f"{tmp_path}/files?layout=files"
    if kind == "sqlite":
        pytest.importorskip("sqlalchemy")
        return f"sqlite:///{tmp_path}/calls.db?values={tmp_path}/values"
    pytest.importorskip("bagofholding")
    return f"{tmp_path}/h5?format=h5"


@pytest.fixture(params=["pickle", "files", "sqlite", "h5"])
def store(request, tmp_path):
    spec = spec_for(request.param, tmp_path)
    populate(spec)
    return spec


def test_info_ls_show(store):
    info = run_json("info", store)
    assert info["n_calls"] == 6 and info["n_values"] > 6 and info["size_bytes"] > 0
    assert info["functions"] == {"cli_tasks.square": 4, "cli_tasks.simulate": 2}
    text = run_here("info", store).stdout
    assert "cli_tasks.square    4" in text and "cli_tasks.simulate  2" in text

    table = run("ls", store).stdout.splitlines()
    assert table[0].split() == ["key", "function", "arguments", "start", "host", "wall"]
    assert len(table) == 7 and all(len(line) <= WIDTH for line in table)
    assert any("…" in line for line in table)  # the long label is cut
    assert len({line.index("square") for line in table if "square" in line}) == 1  # aligned

    calls = run_json("ls", store, here=True)
    assert len(calls) == 6
    assert {c["function"] for c in calls} == {"square", "simulate"}
    assert all(c["host"] and c["wall_time"] >= 0 and len(c["short_key"]) >= 4 for c in calls)
    (two,) = run_json("ls", store, "--where", "x=2", here=True)
    assert two["arguments"] == {"x": 2} and two["module"] == "cli_tasks"
    (run_,) = run_json("ls", store, "--name", "cli_tasks.simulate", "--where", "label=run", here=True)
    assert run_["arguments"] == {"temperature": 1.5, "label": "run", "steps": 3}
    assert len(run_json("ls", store, "--name", "square", "--limit", "3", here=True)) == 3
    assert run_json("ls", store, "--where", "x=99", here=True) == []

    short = two["short_key"]
    shown = run("show", store, short).stdout
    assert two["key"] in shown and "cli_tasks.square" in shown and "x" in shown
    detail = run_json("show", store, short, here=True)
    assert detail["result"]["value"] == 4 and detail["arguments"]["x"]["value"] == 2
    assert detail["metadata"]["runtime"]["pid"] > 0


@pytest.mark.parametrize("kind", ["pickle", "files", "sqlite"])
def test_values_kept_inline_are_shown(kind, tmp_path):
    """The decorator keeps small arguments and results in the call record: ls and show print
    them (and --json gives them), not <missing value ...>."""
    spec = spec_for(kind, tmp_path)
    populate(spec, inline=True)
    listed = run_here("ls", spec, "--name", "simulate").stdout
    assert "temperature=1.5, label='run', steps=3" in listed and "missing" not in listed
    (two,) = run_json("ls", spec, "--where", "x=2", here=True)
    assert two["arguments"] == {"x": 2}
    detail = run_json("show", spec, two["short_key"], here=True)
    assert detail["arguments"]["x"] == {"key": fleche.digest(2), "value": 2}
    assert detail["result"] == {"key": fleche.digest(4), "value": 4}
    shown = run_here("show", spec, two["short_key"]).stdout
    assert f"4  [{fleche.digest(4)[:12]}]" in shown and f"2  [{fleche.digest(2)[:12]}]" in shown
    assert "missing" not in shown


def test_evict_and_gc(store):
    (one,) = run_json("ls", store, "--where", "x=1", here=True)
    n_values = run_json("info", store, here=True)["n_values"]
    assert run("evict", store, one["short_key"]).stdout.startswith(f"evicted {one['key'][:12]}")
    assert run_json("info", store, here=True)["n_calls"] == 5
    dry = run_json("gc", store, "--dry-run", here=True)
    assert dry["values"] and run_json("info", store, here=True)["n_values"] == n_values
    assert run_json("gc", store)["values"] == dry["values"]
    assert run_json("info", store, here=True)["n_values"] == n_values - len(dry["values"])
    assert run_json("gc", store, here=True)["values"] == []
    run_here("verify", store)
    # What is left still serves the decorator.
    cache = fleche.open(store)
    assert cache.load_result(tasks.square.digest(3)) == 9 and not cache.contains(one["key"])


def test_evict_checks_every_key_first(tmp_path):
    spec = spec_for("pickle", tmp_path)
    populate(spec)
    calls = run_json("ls", spec, here=True)
    run_here("evict", spec, calls[0]["key"], "ffffffff", status=1)
    assert len(run_json("ls", spec, here=True)) == 6  # nothing evicted


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["pickle", "files"])
def test_verify_finds_and_repairs_corrupt_pickle_entries(kind, tmp_path):
    spec = spec_for(kind, tmp_path)
    populate(spec)
    run("verify", spec)
    cache = fleche.open(spec)
    square_3 = tasks.square.digest(3)
    if kind == "files":
        flip_a_byte(Path(cache.calls._path(square_3)))
    else:
        flip_a_byte_of_row(cache.calls, square_3, offset=-20)
    value_of_2 = cache.calls.load(tasks.square.digest(2)).arguments["x"]
    flip_a_byte(Path(cache.values._path(value_of_2)))
    report = run_json("verify", spec, status=1)
    problems = {(p["kind"], p["where"], p["key"]) for p in report["problems"]}
    assert ("corrupt", "call", square_3) in problems
    assert ("corrupt", "value", value_of_2) in problems
    assert ("dangling", "call", tasks.square.digest(2)) in problems
    text = run("verify", spec, status=1).stdout
    assert "checksum mismatch" in text and "problems" in text
    assert "corrupt call" in text and "dangling call" in text
    run("verify", spec, "--repair")
    run("verify", spec)
    # The decorator computes the evicted calls again.
    with fleche.cache(fleche.open(spec)):
        assert tasks.square(3) == 9 and tasks.square(2) == 4
    assert fleche.open(spec).load_result(square_3) == 9


def test_verify_finds_and_repairs_a_truncated_hdf5_entry(tmp_path):
    spec = spec_for("h5", tmp_path)
    populate(spec)
    cache = fleche.open(spec)
    result = cache.calls.load(tasks.simulate.digest(1.5)).result
    trace = cache.values.child_digests(result)  # the dict's parts: the array among them
    victim = next(d for d in trace if cache.values.load(d).__class__.__name__ == "ndarray")
    path = Path(cache.values._path(victim))
    os.truncate(path, path.stat().st_size // 2)
    report = run_json("verify", spec, status=1)
    problems = {(p["kind"], p["where"], p["key"]) for p in report["problems"]}
    assert ("corrupt", "value", victim) in problems
    assert ("dangling", "value", result) in problems
    assert ("dangling", "call", tasks.simulate.digest(1.5)) in problems
    assert all(p["repaired"] for p in run_json("verify", spec, "--repair")["problems"])
    run("verify", spec)
    assert run_json("info", spec)["n_calls"] == 5


def test_verify_finds_a_missing_value_of_a_sqlite_store(tmp_path):
    spec = spec_for("sqlite", tmp_path)
    populate(spec)
    cache = fleche.open(spec)
    result = cache.calls.load(tasks.square.digest(3)).result
    cache.values.evict(result)
    (problem,) = run_json("verify", spec, status=1)["problems"]
    assert problem["kind"] == "dangling" and problem["key"] == tasks.square.digest(3)
    assert "result value" in problem["reason"] and "missing" in problem["reason"]
    run("verify", spec, "--repair")
    run("verify", spec)


def test_copy_between_kinds_of_store(tmp_path):
    source = spec_for("pickle", tmp_path)
    populate(source)
    target = f"sqlite:///{tmp_path}/cluster.db?values={tmp_path}/cluster-values"
    pytest.importorskip("sqlalchemy")
    done = run("copy", source, target)
    assert done.stdout.startswith("copied 6 calls") and "(0 already there)" in done.stdout
    assert done.stderr == ""  # no progress bar where standard error is no terminal
    assert run_json("info", target)["functions"] == run_json("info", source)["functions"]
    copied = fleche.open(target)
    assert copied.load_result(tasks.square.digest(3)) == 9
    assert copied.load(tasks.simulate.digest(2.5, label=LONG_LABEL)).arguments["label"] == LONG_LABEL
    assert run_json("copy", source, target) == {"copied": 0, "already_there": 6}
    # ... and on into HDF5 files, with a progress bar asked for.
    pytest.importorskip("bagofholding")
    h5 = f"{tmp_path}/h5?format=h5"
    done = run("copy", target, h5, "--progress", "always")
    assert "copy [" in done.stderr and "6/6 100%" in done.stderr
    run("verify", h5)
    assert fleche.open(h5).load_result(tasks.square.digest(2)) == 4


def test_copy_between_layouts(tmp_path):
    """A store of the files layout into the index layout and back: the same calls, verified."""
    files = spec_for("files", tmp_path)
    populate(files, inline=True)
    index = f"{tmp_path}/index"
    assert run_here("copy", files, index).stdout.startswith("copied 6 calls")
    assert (tmp_path / "index" / "index.sqlite").is_file() and not (tmp_path / "index" / "calls").exists()
    info = run_json("info", index, here=True)
    assert info["calls_in"] == f"SQLite index {tmp_path}/index/index.sqlite"
    assert info["functions"] == run_json("info", files, here=True)["functions"]
    run_here("verify", index)
    back = f"{tmp_path}/back?layout=files"
    assert run_here("copy", index, back).stdout.startswith("copied 6 calls")
    assert run_json("info", back, here=True)["calls_in"] == f"pickle files in {tmp_path}/back/calls"
    run_here("verify", back)
    assert fleche.open(f"{tmp_path}/back").load_result(tasks.square.digest(3)) == 9
    (shown,) = run_json("ls", index, "--where", "x=2", here=True)
    assert run_json("show", index, shown["short_key"], here=True)["result"]["value"] == 4


def ambiguous_pair():
    """Two arguments of ``square`` whose call keys share their first four characters."""
    seen = {}
    for x in range(100_000):
        prefix = tasks.square.digest(x)[:MIN_PREFIX_LENGTH]
        if prefix in seen:
            return seen[prefix], x
        seen[prefix] = x
    raise AssertionError("no shared prefix")


def test_usage_errors_exit_2(tmp_path):
    spec = str(tmp_path / "store")
    a, b = ambiguous_pair()
    with fleche.cache(fleche.open(spec)):
        tasks.square(a)
        tasks.square(b)
    prefix = tasks.square.digest(a)[:MIN_PREFIX_LENGTH]
    assert "matches 2 stored keys" in run("show", spec, prefix, status=2).stderr
    assert "no call stored under 'abcdef'" in run("show", spec, "abcdef", status=1).stderr
    assert "invalid key 'xyz!'" in run("show", spec, "xyz!", status=2).stderr
    run(status=2)
    run("frobnicate", spec, status=2)
    run("ls", status=2)
    assert "unknown scheme" in run("ls", "ftp://host/x", status=2).stderr
    assert "no store at" in run("info", tmp_path / "missing", status=2).stderr
    assert not (tmp_path / "missing").exists()
    assert "no store at" in run("info", f"sqlite:///{tmp_path}/missing.db", status=2).stderr
    assert not (tmp_path / "missing.db").exists()  # inspecting creates nothing
    assert "ARG=VALUE" in run("ls", spec, "--where", "x", status=2).stderr
    assert "--limit" in run("ls", spec, "--limit", "-1", status=2).stderr
    assert "invalid int value" in run("ls", spec, "--limit", "many", status=2).stderr
    assert run("--version").stdout.startswith("fleche ")


def test_the_fleche_script_is_declared():
    pyproject = tomllib.loads((SRC.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["fleche"] == "fleche.cli:main"
    from fleche.cli import main

    assert main(["ls", "memory://"]) == 0  # main returns the exit status for the script


@pytest.mark.parametrize("kind", ["postgresql", "mariadb"])
def test_copy_into_a_server_database(kind, tmp_path):
    """A laptop's directory into a cluster's database store (``.ci/run`` provides the databases);
    a password never shows."""
    url = os.environ.get({"postgresql": "FLECHE_TEST_POSTGRES_URL",
                          "mariadb": "FLECHE_TEST_MARIADB_URL"}[kind])
    if not url:
        pytest.skip(f"no {kind} database to test with")
    from sqlalchemy.engine import make_url

    from fleche.storage.sql.schema import schema

    password = make_url(url).password or "no password"
    target = f"{url}?values={tmp_path}/shared-values"

    def drop():
        calls = fleche.open(target).calls
        calls.list()  # connects
        schema.drop_all(calls.engine)
        calls.engine.dispose()

    source = spec_for("pickle", tmp_path)
    populate(source)
    drop()
    try:
        done = run("copy", source, target)
        assert done.stdout.startswith("copied 6 calls") and password not in done.stdout
        info = run("info", target)
        assert password not in info.stdout
        # What the database reports it takes (tables and indexes), plus the values directory.
        assert re.search(r"size    [0-9.]+ (B|KiB|MiB)", info.stdout), info.stdout
        assert "cli_tasks.square    4" in info.stdout
        (one,) = run_json("ls", target, "--where", "x=3", here=True)
        assert one["short_key"] and fleche.open(target).load_result(one["key"]) == 9
        run_here("verify", target)
    finally:
        drop()


def test_verify_accepts_values_kept_inline(tmp_path):
    spec = spec_for("pickle", tmp_path)
    populate(spec, inline=True)
    cache = fleche.open(spec)
    record = cache.calls.load(tasks.square.digest(3))
    assert record.inline and record.result in record.inline  # 9 lives in the record
    report = run_json("verify", spec, here=True)
    assert report["problems"] == [] and report["calls"] == 6


@pytest.mark.parametrize("kind", ["pickle", "files"])
@pytest.mark.parametrize("planted", ["a value", "a destructured value"])
def test_every_command_handles_a_value_where_a_call_record_belongs(planted, kind, tmp_path):
    """An intact entry of the wrong kind in the calls directory (or index) is reported as
    corrupt by every command (never an AttributeError), and verify --repair removes it."""
    spec = spec_for(kind, tmp_path)
    populate(spec)
    cache = fleche.open(spec)
    key = tasks.square.digest(99)
    plant(cache, key, planted)
    info = run_json("info", spec, here=True)
    assert info["unreadable_calls"] >= 1 and info["functions"]["cli_tasks.square"] == 4
    assert "unreadable" in run_here("info", spec).stdout
    listed = run_here("ls", spec)
    assert "unreadable" in listed.stderr and len(listed.stdout.splitlines()) == 7
    assert len(run_json("ls", spec, "--where", "x=2", here=True)) == 1
    assert len(run_json("ls", spec, "--limit", "20", here=True)) == 6  # newest skips it
    shown = run_here("show", spec, key, status=1)
    assert "not a call record" in shown.stderr and "verify --repair" in shown.stderr
    run_here("show", spec, tasks.square.digest(2))
    collected = run_here("gc", spec, status=1)
    assert "not a call record" in collected.stderr and "verify --repair" in collected.stderr
    copied = run_here("copy", spec, str(tmp_path / "copy"), status=1)
    assert "not a call record" in copied.stderr and "verify --repair" in copied.stderr
    report = run_json("verify", spec, status=1, here=True)
    assert key in [p["key"] for p in report["problems"] if p["kind"] == "corrupt"]
    assert "not a call record" in run_here("verify", spec, status=1).stdout
    run_here("verify", spec, "--repair")
    run_here("verify", spec)
    run_here("gc", spec)
    run_here("copy", spec, str(tmp_path / "copy"))
    assert run_json("info", spec, here=True)["unreadable_calls"] == 0


@pytest.mark.parametrize("kind", ["pickle", "files"])
def test_evict_removes_a_value_where_a_call_record_belongs(kind, tmp_path):
    spec = spec_for(kind, tmp_path)
    populate(spec)
    key = tasks.square.digest(99)
    plant(fleche.open(spec), key, "a value")
    assert run_json("evict", spec, key[:10], here=True) == {"evicted": [key]}
    assert "evicted" in run_here("evict", spec, tasks.square.digest(1)).stdout
    run_here("verify", spec)


# -- evicting by function and age, clearing ----------------------------------------------------


def _age(spec, x, hours):
    """Make the stored call square(x) look as if it started ``hours`` ago."""
    import datetime

    cache = fleche.open(spec)
    key = tasks.square.digest(x)
    record = cache.calls.load(key)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=hours)
    metadata = {**record.metadata, "runtime": {**record.metadata["runtime"], "start": start.isoformat()}}
    cache.calls.save(record.replace(metadata=metadata))


def test_evict_by_name_and_age(store):
    _age(store, 0, hours=24 * 10)
    _age(store, 1, hours=30)
    dry = run_json("evict", store, "--older-than", "1d", "--dry-run", here=True)
    assert list(dry) == ["would_evict"] and len(dry["would_evict"]) == 2
    assert len(run_json("ls", store, here=True)) == 6  # nothing evicted
    week = run_json("evict", store, "--name", "cli_tasks.square", "--older-than", "1w", here=True)
    assert week == {"evicted": [tasks.square.digest(0)]}
    done = run("evict", store, "--name", "simulate")
    assert done.stdout.count("evicted ") == 2 and "cli_tasks.simulate" in done.stdout
    assert "2 calls evicted" in done.stderr
    left = {c["arguments"]["x"] for c in run_json("ls", store, here=True)}
    assert left == {1, 2, 3}
    assert run_json("evict", store, "--older-than", "90m", here=True)["evicted"] == [
        tasks.square.digest(1)
    ]
    assert run_json("evict", store, "--name", "nothing.like.it", here=True)["evicted"] == []


@pytest.mark.parametrize(
    "args, reason",
    [
        ((), "give the keys of the calls to evict"),
        (("abcd1234", "--name", "square"), "not both"),
        (("--older-than", "a week"), "--older-than takes a duration"),
        (("--older-than", "7y"), "--older-than takes a duration"),
    ],
)
def test_evict_says_what_is_wrong(tmp_path, args, reason):
    spec = spec_for("pickle", tmp_path)
    populate(spec)
    done = run_here("evict", spec, *args, status=2)
    assert reason in done.stderr
    assert len(run_json("ls", spec, here=True)) == 6


def test_clear(store):
    info = run_json("info", store, here=True)
    dry = run_json("clear", store, "--dry-run", here=True)
    assert dry["dry_run"] and dry["calls"] == 6 and dry["values"] == info["n_values"]
    assert run_json("info", store, here=True)["n_calls"] == 6
    refused = run("clear", store, status=2)  # no --yes, and no terminal to ask on
    assert "--yes" in refused.stderr and run_json("info", store, here=True)["n_calls"] == 6
    done = run_json("clear", store, "--yes")
    assert done["calls"] == 6 and done["values"] == info["n_values"]
    after = run_json("info", store, here=True)
    assert after["n_calls"] == 0 and after["n_values"] == 0
    if fleche.spec.parse(store).resolved_layout() == "files":  # SQLite keeps its pages (and
        # its WAL grows), for Sql and the index layout alike
        assert done["size_after"] < done["size_before"]
    assert run("clear", store, "--yes").stdout.startswith("removed 0 calls and 0 values")


@pytest.mark.parametrize("answer, left", [("y\n", 0), ("n\n", 6)])
def test_clear_asks_at_a_terminal(tmp_path, answer, left):
    import pty

    spec = spec_for("pickle", tmp_path)
    populate(spec)
    env = {k: v for k, v in os.environ.items() if k != "FLECHE_CACHE"}
    env.update(PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]))
    controller, terminal = pty.openpty()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "fleche", "clear", spec], stdin=terminal,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
        )
        os.write(controller, answer.encode())
        out, err = child.communicate(timeout=120)
    finally:
        os.close(controller)
        os.close(terminal)
    assert child.returncode == (0 if left == 0 else 1), err
    assert "remove all 6 calls and" in out  # the question
    assert len(run_json("ls", spec, here=True)) == left
    if left:
        assert "cancelled: nothing removed" in err


def test_gc_and_info_draw_a_progress_bar_when_asked(tmp_path):
    spec = spec_for("pickle", tmp_path)
    populate(spec)
    done = run("info", spec, "--progress", "always")
    assert "info [" in done.stderr and "6/6 100%" in done.stderr and "6 in" in done.stdout
    done = run("gc", spec, "--dry-run", "--progress", "always")
    assert "gc [" in done.stderr and "6/6 100%" in done.stderr
    for command in ("info", "gc"):
        assert run(command, spec).stderr == ""  # no bar where standard error is no terminal
        assert run(command, spec, "--progress", "never").stderr == ""


def test_ls_limit_asks_the_store_for_its_newest_calls(tmp_path, monkeypatch):
    from fleche.caches import Cache

    spec = spec_for("pickle", tmp_path)
    populate(spec)
    everything = [row["key"] for row in run_json("ls", spec, here=True)]
    asked = []
    real = Cache.newest
    monkeypatch.setattr(Cache, "newest", lambda self, n: asked.append(n) or real(self, n))
    newest = [row["key"] for row in run_json("ls", spec, "--limit", "2", here=True)]
    assert asked == [2] and newest == everything[:2]
    # With a filter, ls reads the matching calls itself.
    square = run_json("ls", spec, "--limit", "2", "--name", "square", here=True)
    assert asked == [2] and [r["function"] for r in square] == ["square", "square"]
