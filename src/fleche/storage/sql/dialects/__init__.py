"""The databases ``Sql`` supports, one :class:`~.base.Dialect` subclass each.

A new database is one module with a ``Dialect`` subclass, added to :data:`DIALECTS`.
"""

from __future__ import annotations

from sqlalchemy.engine import URL

from ....errors import DatabaseError
from .base import Dialect
from .mysql import MysqlDialect
from .postgresql import PostgresqlDialect
from .sqlite import SqliteDialect

__all__ = ["DIALECTS", "Dialect", "dialect_for"]

DIALECTS: tuple[type[Dialect], ...] = (SqliteDialect, PostgresqlDialect, MysqlDialect)
"""Every supported database."""


def dialect_for(url: URL) -> Dialect:
    """The dialect serving ``url``; :class:`~fleche.errors.DatabaseError` for another database."""
    name = url.get_backend_name()
    for cls in DIALECTS:
        if name in cls.names:
            return cls(url)
    supported = ", ".join(n for cls in DIALECTS for n in cls.names)
    raise DatabaseError(
        url.render_as_string(hide_password=True),
        f"not a usable database URL (fleche supports {supported}, not {name})",
    )
