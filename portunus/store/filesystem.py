"""The data dir's filesystem check: SQLite's locks and durability need a local disk (SPEC §4.2).

Read-only and side-effect free, so ``doctor`` runs the same check ``Store.open`` does.
"""

from __future__ import annotations

import os
import sys

from ..errors import PortunusError

ALLOW_ANY_FS_ENV = "PORTUNUS_ALLOW_ANY_FS"

# statfs(2) f_type magics (linux/magic.h) of filesystems SQLite's locking or durability can't trust
NFS_SUPER_MAGIC = 0x6969
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6
UNSUPPORTED_FILESYSTEMS = {NFS_SUPER_MAGIC: "nfs", TMPFS_MAGIC: "tmpfs", RAMFS_MAGIC: "ramfs"}


def unsupported_filesystem(magic: int | None) -> str | None:
    """The name of a refused filesystem for a statfs magic, else None."""
    if magic is None:
        return None
    return UNSUPPORTED_FILESYSTEMS.get(magic & 0xFFFFFFFF)


_libc = None


def filesystem_magic(path: str) -> int | None:
    """statfs(2) f_type of the filesystem holding ``path``; None where libc statfs is not Linux's."""
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # here, not at import: the store module is on every server command's path
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        _libc.statfs.restype = ctypes.c_int
    buf = ctypes.create_string_buffer(512)  # struct statfs is 120 bytes on 64-bit Linux; room to spare
    if _libc.statfs(os.fsencode(path), buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    # f_type is the first member: a native long everywhere except s390x, where it is unsigned int
    ftype = ctypes.c_uint if os.uname().machine == "s390x" else ctypes.c_long  # = platform.machine()
    return ftype.from_buffer(buf).value & 0xFFFFFFFF


def nearest_existing(path: str) -> str:
    """``path`` or its nearest existing parent: whose filesystem a data dir not yet created lands on."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_filesystem(data_dir: str) -> None:
    """Refuse NFS, tmpfs and ramfs before creating anything (the nearest existing parent decides)."""
    if os.environ.get(ALLOW_ANY_FS_ENV) == "1":
        return
    probe = nearest_existing(data_dir)
    try:
        magic = filesystem_magic(probe)
    except OSError as e:
        raise PortunusError("io_error", f"cannot inspect the filesystem of data dir {data_dir}: {e.strerror}",
                            data_dir=data_dir) from e
    name = unsupported_filesystem(magic)
    if name is not None:
        raise PortunusError(
            "startup.unsupported_filesystem",
            f"data dir {data_dir} is on {name}; SQLite needs a local disk filesystem "
            f"({'its locks are unreliable there' if name == 'nfs' else 'its contents vanish on reboot'}) "
            f"— move --data-dir to a local writable filesystem",
            data_dir=data_dir, filesystem=name)
