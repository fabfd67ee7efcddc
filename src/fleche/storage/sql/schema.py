"""The tables of ``Sql`` and their creation: calls, arguments, metadata, schema version."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import mysql, postgresql

from ...digest import DIGEST_LENGTH
from ...errors import DatabaseError, SchemaVersionError

if TYPE_CHECKING:
    from .dialects import Dialect

__all__ = [
    "SCHEMA_VERSION",
    "arguments",
    "calls",
    "ensure_schema",
    "metadata_sections",
    "schema",
    "value_chunks",
    "values",
    "versions",
]

SCHEMA_VERSION = 4
"""Version of the table layout below. A database of version 2 or 3 is migrated in place on
opening (see :data:`MIGRATIONS`); one of any other version is refused.

2: ``fleche_calls`` holds each whole record (``record``, ``inline``), so a load reads one row.
3: ``fleche_calls.version_type`` says which type a call's ``version`` has (NULL: a ``str``;
``"int"``: an ``int``, written in decimal in ``version``).
4: ``fleche_values`` and ``fleche_value_chunks`` hold values (``SqlValues``), so a database URL
alone is a complete store; ``fleche_calls.started`` (indexed) holds each call's recorded start, so
``Sql.newest`` is one ``ORDER BY ... LIMIT``.
"""

STARTED_LENGTH = 255
"""Characters of a recorded start the ``started`` column keeps (ISO 8601 text needs 32)."""

_LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
# ISO 8601 text sorts by time only in a binary collation (PostgreSQL's "C"; the MySQL tables'
# utf8mb4_bin; SQLite's default).
_STARTED = sa.String(STARTED_LENGTH).with_variant(
    postgresql.VARCHAR(STARTED_LENGTH, collation="C"), "postgresql"
)
_LONG_BLOB = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
# MySQL/MariaDB compare text case-insensitively by default; a binary collation keeps equality
# exact (query results are still re-checked in Python, so this is about index selectivity).
_TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

schema = sa.MetaData()
"""The fleche tables (all named ``fleche_*``)."""

versions = sa.Table(
    "fleche_schema",
    schema,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
    **_TABLE_ARGS,
)

calls = sa.Table(
    "fleche_calls",
    schema,
    sa.Column("key", sa.String(DIGEST_LENGTH), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("module", sa.Text),
    sa.Column("version", sa.Text),
    sa.Column("version_type", sa.String(8)),  # NULL: str (or no version); "int": int
    sa.Column("code_digest", sa.Text),
    sa.Column("result", sa.String(DIGEST_LENGTH)),
    # The whole record, written with the rows below in one transaction: a load reads this row
    # only. ``record`` is JSON {"a": {argument name: digest}, "m": metadata or null}; ``inline``
    # the pickled small values (see fleche.storage.sql.records.dump_inline), or NULL.
    sa.Column("record", _LONG_TEXT, nullable=False),
    sa.Column("inline", _LONG_BLOB),
    # ``metadata["runtime"]["start"]`` (its first STARTED_LENGTH characters), NULL without one.
    sa.Column("started", _STARTED),
    sa.Index("ix_fleche_calls_name", "name", mysql_length=255),
    sa.Index("ix_fleche_calls_result", "result"),
    sa.Index("ix_fleche_calls_started", "started"),
    **_TABLE_ARGS,
)

def _part_of_a_call() -> tuple[sa.Column, sa.Column]:
    """The primary key of a table of a call's parts: the call's key (its rows go with the call)
    and the part's position."""
    return (
        sa.Column(
            "call_key",
            sa.String(DIGEST_LENGTH),
            sa.ForeignKey("fleche_calls.key", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("position", sa.Integer, primary_key=True, autoincrement=False),
    )


arguments = sa.Table(
    "fleche_arguments",
    schema,
    *_part_of_a_call(),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("value", sa.String(DIGEST_LENGTH), nullable=False),
    sa.Index("ix_fleche_arguments_value", "value", "name", mysql_length={"name": 255}),
    **_TABLE_ARGS,
)

metadata_sections = sa.Table(
    "fleche_metadata",
    schema,
    *_part_of_a_call(),
    sa.Column("section", sa.Text, nullable=False),
    sa.Column("data", _LONG_TEXT, nullable=False),
    sa.Index("ix_fleche_metadata_section", "section", mysql_length=255),
    **_TABLE_ARGS,
)

values = sa.Table(
    "fleche_values",
    schema,
    sa.Column("key", sa.String(DIGEST_LENGTH), primary_key=True),
    # The envelope's header (and HMAC), then the payload: its length, in how many chunks it is
    # stored, and the first chunk (the only one of most values); chunk n >= 1 is in
    # fleche_value_chunks. Written in one transaction with the chunks.
    sa.Column("header", sa.LargeBinary, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("chunks", sa.Integer, nullable=False),
    sa.Column("data", _LONG_BLOB, nullable=False),
    sa.Column("used", sa.Double, nullable=False),  # saved or touched, seconds since the epoch
    **_TABLE_ARGS,
)

value_chunks = sa.Table(
    "fleche_value_chunks",
    schema,
    sa.Column(
        "key",
        sa.String(DIGEST_LENGTH),
        sa.ForeignKey("fleche_values.key", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("n", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("data", _LONG_BLOB, nullable=False),
    **_TABLE_ARGS,
)


def _add_version_type(conn: sa.Connection) -> None:
    """Migrate schema 2 to 3: add ``fleche_calls.version_type``. Every existing row keeps its
    meaning (NULL: a ``str`` version), so no row is rewritten."""
    present = {c["name"] for c in sa.inspect(conn).get_columns(calls.name)}
    if "version_type" not in present:  # MySQL commits DDL at once: a rerun may find it there
        column = calls.c.version_type.type.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {calls.name} ADD COLUMN version_type {column}"))


_FILL_BATCH = 1000
"""Rows the migration to schema 4 reads and updates at a time."""


def _add_value_tables(conn: sa.Connection) -> None:
    """Migrate schema 3 to 4: add the value tables, and ``fleche_calls.started`` with its index,
    filled from the stored records in batches of :data:`_FILL_BATCH` rows; nothing else changes
    (stores whose values live in a directory or an object store keep working)."""
    from .records import recorded_start

    for table in (values, value_chunks):  # MySQL commits DDL at once: a rerun may find them
        table.create(conn, checkfirst=True)
    inspector = sa.inspect(conn)
    if "started" not in {c["name"] for c in inspector.get_columns(calls.name)}:
        column = calls.c.started.type.compile(dialect=conn.dialect)
        conn.execute(sa.text(f"ALTER TABLE {calls.name} ADD COLUMN started {column}"))
    index = next(i for i in calls.indexes if i.name == "ix_fleche_calls_started")
    if index.name not in {i["name"] for i in inspector.get_indexes(calls.name)}:
        index.create(conn)
    batch = (
        sa.select(calls.c.key, calls.c.record)
        .where(calls.c.key > sa.bindparam("after"))
        .order_by(calls.c.key)
        .limit(_FILL_BATCH)
    )
    fill = sa.update(calls).where(calls.c.key == sa.bindparam("k")).values(started=sa.bindparam("s"))
    after = ""
    while rows := conn.execute(batch, {"after": after}).all():
        after = rows[-1][0]
        starts = [{"k": key, "s": recorded_start(_metadata_of(text))} for key, text in rows]
        if found := [s for s in starts if s["s"] is not None]:
            conn.execute(fill, found)


def _metadata_of(record: str) -> Any:
    """The metadata in a ``record`` column's JSON; ``None`` where it cannot be read (such a
    record raises its error when loaded, not while migrating)."""
    try:
        return json.loads(record)["m"]
    except (ValueError, TypeError, KeyError):
        return None


MIGRATIONS = {2: _add_version_type, 3: _add_value_tables}
"""For each older schema version, the step that brings it to the next version."""


def _found_version(conn: sa.Connection) -> int | None:
    """The schema version of the fleche tables ``conn`` sees; ``None`` if there are none."""
    if not sa.inspect(conn).has_table(versions.name):
        return None
    return conn.execute(sa.select(versions.c.value).where(versions.c.name == "version")).scalar()


def ensure_schema(engine: sa.Engine, dialect: Dialect) -> None:
    """Check the schema version, creating the tables if there are none and migrating an older
    version in place; safe against racing processes (the loser of a creation race retries and
    finds the tables; migrations run under the dialect's schema lock, one process at a time).

    Only reads when the tables are there in this version, so a database this process cannot
    write opens for reading; a write transaction is taken only to create or migrate.
    """
    from .connections import is_transient, reason, retrying

    def attempt() -> None:
        with dialect.snapshot(engine).connect() as conn, conn.begin():
            found = _found_version(conn)
        if found == SCHEMA_VERSION:
            return
        if found is not None and found not in MIGRATIONS:
            raise SchemaVersionError(dialect.safe_url, found, SCHEMA_VERSION)
        dialect.check_writable(
            "create the fleche tables in it" if found is None
            else f"migrate its fleche tables from schema version {found} to {SCHEMA_VERSION}"
        )
        with dialect.writer(engine).begin() as conn, dialect.schema_lock(conn):
            found = _found_version(conn)
            if found is None:
                schema.create_all(conn)
                conn.execute(sa.insert(versions).values(name="version", value=SCHEMA_VERSION))
                return
            while found in MIGRATIONS:
                MIGRATIONS[found](conn)
                found += 1
                conn.execute(
                    sa.update(versions).where(versions.c.name == "version").values(value=found)
                )
            if found != SCHEMA_VERSION:
                raise SchemaVersionError(dialect.safe_url, found, SCHEMA_VERSION)

    def creation_race(e: exc.DBAPIError) -> bool:
        """Whether ``e`` comes from another process creating the same tables at the same time."""
        if is_transient(dialect, e):
            return True
        text = str(e.orig).lower()
        return any(w in text for w in ("already exists", "duplicate", "concurrent ddl", "timed out"))

    try:
        retrying(attempt, creation_race, attempts=20, max_pause=1.0)
    except exc.DBAPIError as e:
        raise DatabaseError(dialect.safe_url, reason(e)) from None
