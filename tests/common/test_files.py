"""Atomic writes: a reader sees the old whole file or the new one, whoever else writes it."""

import os
import stat

import pytest

from abstract_tagger.common.files import write_atomic


def test_two_writers_of_one_file_never_mix(tmp_path):
    """A second writer of the same path (another process filling the same cache entry) runs while the
    first is half way: each renames its own whole file, and no temporary file is left."""
    path = tmp_path / "entry.json"

    def first(f):
        f.write(b"A" * 10)
        write_atomic(path, lambda g: g.write(b"B" * 4))
        f.write(b"A" * 10)

    write_atomic(path, first)
    assert path.read_bytes() == b"A" * 20
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "entry.json"
    path.write_bytes(b"old")

    def fails(f):
        f.write(b"new, half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(path, fails)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_the_file_gets_the_mode_a_plain_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "x", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x").stat().st_mode) == 0o644


def test_a_killed_writers_temporary_goes_with_the_next_write(tmp_path):
    """A kill leaves the writer's temporary behind; the next successful write of that path removes the
    ones whose process is gone, and never a live writer's."""
    import socket
    import subprocess
    import sys

    path = tmp_path / "entry.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stem = f".{path.name}.{socket.gethostname()}."
    dead, live = tmp_path / f"{stem}{gone.stdout.strip()}.00000000.partial", tmp_path / f"{stem}{os.getpid()}.1.partial"
    other = tmp_path / f".{path.name}.another-host.{gone.stdout.strip()}.2.partial"
    for left in (dead, live, other):
        left.write_bytes(b"half")
    write_atomic(path, lambda f: f.write(b"whole"))
    assert path.read_bytes() == b"whole" and not dead.exists() and live.exists() and other.exists()
