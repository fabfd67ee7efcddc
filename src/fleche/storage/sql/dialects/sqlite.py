"""SQLite: a file on a local disk, in WAL mode, for the processes of one host."""

from __future__ import annotations

import contextlib
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import sqlite

from ....errors import NetworkFilesystemWarning
from ..schema import calls
from .base import SIMPLE_KEY, UPDATED_COLUMNS, Dialect

__all__ = ["BUSY_TIMEOUT_S", "SqliteDialect", "filesystem_type", "is_network_filesystem"]

BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another process's write lock before failing."""

_NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "davfs", "fuse.davfs2", "orangefs", "pvfs2",
}


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path``, from ``/proc/self/mounts`` (Linux only)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, parts[2]
    return best_type


def is_network_filesystem(fstype: str | None) -> bool:
    return fstype is not None and (fstype in _NETWORK_FILESYSTEMS or fstype.startswith("nfs"))


class SqliteDialect(Dialect):
    """SQLite through the standard library's ``sqlite3``.

    Writes run in ``BEGIN IMMEDIATE`` transactions, which take the database's write lock at once
    (waiting up to :data:`BUSY_TIMEOUT_S`); reads in deferred ones, each one WAL snapshot.
    """

    names = ("sqlite",)

    def create_engine(self, echo: bool) -> sa.Engine:
        database = self.url.database
        on_disk = bool(database) and database != ":memory:" and not database.startswith("file:")
        journal = "WAL"
        if on_disk:
            fstype = filesystem_type(Path(database).parent)
            if is_network_filesystem(fstype):
                journal = "DELETE"
                warnings.warn(
                    f"the SQLite database {database} is on a network filesystem ({fstype}): WAL "
                    "mode does not work there, so fleche uses a rollback journal, and whether "
                    "several hosts can share the file safely depends on that filesystem's "
                    "locking. To share calls across hosts, use a PostgreSQL or MariaDB URL "
                    "instead.",
                    NetworkFilesystemWarning,
                    stacklevel=6,
                )
        engine = sa.create_engine(self.url, echo=echo, connect_args={"timeout": BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, record: Any) -> None:
            # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            if on_disk:
                cursor.execute(f"PRAGMA journal_mode={journal}")
                if journal == "WAL":
                    # WAL's recommended setting: commits survive a crash of any process and the
                    # file is never corrupted; only a power cut may lose the last commits. This
                    # matches the file storages' default (durable=False) and saves an fsync.
                    cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: sa.Connection) -> None:
            # A write takes the write lock at BEGIN, waiting up to the busy timeout; a deferred
            # BEGIN that upgrades later could fail at once with SQLITE_BUSY instead.
            immediate = conn.get_execution_options().get("fleche_immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    def snapshot(self, engine: sa.Engine) -> Any:
        return engine  # a deferred BEGIN: one WAL read snapshot

    def writer(self, engine: sa.Engine) -> Any:
        return engine.execution_options(fleche_immediate=True)

    def upsert(self) -> Any:
        stmt = sqlite.insert(calls)
        return stmt.on_conflict_do_update(
            index_elements=[calls.c.key],
            set_={name: stmt.excluded[name] for name in UPDATED_COLUMNS},
        )

    def json_text(self, data: Any, entry: str) -> Any | None:
        if SIMPLE_KEY.fullmatch(entry) is None or sqlite3.sqlite_version_info < (3, 38):
            return None
        return data.op("->", return_type=sa.Text)(sa.literal(f'$."{entry}"'))

    def schema_lock(self, conn: sa.Connection) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the BEGIN IMMEDIATE of the transaction excludes others

    def is_transient(self, error: exc.DBAPIError) -> bool:
        orig = error.orig
        if not isinstance(orig, sqlite3.Error):
            return False
        code = getattr(orig, "sqlite_errorcode", 0) & 0xFF
        return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)

    def hold_key(
        self, conn: sa.Connection | None, key: str, timeout: float | None
    ) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # the write transaction's BEGIN IMMEDIATE excludes others

    locks_with_connection = False
