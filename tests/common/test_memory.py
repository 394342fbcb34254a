"""The malloc arena cap predict.py sets before its engine starts threads."""

import os
import subprocess
import sys
import textwrap

import pytest

# A child process: cap arenas (or not), let 6 threads allocate at once, count glibc's heaps.
CHILD = textwrap.dedent("""
    import ctypes, sys, tempfile, threading
    from abstract_tagger.common.memory import limit_arenas
    print(limit_arenas(1) if sys.argv[1] == "cap" else None)
    barrier, held = threading.Barrier(6), []
    def work():
        barrier.wait()
        held.append([bytearray(4096) for _ in range(2000)])
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(6)]
    [t.start() for t in threads]; [t.join() for t in threads]
    libc = ctypes.CDLL("libc.so.6")
    libc.fopen.restype = ctypes.c_void_p
    with tempfile.NamedTemporaryFile(suffix=".xml") as f:
        stream = ctypes.c_void_p(libc.fopen(f.name.encode(), b"w"))
        libc.malloc_info(0, stream)
        libc.fclose(stream)
        print(open(f.name).read().count("<heap nr="))
""")


def heaps(mode, **env):
    run = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", "GLIBC_TUNABLES")} | env)
    answer, count = run.stdout.split()
    return answer, int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_threads_share_the_capped_arenas_and_the_users_setting_wins():
    assert heaps("free")[1] > 1  # glibc's default: threads allocating at once get arenas of their own
    assert heaps("cap") == ("True", 1)
    answer, count = heaps("cap", MALLOC_ARENA_MAX="3")
    assert answer == "False" and count > 1
    assert heaps("cap", GLIBC_TUNABLES="glibc.malloc.arena_max=4")[0] == "False"
