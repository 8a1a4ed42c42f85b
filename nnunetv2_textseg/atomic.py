"""The one atomic file write of nnunetv2_textseg: every output (report tables, embedding caches, split files,
converted checkpoints, degradation records) is written through :func:`atomic_write`.

The content goes to a temp file in the target's folder (same file system, so ``os.replace`` is one rename), is
flushed to disk and then renamed over the target: a reader sees the old file or the whole new one, never half.
The temp file is named ``.<target name>.textseg-<pid>-<host>-<random>.tmp``: hidden, recognisably ours, and
naming the process that writes it. A process killed mid-write leaves it behind; the next write of the same target
removes such leftovers of processes that no longer run on this host, and nothing else.
"""
from __future__ import annotations

import hashlib
import os
import re
import secrets
import socket
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "temp_name", "stale_temp_files"]

TEMP_TAG = ".textseg-"
# Several hosts may write into one shared (network) folder; a pid only says something about our own host.
_HOST = hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def temp_name(target: str | os.PathLike, pid: int | None = None, host: str | None = None) -> str:
    """File name of a temp file for ``target`` written by process ``pid`` (default: this one)."""
    return (f".{Path(target).name}{TEMP_TAG}{os.getpid() if pid is None else pid}-{host or _HOST}-"
            f"{secrets.token_hex(3)}.tmp")


def _temp_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}{re.escape(TEMP_TAG)}(\d+)-([0-9a-f]{{6}})-[0-9a-f]{{6}}\.tmp")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True  # possibly another thread of ours, writing right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OSError, OverflowError):  # unknowable: keep the file
        return True
    return True


def stale_temp_files(target: str | os.PathLike) -> list[Path]:
    """Temp files of ``target`` left by our own writes in processes that are gone (killed mid-write)."""
    target = Path(target)
    pattern = _temp_pattern(target)
    try:
        names = os.listdir(target.parent)
    except OSError:
        return []
    stale = []
    for name in names:
        m = pattern.fullmatch(name)
        if m and m.group(2) == _HOST and not _alive(int(m.group(1))):
            stale.append(target.parent / name)
    return sorted(stale)


def _remove_stale(target: Path) -> None:
    for path in stale_temp_files(target):
        try:
            if path.is_file() and not path.is_symlink():
                path.unlink()
        except OSError:  # another process got there first, or no permission: not ours to insist on
            pass


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a binary file object, which then replaces ``path``.

    The new file gets the mode ``open()`` would give it (``0o666 & ~umask``). If anything fails, the temp file is
    removed and ``path`` keeps its old content."""
    path = Path(path)
    _remove_stale(path)
    tmp = path.with_name(temp_name(path))
    # O_EXCL: never write through a file or link that is already there; 0o666 lets the umask decide the mode.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))
