"""The ``Sql`` call storage and the ``SqlValues`` value storage: call records and values in
SQLite, PostgreSQL or MariaDB/MySQL (``sql`` extra).

One module per concern:

- :mod:`.storage`: the call storage itself, :class:`Sql`;
- :mod:`.values`: values in the same database, :class:`SqlValues`;
- :mod:`.connections`: connections per process and the one retry loop;
- :mod:`.dialects`: one object per database (upsert, key lock, JSON paths, isolation, schema
  lock), so a new database is one module;
- :mod:`.schema`: the tables and their creation, version check and migration;
- :mod:`.records`: how a record is encoded in a row;
- :mod:`.statements` and :mod:`.queries`: the fixed statements of the hot paths, and the
  conditions a query template becomes.
"""

from ...extras import needs_extra

with needs_extra("sql", "fleche.storage.Sql"):
    from .schema import SCHEMA_VERSION
    from .storage import Sql
    from .values import CHUNK_BYTES, SqlValues

__all__ = ["CHUNK_BYTES", "SCHEMA_VERSION", "Sql", "SqlValues"]
