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

from ...call import QueryCall
from ...digest import digest
from .dialects import Dialect
from .records import storable
from .schema import arguments, calls, metadata_sections

__all__ = ["call_conditions", "stored_form"]


def stored_form(value: Any) -> str:
    """The form in which an argument or result matching ``value`` is stored: its digest.

    The generic query compares ``digest(template_value) == digest(stored_value)``; stored values
    are digests and ``digest(Digest(x)) == x``, so this holds whether ``value`` is given as a
    value or as a :class:`~fleche.digest.Digest`.
    """
    return str(digest(value))


def call_conditions(template: QueryCall, dialect: Dialect) -> list[Any]:
    """SQL conditions over ``fleche_calls`` that every call matching ``template`` fulfils.

    Name, module, version, code digest, result, arguments, metadata sections and scalar
    metadata entries (str, int, float, bool, None) become conditions; anything else is left to
    :meth:`QueryCall.matches`.
    """
    conditions: list[Any] = []
    for attr in ("name", "module", "version", "code_digest"):
        want = getattr(template, attr)
        if want is None:
            continue
        if type(want) is not str:
            continue  # stored fields are str; leave odd templates to matches()
        conditions.append(calls.c[attr] == want if storable(want) else sa.false())
    if template.result is not None:
        result = stored_form(template.result)
        if result == digest(None):
            conditions.append(sa.or_(calls.c.result == result, calls.c.result.is_(None)))
        else:
            conditions.append(calls.c.result == result)
    for name, value in (template.arguments or {}).items():
        if type(name) is not str:
            continue
        if not storable(name):
            conditions.append(sa.false())
            continue
        conditions.append(
            sa.exists().where(
                arguments.c.call_key == calls.c.key,
                arguments.c.name == name,
                arguments.c.value == stored_form(value),
            )
        )
    for section, entries in (template.metadata or {}).items():
        if type(section) is not str:
            continue
        if not storable(section):
            conditions.append(sa.false())
            continue
        where = [metadata_sections.c.call_key == calls.c.key, metadata_sections.c.section == section]
        for entry, value in (entries or {}).items():
            condition = entry_condition(entry, value, dialect)
            if condition is not None:
                where.append(condition)
        conditions.append(sa.exists().where(*where))
    return conditions


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
