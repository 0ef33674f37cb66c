# A plugin whose connections see each other's writes only once flushed (no
# multi-conn; argv[1] is tests/fault/incoherent.cpp).  The filter writes
# back through any connection's context and reads through the reader's own,
# so data may leave the overlay only once a flush has published it, and a
# flush must reach every context that carried writes.  Each connection must
# read what any of them wrote, at every moment.
import os
import random
import sys
import threading

import faultlib
import sdctest
from sdctest import Server, check
from faultlib import counter

BLOCK = 4096


def writes_seen_by_every_connection(plugin):
    """Written back (threshold=1), a write is read back alike by the
    connection that wrote it and by another."""
    tmp = faultlib.tmpdir()
    ctl = os.path.join(tmp, "ctl.sock")
    with Server([plugin], ["threshold=1", "max-age=0", "bypass-min=0", "control=" + ctl],
                tmpdir=tmp) as srv:
        a, b = srv.connect(), srv.connect()
        check(not a.can_multi_conn(), "multi-conn advertised over a plugin without it")
        stale = []
        for i in range(50):
            data = bytes([i + 1]) * BLOCK
            (a, b)[i % 2].pwrite(data, i * BLOCK)
            sdctest.wait_until(lambda: counter(ctl, "queued_requests") == 0, 20,
                               "write %d written back" % i)
            for name, h in (("A", a), ("B", b)):
                if h.pread(BLOCK, i * BLOCK) != data:
                    stale.append((i, name))
        check(not stale, "stale reads after write-back (block, reader): %r" % stale)
        a.shutdown()
        b.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
    print("50 writes, written back: read alike through both connections")


def write_throughs_beside_buffered_writes(plugin):
    """Write-throughs (larger than the queue) on one connection while
    another's small writes are written back: each write-through is read
    back at once through a third connection."""
    tmp = faultlib.tmpdir()
    with Server([plugin], ["threshold=1", "max-age=0", "bypass-min=0", "queue-max-size=8K"],
                tmpdir=tmp) as srv:
        a, b, reader = srv.connect(), srv.connect(), srv.connect()
        done = threading.Event()
        errors = []

        def small_writes():
            try:
                rng = random.Random(1)
                while not done.is_set():
                    a.pwrite(rng.randbytes(512), rng.randrange(0, 1 << 20, 512))
            except Exception as e:  # reported below
                errors.append(repr(e))

        t = threading.Thread(target=small_writes)
        t.start()
        stale = []
        try:
            for i in range(100):
                data = bytes([i % 250 + 1]) * 65536
                off = (2 << 20) + (i % 16) * 65536
                b.pwrite(data, off)
                if reader.pread(65536, off) != data:
                    stale.append(i)
        finally:
            done.set()
            t.join(30)
        check(not t.is_alive(), "the small writer did not stop")
        check(not errors, "small writes failed: %r" % errors)
        check(not stale, "write-throughs read back stale (%d of 100): %r" % (len(stale), stale))
        for h in (a, b, reader):
            h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
    print("100 write-throughs beside buffered writes: read back through a third connection")


def main(plugin):
    writes_seen_by_every_connection(plugin)
    write_throughs_beside_buffered_writes(plugin)


if __name__ == "__main__":
    main(sys.argv[1])
