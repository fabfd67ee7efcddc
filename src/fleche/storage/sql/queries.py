"""From a :class:`~fleche.call.QueryCall` template to SQL conditions over ``fleche_calls``.

The conditions are exact or conservative: every call matching the template fulfils them, and
``Sql.query`` checks every candidate with :meth:`QueryCall.matches`, so results equal the
generic query's.
"""

from __future__ import annotations

import json
import math
from typing import Any

import sqlalchemy as sa

from ...call import Call, QueryCall
from ...digest import DIGEST_LENGTH, digest
from .dialects import Dialect
from .records import storable
from .schema import arguments, calls, metadata_sections

__all__ = ["as_template", "call_conditions", "keys_among", "stored_form"]


def as_template(template: QueryCall | Call) -> QueryCall:
    """``template`` as a :class:`QueryCall`: a :class:`Call` (digested or not) stands for the
    template with the same fields."""
    if isinstance(template, QueryCall):
        return template
    if isinstance(template, Call):
        return QueryCall(
            name=template.name,
            arguments=template.arguments,
            metadata=template.metadata,
            module=template.module,
            version=template.version,
            code_digest=template.code_digest,
            result=template.result,
        )
    raise TypeError(f"a query template is a QueryCall or a Call, got {type(template).__name__}")


def keys_among(texts: list[str]) -> Any:
    """A SELECT of the stored keys that are in ``texts`` (full keys) or start with one of them
    (prefixes: an index range scan each). ``texts`` must be checked hex digests."""
    full = [t for t in texts if len(t) == DIGEST_LENGTH]
    where = [calls.c.key.in_(full)] if full else []
    where += [
        sa.and_(calls.c.key >= t, calls.c.key < t + "g") for t in texts if len(t) < DIGEST_LENGTH
    ]
    return sa.select(calls.c.key).where(sa.or_(sa.false(), *where))


def stored_form(value: Any) -> str:
    """The form in which an argument or result matching ``value`` is stored: its digest.

    The generic query compares ``digest(template_value) == digest(stored_value)``; stored values
    are digests and ``digest(Digest(x)) == x``, so this holds whether ``value`` is given as a
    value or as a :class:`~fleche.digest.Digest`.
    """
    return str(digest(value))


def call_conditions(template: QueryCall, dialect: Dialect) -> list[Any]:
    """SQL conditions over ``fleche_calls`` that every call matching ``template`` fulfils.

    Name, module, version (type included), code digest, result, arguments, metadata sections
    and scalar metadata entries (str, int, float, bool, None) become conditions; anything else
    is left to :meth:`QueryCall.matches`.
    """
    conditions: list[Any] = []
    for attr in ("name", "module", "code_digest"):
        want = getattr(template, attr)
        if want is None:
            continue
        if type(want) is not str:
            continue  # stored fields are str; leave odd templates to matches()
        conditions.append(calls.c[attr] == want if storable(want) else sa.false())
    version = template.version
    if type(version) is str:
        conditions.append(
            sa.and_(calls.c.version == version, calls.c.version_type.is_(None))
            if storable(version) else sa.false()
        )
    elif type(version) is int:
        conditions.append(sa.and_(calls.c.version == str(version), calls.c.version_type == "int"))
    if template.result is not None:
        result = stored_form(template.result)
        if result == digest(None):
            conditions.append(sa.or_(calls.c.result == result, calls.c.result.is_(None)))
        else:
            conditions.append(calls.c.result == result)
    for name, value in (template.arguments or {}).items():
        if not _sql_can_match(name, conditions):
            continue
        conditions.append(
            sa.exists().where(
                arguments.c.call_key == calls.c.key,
                arguments.c.name == name,
                arguments.c.value == stored_form(value),
            )
        )
    for section, entries in (template.metadata or {}).items():
        if not _sql_can_match(section, conditions):
            continue
        where = [metadata_sections.c.call_key == calls.c.key, metadata_sections.c.section == section]
        for entry, value in (entries or {}).items():
            condition = entry_condition(entry, value, dialect)
            if condition is not None:
                where.append(condition)
        conditions.append(sa.exists().where(*where))
    return conditions


def _sql_can_match(name: Any, conditions: list[Any]) -> bool:
    """Whether a condition on the stored name ``name`` can go into SQL; a name no database can
    hold matches nothing (``false`` is added to ``conditions``), a non-str one is left to
    :meth:`QueryCall.matches`."""
    if type(name) is not str:
        return False
    if not storable(name):
        conditions.append(sa.false())
        return False
    return True


def entry_condition(entry: Any, value: Any, dialect: Dialect) -> Any:
    """SQL for "metadata entry ``entry`` equals ``value``", or None to check it in Python.

    Compares the entry's JSON text as stored with the JSON text of ``value``: all supported
    databases return a scalar's text exactly as written, and JSON text tells 1, 1.0, True and
    "1" apart just as digests do.
    """
    if type(entry) is not str or type(value) not in (str, int, float, bool, type(None)):
        return None
    if (type(value) is float and not math.isfinite(value)) or not storable(entry):
        return sa.false()  # never stored
    if type(value) is str and not storable(value):
        return sa.false()
    fragment = dialect.json_text(metadata_sections.c.data, entry)
    if fragment is None:
        return None
    return fragment == json.dumps(value, ensure_ascii=False)
