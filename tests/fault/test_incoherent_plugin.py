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


def flushed_under_the_multi_conn_filter(plugin):
    """nbdkit's multi-conn filter (multi-conn-mode=emulate) advertises
    multi-conn over this plugin.  It takes a connection as clean once a
    flush ends, even if a write through it ended after the flush began,
    and its next flush then skips that connection.  The filter never sends
    a plugin flush beside a write (review: a write written back during the
    control socket's flush was never published, and the client's flush
    after it succeeded)."""
    tmp = faultlib.tmpdir()
    ctl, logfile = os.path.join(tmp, "ctl.sock"), os.path.join(tmp, "plugin.log")
    with Server([plugin, "flush-delay=1000", "multi-conn-mode=emulate", "logfile=" + logfile],
                ["threshold=1", "max-age=0", "bypass-min=0", "control=" + ctl],
                under=["multi-conn", "log"], tmpdir=tmp) as srv:
        a = srv.connect()
        check(a.can_multi_conn(), "the multi-conn filter did not advertise multi-conn")
        a.pwrite(b"\x51" * BLOCK, 0)
        sdctest.wait_until(lambda: counter(ctl, "queued_requests") == 0, 20,
                           "the first write to be written back")
        answer = []
        flusher = threading.Thread(
            target=lambda: answer.append(sdctest.control_command(ctl, "flush")[1]))
        flusher.start()
        try:
            sdctest.wait_until(lambda: any(kind == "Flush" for kind, _, _ in
                                           sdctest.log_filter_calls(logfile)), 20,
                               "the control socket's plugin flush to begin")
            a.pwrite(b"\x52" * BLOCK, 1 << 20)  # written back at once (threshold=1)
            sdctest.wait_until(lambda: counter(ctl, "queued_requests") == 0, 20,
                               "the second write to be written back")
        finally:
            flusher.join(30)
        check(answer == ["ok"], "the control flush answered %r" % answer)
        a.flush()
        b = srv.connect()
        check(b.pread(BLOCK, 1 << 20) == b"\x52" * BLOCK,
              "a write acknowledged, written back and flushed is not in the plugin")
        for h in (a, b):
            h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
    print("multi-conn filter (emulate): a write written back during a flush is flushed by the next")


def main(plugin):
    writes_seen_by_every_connection(plugin)
    write_throughs_beside_buffered_writes(plugin)
    flushed_under_the_multi_conn_filter(plugin)


if __name__ == "__main__":
    main(sys.argv[1])
