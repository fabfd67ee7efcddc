"""When each call of an ``Sql`` store was last used, and how many bytes its records take.

``fleche_usage`` (``key``, ``used``) holds the uses :meth:`Sql.touch` records (what a
:class:`~fleche.limits.SizeLimitedCache` writes, in batches). It is made by the first touch and
is not part of the versioned schema: older fleche versions ignore it, and losing it loses no
entry, only the order in which calls would be evicted. Rows of evicted calls are dropped by the
next touch. A call counts as used when it was last touched or when it started (its ``runtime``
metadata, as the decorator records it), whichever is later, else at 0.0.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc

from ...digest import Digest, _mk
from ..base import EntryUsage
from .records import load_record
from .schema import calls

__all__ = ["create_usage_table", "record_uses", "uses", "usage_table"]

usage_table = sa.Table(
    "fleche_usage",
    sa.MetaData(),
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("used", sa.Double, nullable=False),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
    mysql_collate="utf8mb4_bin",
)
"""When each call was last used, in seconds since the epoch."""

_CHUNK = 500
"""Keys per ``IN (...)``."""


def has_usage_table(conn: sa.Connection) -> bool:
    return sa.inspect(conn).has_table(usage_table.name)


def create_usage_table(writer: Any, transient: Callable[[exc.DBAPIError], bool]) -> None:
    """Make ``fleche_usage`` unless it is there, in a write transaction of ``writer`` (an
    engine, or one with the dialect's options for writes); another process making it at once
    is fine, and so is a busy database (``transient`` errors are retried)."""
    from .connections import retrying

    def attempt() -> None:
        with writer.begin() as conn:
            if not has_usage_table(conn):
                usage_table.create(conn, checkfirst=True)

    def lost_race(e: exc.DBAPIError) -> bool:
        if transient(e):
            return True
        with writer.connect() as conn:
            return has_usage_table(conn)  # made meanwhile: the next attempt finds it

    with writer.connect() as conn:
        if has_usage_table(conn):
            return
    retrying(attempt, lost_race)


def record_uses(conn: sa.Connection, keys: Sequence[str], when: float) -> None:
    """Record in ``conn``'s transaction that the stored calls among ``keys`` were used at
    ``when`` (later uses recorded before are kept), and drop the rows of evicted calls."""
    table = usage_table
    for start in range(0, len(keys), _CHUNK):
        batch = list(keys[start : start + _CHUNK])
        conn.execute(
            sa.update(table).where(table.c.key.in_(batch), table.c.used < when).values(used=when)
        )
        known = sa.select(table.c.key).where(table.c.key.in_(batch))
        new = sa.select(calls.c.key, sa.literal(when, sa.Double)).where(
            calls.c.key.in_(batch), calls.c.key.not_in(known)
        )
        conn.execute(sa.insert(table).from_select(["key", "used"], new))
    gone = ~sa.exists(sa.select(calls.c.key).where(calls.c.key == table.c.key))
    conn.execute(sa.delete(table).where(gone))


def uses(conn: sa.Connection, where: str) -> dict[Digest, EntryUsage]:
    """Every stored call with the bytes of its record and inline values and its last use, read
    in ``conn``'s transaction (one snapshot)."""
    size = sa.func.length(calls.c.record) + sa.func.coalesce(sa.func.length(calls.c.inline), 0)
    if has_usage_table(conn):
        used: Any = usage_table.c.used
        source: Any = calls.outerjoin(usage_table, usage_table.c.key == calls.c.key)
    else:
        used, source = sa.null(), calls
    # A call's start counts as a use too: a row left from before the call was evicted and
    # saved again (rows of evicted calls go at the next touch) must not make it look old.
    rows = conn.execute(sa.select(calls.c.key, size, used, calls.c.record).select_from(source))
    found: dict[Digest, EntryUsage] = {}
    for key, nbytes, when, record in rows:
        when = max(when or 0.0, _started(record, key, where))
        found[_mk(key)] = EntryUsage(int(nbytes or 0), float(when))
    return found


def _started(record: str | None, key: str, where: str) -> float:
    """When the call in ``record`` started, from its runtime metadata; 0.0 if unknown."""
    if record is None:
        return 0.0
    try:
        _, metadata = load_record(record, key, where)
        start = metadata["runtime"]["start"]
        moment = datetime.datetime.fromisoformat(start)
    except Exception:  # noqa: BLE001 - no start recorded, or not one we can read
        return 0.0
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment.timestamp()
