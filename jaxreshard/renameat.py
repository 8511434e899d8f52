"""`renameat2(2)` through ctypes: the two atomic renames the commit needs, which `os.rename` cannot do.

`RENAME_NOREPLACE` fails with EEXIST instead of replacing the target; `RENAME_EXCHANGE` swaps two paths in one
step. Both need Linux >= 3.15 and a file system that implements them (ext4, xfs, btrfs, tmpfs do; some network
file systems do not): where they are missing, `Unsupported` is raised and the caller falls back.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


class Unsupported(Exception):
    """renameat2 (or the flag) is not available here."""


def renameat2(src: Path, dst: Path, flags: int) -> None:
    """Rename `src` to `dst` with `flags`; errors as `os.rename` raises them, `Unsupported` where the C library,
    the kernel or the file system lacks the call or the flag (EINVAL, ENOSYS, EOPNOTSUPP)."""
    func = getattr(_libc(), "renameat2", None) if _libc() is not None else None
    if func is None:
        raise Unsupported
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise Unsupported
    raise OSError(err, os.strerror(err), str(dst))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]
