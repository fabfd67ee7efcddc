"""What ``Sql`` can store exactly, so that a loaded record equals the saved one."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from ..call import DigestedCall
from ..digest import DIGEST_LENGTH, Digest
from ..errors import SaveError


def _dump(entries: Mapping[str, Any]) -> str:
    return json.dumps(dict(entries), ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _storable(text: str) -> bool:
    """Whether every database can hold ``text`` exactly (PostgreSQL refuses NUL; UTF-8 lone
    surrogates)."""
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(value: Any, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if type(value) is not str:
        raise SaveError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    if not _storable(value):
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


def _check_record(call: DigestedCall) -> None:
    """Raise :class:`SaveError` unless the database can hold ``call`` so it loads back equal."""
    try:
        _check_text(call.name, "the call's name")
        for attr in ("module", "version", "code_digest"):
            _check_text(getattr(call, attr), f"the call's {attr}", optional=True)
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
