"""What ``Sql`` can store exactly, and the encoding of a whole record in one ``fleche_calls`` row.

A row holds the record's fields as columns, its arguments and metadata as JSON text (``record``)
and its inline values as a pickle in the envelope of :mod:`fleche.storage.envelope` (``inline``,
magic ``b"FLCI"``, format version 2): checksummed, and signed with the storage's secret key when
it has one, over the row's key too, so damaged, planted or moved values are refused before
anything is unpickled. One SELECT gives the whole record back.

Rows written before the envelope (format 1: the magic ``b"FLCI\x01"`` and the pickle, no
checksum) keep loading while no secret key is set; with a key they are refused as unsigned.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

from ...call import DigestedCall
from ...digest import DIGEST_LENGTH, Digest, _mk
from ...errors import CorruptEntryError, SaveError, SignatureError
from ..envelope import Envelope
from .schema import STARTED_LENGTH

__all__ = [
    "ENVELOPE",
    "LEGACY_INLINE_MAGIC",
    "check_record",
    "dump_inline",
    "dump_json",
    "dump_record",
    "dump_version",
    "load_inline",
    "load_record",
    "load_version",
    "recorded_start",
    "storable",
]

ENVELOPE = Envelope(b"FLCI", version=2, what="fleche inline values")
"""The envelope of every ``inline`` BLOB this storage writes."""

LEGACY_INLINE_MAGIC = b"FLCI\x01"
"""Prefix of the ``inline`` BLOBs of format 1 (unchecked), which older fleche versions wrote."""

_PROTOCOL = 5
_loads_json = json.loads


def dump_json(entries: Mapping[str, Any]) -> str:
    return json.dumps(dict(entries), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> bool:
    """Whether every database can hold ``text`` exactly (PostgreSQL refuses NUL; UTF-8 lone
    surrogates)."""
    return _UNSTORABLE.search(text) is None


def _check_text(value: Any, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str:
        raise SaveError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    if not storable(value):
        raise SaveError(f"{what} {value!r} holds a NUL character or a lone surrogate")


def _check_digest(value: Any, what: str) -> None:
    if not isinstance(value, str) or len(value) != DIGEST_LENGTH:
        raise SaveError(f"{what} must be a full Digest, got {value!r}")
    try:
        Digest(str(value))
    except ValueError:
        raise SaveError(f"{what} must be a full Digest, got {value!r}") from None


def _check_json(value: Any, where: str) -> None:
    """Refuse what JSON would not give back as it is (tuples, int keys, NaN, ...)."""
    t = type(value)
    if t is str:
        _check_text(value, where)
    elif t is float:
        if not math.isfinite(value):
            raise SaveError(f"{where} is {value!r}; JSON has no NaN or infinity")
    elif t in (int, bool, type(None)):
        pass
    elif t is list:
        for i, item in enumerate(value):
            _check_json(item, f"{where}[{i}]")
    elif t is dict:
        for k, item in value.items():
            _check_text(k, f"key {k!r} in {where}")
            _check_json(item, f"{where}[{k!r}]")
    else:
        raise SaveError(
            f"{where} is a {t.__name__}; metadata entries must be JSON values (dict with str "
            "keys, list, str, int, float, bool, None) so that they load back unchanged"
        )


def check_record(call: DigestedCall) -> None:
    """Raise :class:`SaveError` unless the database can hold ``call`` so it loads back equal."""
    try:
        _check_text(call.name, "the call's name")
        for attr in ("module", "code_digest"):
            _check_text(getattr(call, attr), f"the call's {attr}", optional=True)
        if type(call.version) is not int:
            _check_text(call.version, "the call's version (a str or an int)", optional=True)
        if not isinstance(call.arguments, Mapping):
            raise SaveError(f"arguments must be a mapping, got {type(call.arguments).__name__}")
        for name, value in call.arguments.items():
            _check_text(name, "an argument name")
            _check_digest(value, f"argument {name!r}")
        if call.result is not None:
            _check_digest(call.result, "the result")
        if call.metadata is not None:
            if not isinstance(call.metadata, Mapping):
                raise SaveError(f"metadata must be a mapping, got {type(call.metadata).__name__}")
            for section, entries in call.metadata.items():
                _check_text(section, "a metadata section name")
                if not isinstance(entries, Mapping):
                    raise SaveError(
                        f"metadata section {section!r} must be a mapping, got {entries!r}"
                    )
                _check_json(dict(entries), f"metadata[{section!r}]")
    except SaveError as e:
        raise SaveError(f"cannot save a call of {call.name!r}: {e}") from None


def dump_version(version: str | int | None) -> tuple[str | None, str | None]:
    """The ``version`` and ``version_type`` columns of a call's version (a str, int or None)."""
    if type(version) is int:
        return str(version), "int"
    return version, None


def load_version(text: str | None, kind: str | None, key: str, location: str) -> str | int | None:
    """The version :func:`dump_version` wrote as ``text`` and ``kind``."""
    if kind is None:
        return text
    if kind == "int" and text is not None:
        try:
            return int(text)
        except ValueError:
            pass
    raise CorruptEntryError(key, location, f"version {text!r} of type {kind!r} is not readable")


def dump_record(call: DigestedCall) -> str:
    """The JSON text of ``call``'s arguments (in order) and metadata, for the ``record`` column."""
    metadata = None if call.metadata is None else {s: dict(e) for s, e in call.metadata.items()}
    return dump_json({"a": {name: str(value) for name, value in call.arguments.items()}, "m": metadata})


def recorded_start(metadata: Any) -> str | None:
    """The ``started`` column for a record with ``metadata``: its ``runtime`` section's
    ``start`` when that is text (its first ``STARTED_LENGTH`` characters), else ``None``."""
    runtime = metadata.get("runtime") if isinstance(metadata, Mapping) else None
    start = runtime.get("start") if isinstance(runtime, Mapping) else None
    return start[:STARTED_LENGTH] if isinstance(start, str) else None


def load_record(text: str, key: str, location: str) -> tuple[dict[str, Digest], Any]:
    """The arguments and metadata from a ``record`` column; :class:`CorruptEntryError` if it is
    not what :func:`dump_record` writes."""
    try:
        data = _loads_json(text)
        arguments = {name: _mk(value) for name, value in data["a"].items()}
        metadata = data["m"]
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CorruptEntryError(key, location, f"bad record JSON: {type(e).__name__}: {e}") from None
    return arguments, metadata


def dump_inline(
    call: DigestedCall, key: str, secrets: Sequence[bytes] = (), location: str | None = None
) -> bytes | None:
    """The ``inline`` column of ``call``, stored under ``key``: its inline values pickled in the
    envelope, signed with ``secrets[0]`` if any (None when there is nothing);
    :class:`SaveError` if a value does not pickle."""
    inline = call.inline
    if not inline:
        return None
    if not isinstance(inline, Mapping):
        raise SaveError(f"inline values must be a mapping, got {type(inline).__name__}")
    for digest_key in inline:
        _check_digest(digest_key, "an inline value's key")
    try:
        payload = pickle.dumps({str(k): v for k, v in inline.items()}, _PROTOCOL)
    except Exception as e:  # noqa: BLE001 - pickling raises many kinds
        raise SaveError(f"an inline value does not pickle: {type(e).__name__}: {e}") from e
    return ENVELOPE.seal(payload, key, secrets, location=location)


def load_inline(
    blob: bytes | None, key: str, location: str, secrets: Sequence[bytes] = ()
) -> dict[Digest, Any] | None:
    """The inline values from the ``inline`` column of the row of ``key``.

    Unpickled only once the envelope is intact and, when ``secrets`` are given, signed with one
    of them for ``key``; :class:`CorruptEntryError` (or its :class:`SignatureError`) otherwise.
    """
    if blob is None:
        return None
    blob = bytes(blob)
    if not blob.startswith(ENVELOPE.magic):
        raise CorruptEntryError(key, location, "inline values not written by fleche (bad magic)")
    if blob.startswith(LEGACY_INLINE_MAGIC):
        if secrets:
            raise SignatureError(
                key, location, "unsigned inline values (written before fleche signed them) "
                "refused: this storage has a secret key; save the call again to sign it"
            )
        payload: Any = memoryview(blob)[len(LEGACY_INLINE_MAGIC):]
    else:
        _, payload = ENVELOPE.open(blob, key, location, secrets)
    try:
        values = pickle.loads(payload)
    except Exception as e:  # noqa: BLE001 - unpickling raises many kinds
        raise CorruptEntryError(key, location, f"inline values do not unpickle: {e!r}") from None
    if type(values) is not dict:
        raise CorruptEntryError(key, location, f"inline values are a {type(values).__name__}")
    return {_mk(k): v for k, v in values.items()}
