"""Call records, their lookup keys and query templates."""

import dataclasses
import pickle

import pytest

from fleche.call import Call, DigestedCall, QueryCall, with_lookup_key
from fleche.digest import Digest, digest


def f(a, b=2, *rest, c=3, **extra):
    return a


def g(a, b=2):
    return a


def test_from_call_binds_the_signature_with_defaults():
    call = Call.from_call(f, 1)
    assert call.arguments == {"a": 1, "b": 2, "rest": (), "c": 3, "extra": {}}
    assert list(call.arguments) == ["a", "b", "rest", "c", "extra"]
    assert call.name == "f" and call.module == __name__
    assert Call.from_call(f, 1, 2, 9, c=4, z=5).arguments == {
        "a": 1, "b": 2, "rest": (9,), "c": 4, "extra": {"z": 5},
    }
    with pytest.raises(TypeError):
        Call.from_call(g, 1, 2, 3)


def test_lookup_key_depends_on_identity_and_arguments_only():
    base = Call.from_call(g, 1)
    assert base.to_lookup_key() == Call.from_call(g, a=1, b=2).to_lookup_key()
    assert base.to_lookup_key() != Call.from_call(g, 2).to_lookup_key()
    assert base.to_lookup_key() != base.replace(version="2").to_lookup_key()
    assert base.to_lookup_key() != base.replace(module="elsewhere").to_lookup_key()
    assert base.to_lookup_key() != base.replace(code_digest=digest("code")).to_lookup_key()
    assert base.to_lookup_key() != base.replace(name="h").to_lookup_key()
    assert base.to_lookup_key() == base.replace(result=5, metadata={"m": {"x": 1}}).to_lookup_key()
    assert base.to_lookup_key() != Call.from_call(g, 1.0).to_lookup_key()


def test_digested_call_shares_the_key():
    call = Call.from_call(g, [1, 2], b={"x": 1}).replace(result=(3,))
    record = call.digest()
    assert isinstance(record, DigestedCall)
    assert record.arguments == {"a": digest([1, 2]), "b": digest({"x": 1})}
    assert all(isinstance(v, Digest) for v in record.arguments.values())
    assert record.result == digest((3,))
    assert record.to_lookup_key() == call.to_lookup_key()
    assert record.digest() is record
    assert pickle.loads(pickle.dumps(record)) == record


def test_query_call_matches():
    record = Call.from_call(g, 1).replace(
        result=5, version="1", metadata={"runtime": {"host": "a", "pid": 7}}
    ).digest()
    assert QueryCall().matches(record)
    assert QueryCall(name="g", arguments={"a": 1}).matches(record)
    assert QueryCall(arguments={"a": digest(1)}).matches(record)
    assert not QueryCall(arguments={"a": 2}).matches(record)
    assert not QueryCall(arguments={"missing": 1}).matches(record)
    assert QueryCall(result=5).matches(record) and not QueryCall(result=6).matches(record)
    assert QueryCall(version="1").matches(record) and not QueryCall(version="2").matches(record)
    assert QueryCall(metadata={"runtime": {"host": "a"}}).matches(record)
    assert QueryCall(metadata={"runtime": {}}).matches(record)
    assert not QueryCall(metadata={"runtime": {"host": "b"}}).matches(record)
    assert not QueryCall(metadata={"runtime": {"user": "a"}}).matches(record)
    assert not QueryCall(metadata={"other": {}}).matches(record)
    # An undigested call matches the same way.
    assert QueryCall(arguments={"a": 1}).matches(Call.from_call(g, 1))


def test_a_record_handed_its_lookup_key_keeps_it_until_its_identity_changes(monkeypatch):
    import fleche.call as call_module

    computed = []
    real = call_module._lookup_key
    monkeypatch.setattr(call_module, "_lookup_key", lambda c: computed.append(c) or real(c))
    plain = Call("f", {"x": 1}, result=2)
    key = plain.to_lookup_key()
    assert plain.to_lookup_key() == key and len(computed) == 2  # a plain record digests anew
    call = with_lookup_key(Call("f", {"x": 1}, result=2), key)
    record = call.digest().replace(metadata={"runtime": {}}, inline={})
    assert record.to_lookup_key() == key and call.to_lookup_key() == key
    assert len(computed) == 2  # digest() and replace() of metadata/result/inline keep the key
    for change in ({"name": "g"}, {"arguments": {"x": 2}}, {"module": "m"}, {"version": "2"},
                   {"code_digest": "c"}):
        changed = record.replace(**change)
        assert changed.to_lookup_key() != key
        assert changed.to_lookup_key() == dataclasses.replace(record, **change).to_lookup_key()
    # The remembered key is not part of the record: equal, and pickled without it.
    fresh = Call("f", {"x": 1}, result=2).digest().replace(metadata={"runtime": {}}, inline={})
    assert record == fresh and pickle.dumps(record) == pickle.dumps(fresh)
    assert pickle.loads(pickle.dumps(record)).to_lookup_key() == key


def test_a_miss_digests_its_lookup_key_once(tmp_path, monkeypatch):
    import fleche
    import fleche.call as call_module

    computed = []
    real = call_module._lookup_key
    monkeypatch.setattr(call_module, "_lookup_key", lambda c: computed.append(c) or real(c))
    cache = fleche.open(str(tmp_path))
    f = fleche.fleche(cache=cache)(g)
    assert f(5) == 5 and cache.contains(f.digest(5)) and computed == []  # the decorator's only
    cache.save(Call("f", {"x": 1}, result=2))
    assert len(computed) == 1  # a cache's save digests once, for the record and its storage
