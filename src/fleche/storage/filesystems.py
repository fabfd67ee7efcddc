"""What kind of filesystem a path is on: network filesystems cannot host SQLite's WAL mode, and
their locking is only as good as their server's.

Pure standard library, so any storage may ask without importing a database driver.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["filesystem_type", "is_network_filesystem", "is_network_path"]

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


def is_network_path(path: str | Path) -> tuple[bool, str | None]:
    """Whether ``path`` (or the nearest of its parents that exists) is on a network filesystem,
    and that filesystem's type (``None`` where the system cannot say)."""
    there = Path(path)
    while not there.exists() and there != there.parent:
        there = there.parent
    fstype = filesystem_type(there)
    return is_network_filesystem(fstype), fstype
