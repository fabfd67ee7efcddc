"""Entries that are not what they should be: an intact entry of the wrong kind where a call
record belongs, a destructured value that lost a part, and entries signed with another
process's secret key. Each is reported, repaired or left alone as it should be, and never
crashes a decorated call or turns it into a wrong one."""

from __future__ import annotations

import json
import warnings

import pytest

import fleche
from fleche.caches import Cache, memory_cache
from fleche.errors import CorruptEntryError
from fleche.storage import CallPickleFile, ValuePickleFile
from fleche.verify import repair, verify
from fault_tasks import cached, expected, make, warnings_of
from faults import Child, child_env
from tests_support import plant


# -- a value where a call record belongs -------------------------------------------------------


def test_a_cache_refuses_a_value_and_a_call_storage_on_one_directory(tmp_path):
    with pytest.raises(ValueError, match="same directory"):
        Cache(ValuePickleFile(tmp_path), CallPickleFile(tmp_path))
    with pytest.raises(ValueError, match="same directory"):
        Cache(ValuePickleFile(tmp_path / "d"), CallPickleFile(f"{tmp_path}/x/../d"))
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="same directory"):
        Cache(ValuePickleFile(tmp_path / "real"), CallPickleFile(tmp_path / "link"))
    Cache(ValuePickleFile(tmp_path / "values"), CallPickleFile(tmp_path / "calls"))  # fine


def test_a_cache_refuses_hdf5_storages_on_one_directory(tmp_path):
    pytest.importorskip("bagofholding")
    from fleche.storage import CallBagOfHoldingH5File, ValueBagOfHoldingH5File

    with pytest.raises(ValueError, match="same directory"):
        Cache(ValueBagOfHoldingH5File(tmp_path), CallBagOfHoldingH5File(tmp_path))


KINDS = ["a value", "a destructured value"]
LAYOUTS = ["index", "files"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_every_cache_operation_reports_a_value_where_a_call_record_belongs(kind, layout, tmp_path):
    cache = fleche.open(f"{tmp_path / 'store'}?layout={layout}")
    f, _ = cached(cache)
    f(1)
    planted = f.digest(2)
    plant(cache, planted, kind)
    for load in (cache.load, cache.load_result):
        with pytest.raises(CorruptEntryError, match="not a call record") as info:
            load(planted)
        assert info.value.key == planted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [c.arguments["x"] for c in cache.query()] == [1]  # the good call
    assert any(planted in str(w.message) for w in caught)
    with pytest.raises(CorruptEntryError, match="verify --repair"):
        cache.gc()
    with pytest.raises(CorruptEntryError, match="not a call record"):
        cache.transfer(memory_cache())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_decorator_recomputes_and_repairs_a_value_where_a_call_record_belongs(kind, layout, tmp_path):
    cache = fleche.open(f"{tmp_path / 'store'}?layout={layout}")
    f, ran = cached(cache)
    plant(cache, f.digest(2), kind)
    result, caught = warnings_of(f, 2)
    assert result == expected(2) and ran == [2]
    assert any("not a call record" in m for m in caught), caught
    assert cache.load_result(f.digest(2)) == expected(2)  # repaired
    assert f(2) == expected(2) and ran == [2]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_verify_reports_and_repairs_a_value_where_a_call_record_belongs(kind, layout, tmp_path):
    cache = fleche.open(f"{tmp_path / 'store'}?layout={layout}")
    f, ran = cached(cache)
    f(1)
    plant(cache, f.digest(2), kind)
    report = verify(cache)
    corrupt = [p for p in report.problems if p.kind == "corrupt" and p.where == "call"]
    assert f.digest(2) in [p.key for p in corrupt]  # with the parts a destructured one has
    assert all("not a call record" in p.reason for p in corrupt)
    assert all(p.repairable for p in corrupt)
    repair(cache, report.problems)
    assert not [p for p in verify(cache).problems if p.where == "call"]
    assert f(2) == expected(2) and f(1) == expected(1) and ran == [1, 2]


# -- a destructured value that lost a part ---------------------------------------------------


def lose_a_part(cache: Cache, key) -> None:
    """Remove one part of the destructured result of the call ``key``, as a crash or a manual
    cleanup might."""
    result = cache.calls.load(key).result
    part = sorted(cache.values.child_digests(result))[0]
    cache.values.evict(part)


def parts(x: int) -> list[str]:
    return [expected(x), expected(x + 1)]


def of_parts(cache):
    """A function over ``cache`` returning a destructured list, and the arguments it ran with."""
    ran: list[int] = []

    @fleche.fleche(cache=cache)
    def g(x):
        ran.append(x)
        return parts(x)

    return g, ran


@pytest.mark.parametrize("where", ["memory", "pickle files"])
def test_a_value_that_lost_a_part_is_recomputed_once_then_a_hit(where, tmp_path):
    cache = memory_cache() if where == "memory" else fleche.open(str(tmp_path / "store"))
    g, ran = of_parts(cache)
    g(1)
    lose_a_part(cache, g.digest(1))
    assert g(1) == parts(1) and ran == [1, 1]  # the part is gone: a miss
    assert g(1) == parts(1) and ran == [1, 1]  # the save put it back: a hit again
    assert not verify(cache).problems if where != "memory" else True


def test_verify_reports_and_repair_fixes_a_value_that_lost_a_part(tmp_path):
    cache = fleche.open(str(tmp_path / "store"))
    g, ran = of_parts(cache)
    g(1)
    lose_a_part(cache, g.digest(1))
    problems = verify(cache).problems
    assert {(p.kind, p.where) for p in problems} == {("dangling", "value"), ("dangling", "call")}
    assert any("part" in p.reason and "missing" in p.reason for p in problems)
    repair(cache, problems)
    assert not verify(cache).problems
    assert g(1) == parts(1) and g(1) == parts(1) and ran == [1, 1]


# -- entries signed with another key ---------------------------------------------------------


def test_processes_with_different_secret_keys_never_evict_each_others_entries(tmp_path):
    spec = str(tmp_path / "store")
    alpha, beta = child_env(FLECHE_SECRET_KEY="alpha"), child_env(FLECHE_SECRET_KEY="beta")
    unset = {k: v for k, v in child_env().items() if k != "FLECHE_SECRET_KEY"}
    with Child(spec, env=alpha) as a, Child(spec, env=beta) as b, Child(spec, env=unset) as c:
        assert a.run(0, 10)["ran"] == list(range(10))
        other = b.run(0, 10)  # cannot verify alpha's entries: computes, stores nothing
        assert other["errors"] == [] and other["wrong"] == [] and other["ran"] == list(range(10))
        assert len(other["warnings"]) == 10
        assert all("secret key" in m for m in other["warnings"]), other["warnings"][:2]
        assert a.run(0, 10)["ran"] == []  # alpha's entries are all still there
        assert c.run(10, 15)["ran"] == list(range(10, 15))  # unsigned entries
        refused = a.run(10, 15)
        assert refused["ran"] == list(range(10, 15)) and refused["errors"] == []
        assert all("secret key" in m for m in refused["warnings"])
        assert c.run(10, 15)["ran"] == []  # alpha left the unsigned entries alone
        assert b.run(0, 10)["ran"] == list(range(10))  # and beta stored nothing over alpha's
        assert a.run(0, 10)["ran"] == []


def test_a_signature_mismatch_is_left_alone_with_compute_once(tmp_path, monkeypatch):
    spec = str(tmp_path / "store")
    monkeypatch.setenv("FLECHE_SECRET_KEY", "alpha")
    f, _ = make(spec)
    f(3)
    monkeypatch.setenv("FLECHE_SECRET_KEY", "beta")
    g, ran = make(spec, compute_once=True)
    result, caught = warnings_of(g, 3)
    assert result == expected(3) and ran == [3] and any("secret key" in m for m in caught)
    monkeypatch.setenv("FLECHE_SECRET_KEY", "alpha")
    h, ran = make(spec)
    assert h(3) == expected(3) and ran == []
    assert json.dumps(sorted(p.key for p in verify(fleche.open(spec)).problems)) == "[]"


def test_verify_never_evicts_a_call_for_a_value_signed_with_another_key(tmp_path, monkeypatch):
    """Values are shared between calls: one signed by another process's key leaves this
    process's call dangling, but it is a key mismatch, not damage, so nothing is evicted."""
    values, calls = tmp_path / "store" / "values", tmp_path / "store" / "calls"
    mixed = Cache(ValuePickleFile(values, secret_key="alpha"),
                  CallPickleFile(calls, secret_key="beta"))
    key = mixed.save(fleche.call.Call("f", {"x": 1}, result=parts(1)))
    monkeypatch.setenv("FLECHE_SECRET_KEY", "beta")
    cache = fleche.open(str(tmp_path / "store"))
    problems = verify(cache).problems
    assert problems and not any(p.repairable for p in problems), problems
    assert repair(cache, problems) == []
    assert cache.contains(key) and mixed.load_result(key) == parts(1)
