"""Atomic file writes: a reader (or an interrupted campaign) never sees a partial file.

Files are created with the mode a plain ``open(path, "w")`` would give them (``0666``
minus the process umask, so ``0644`` by default), not the ``0600`` of ``mkstemp``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """Return the process umask without changing it (``/proc/self/status`` on Linux).

    Falls back to setting and restoring it (``os.umask``) where ``/proc`` has no
    ``Umask:`` line.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def check_output_path(path: str | Path) -> str | None:
    """Say why ``path`` cannot be written as an output file, before any work is done.

    Args:
        path: The file a command is asked to write (its folder must exist: no folders
            are created for an output file).

    Returns:
        None if it looks writable, else a short reason such as ``"no such folder
        /x/y"`` (the caller prefixes the flag and path).
    """
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        return "is a folder (expected a file name)"
    if not parent.exists():
        return f"no such folder {parent} (folders are not created for an output file)"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"folder {parent} is not writable"
    return None


def atomic_write_text(path: str | Path, text: str, *, mkdir: bool = True) -> None:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    The file gets mode ``0666 & ~umask`` (``0644`` by default).

    Args:
        path: Destination.
        text: The whole new content.
        mkdir: Create the destination's folder if missing (False: a missing folder is an
            ``OSError``, as for ``open``).
    """
    p = Path(path)
    if mkdir:
        p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
