"""Connecting ``Sql`` to its database: engines per dialect, SQLite pragmas, error texts.

One engine per process: ``Sql`` creates it on first use and again after ``fork``.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import warnings
from pathlib import Path
from typing import Any

import platformdirs
import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import URL, make_url

from ..errors import DatabaseError, NetworkFilesystemWarning

__all__ = ["BUSY_TIMEOUT_S", "create_engine", "setup_lock"]

BUSY_TIMEOUT_S = 30.0
"""How long a SQLite connection waits for another process's write lock before failing."""

_NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "davfs", "fuse.davfs2", "orangefs", "pvfs2",
}

# Guards the lazy creation of engines. Replaced in a forked child, where it may have been copied
# while another thread of the parent held it.
setup_lock = threading.Lock()


def _fresh_setup_lock() -> None:
    global setup_lock
    setup_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_setup_lock)


def _safe_url(url: str | None) -> str:
    """``url`` with its password replaced by ``***``."""
    if url is None:
        return str(Path(platformdirs.user_cache_dir("fleche")) / "calls.sqlite")
    if "://" not in url:
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - unparsable: mask anything between "user:" and "@"
        return re.sub(r"(://[^/@:]*:)[^@]*@", r"\1***@", url)


def _reason(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    return str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__


def _is_transient(e: exc.DBAPIError) -> bool:
    """Whether retrying the transaction may succeed: deadlock, serialization failure, lock
    timeout, a busy SQLite file, a lost connection or a racing insert."""
    if e.connection_invalidated or isinstance(e, exc.IntegrityError):
        return True
    orig = e.orig
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate in ("40001", "40P01", "55P03"):
        return True
    code = orig.args[0] if getattr(orig, "args", None) else None
    if isinstance(orig, sqlite3.Error):
        return (getattr(orig, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return code in (1205, 1213)  # MySQL lock wait timeout, deadlock


def _filesystem_type(path: Path, mounts: str | None = None) -> str | None:
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


def _is_network_filesystem(fstype: str | None) -> bool:
    return fstype is not None and (fstype in _NETWORK_FILESYSTEMS or fstype.startswith("nfs"))


def create_engine(url: URL, echo: bool) -> sa.Engine:
    safe = url.render_as_string(hide_password=True)
    try:
        if url.get_backend_name() == "sqlite":
            return _create_sqlite_engine(url, echo)
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True}
        # Writes run in READ COMMITTED: each statement of a replacing save sees the rows the
        # previous writer committed. Reads switch to REPEATABLE READ for one snapshot.
        kwargs["isolation_level"] = "READ COMMITTED"
        if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
            kwargs["connect_args"] = {"connect_timeout": 15}
        return sa.create_engine(url, **kwargs)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
        raise DatabaseError(safe, f"not a usable database URL ({e})") from None


def _create_sqlite_engine(url: URL, echo: bool) -> sa.Engine:
    database = url.database
    on_disk = bool(database) and database != ":memory:" and not database.startswith("file:")
    journal = "WAL"
    if on_disk:
        fstype = _filesystem_type(Path(database).parent)
        if _is_network_filesystem(fstype):
            journal = "DELETE"
            warnings.warn(
                f"the SQLite database {database} is on a network filesystem ({fstype}): WAL mode "
                "does not work there, so fleche uses a rollback journal, and whether several "
                "hosts can share the file safely depends on that filesystem's locking. To share "
                "calls across hosts, use a PostgreSQL or MariaDB URL instead.",
                NetworkFilesystemWarning,
                stacklevel=4,
            )
    engine = sa.create_engine(url, echo=echo, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, record: Any) -> None:
        # Let us issue BEGIN ourselves (below) instead of the driver's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if on_disk:
            cursor.execute(f"PRAGMA journal_mode={journal}")
            if journal == "WAL":
                # WAL's recommended setting: commits survive a crash of any process and the file
                # is never corrupted; only a power cut may lose the last commits. This matches
                # the file storages' default (durable=False) and saves an fsync per save.
                cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        # A write takes the write lock at BEGIN, waiting up to the busy timeout; a deferred
        # BEGIN that upgrades later could fail at once with SQLITE_BUSY instead.
        immediate = conn.get_execution_options().get("fleche_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine
