"""Writing files safely: whole or not at all (`write_atomic`), by one process at a time
(`exclusive`), and known by content (`file_digest`); the user's cache folder (`user_cache`). Imports
nothing of the package.

Files that a run must not share: one process writes an output at a time.

Two runs on one output (say `shard=0/2` and `shard=1/2` started with the same `output=`) would append
to the same partial file and journal and leave garbled, duplicated and missing rows. `exclusive`
takes an advisory lock (`flock`) on `<path>.lock` for the whole run; the kernel drops it when the
process dies, so a killed run never leaves a lock that blocks its resume.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class OutputBusy(ValueError):
    """Another live process is writing the same output."""


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextmanager
def exclusive(path: str | Path, setting: str = "output") -> Iterator[None]:
    """Hold the lock of `path` while the block runs, or raise OutputBusy at once naming the setting."""
    lock = lock_path(path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(f"{setting}={path}: another run is writing it (it holds {lock}); wait for it to "
                             "finish or choose another output") from None
        # The holder before us removes the lock file before unlocking it: a file we locked after its
        # removal is no longer the lock, so take the one now at that path.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(lock)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def write_atomic(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """`write(file)` under a temporary name, then renamed to `path`: a kill or a full disk never leaves
    half a file there, and a reader sees the previous whole file or the new one (caches that a killed
    run resumes from, results rewritten in a reused run directory). Each writer has its own temporary
    name (created exclusively, mode by umask as a plain open gives): two processes filling one user cache
    entry at once would otherwise write into the same file, and one rename would publish the mix. The
    temporaries of killed writers on this machine go once the next write of `path` succeeds."""
    stem = f".{path.name}.{socket.gethostname()}."
    tmp = path.with_name(f"{stem}{os.getpid()}.{secrets.token_hex(4)}.partial")
    try:
        with open(tmp, "xb") as f:
            write(f)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    for left in path.parent.glob(f"{glob.escape(stem)}*.partial"):
        pid = left.name[len(stem):].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            left.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_json(path: Path, data: Any, **dumps: Any) -> None:
    """`data` as one JSON document and a newline, through `write_atomic`; `dumps` go to `json.dumps`."""
    text = json.dumps(data, **dumps) + "\n"
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: the content a cache entry or a resumed run was made from."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def user_cache(*parts: str) -> Path | None:
    """The folder `parts` of the package's cache for this user, $XDG_CACHE_HOME (or ~/.cache)/abstract-tagger/
    <parts>, made if needed; None where it cannot be made or written (the caller then does without)."""
    path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "abstract-tagger", *parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return path if os.access(path, os.W_OK) else None
