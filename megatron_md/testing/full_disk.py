"""A real full filesystem for tests, without root: a small tmpfs mounted in a private mount namespace
(``unshare -rm``, user namespaces), which the test then fills up.

    if private_tmpfs_works():
        subprocess.run(in_private_tmpfs(mnt, [sys.executable, "script.py", mnt]))
    # inside script.py, after a first save:
    fill(os.path.join(mnt, "filler"))       # every free block taken, then 4 KiB given back
"""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

__all__ = ["private_tmpfs_works", "in_private_tmpfs", "fill"]


def private_tmpfs_works() -> bool:
    """Whether ``unshare -rm`` can mount a tmpfs here (user namespaces allowed)."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                          capture_output=True).returncode == 0


def in_private_tmpfs(mnt, argv: Sequence[str], size_mb: int = 24) -> list[str]:
    """The command that runs ``argv`` in a private mount namespace where ``mnt`` (an existing
    directory) is a fresh ``size_mb`` MiB tmpfs."""
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o size={size_mb}m tmpfs "{mnt}" && exec "$@"', "sh",
            *map(str, argv)]


def fill(path) -> None:
    """Fill the filesystem of ``path`` with one file there: every free block taken, then 4 KiB given
    back (room for small writes, none for a checkpoint)."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        except OSError:
            pass
        fh.truncate(max(0, fh.tell() - 4096))
