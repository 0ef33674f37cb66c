# 16 connections of random I/O for a bounded time, with flushes and
# reconnects: every read matches the model, and so does the disk at the end.
#
# Thread i owns a private region and every 16th 4 KiB stripe of a shared
# region, so stripes of different threads sit side by side in the same
# batches while each byte still has exactly one writer: the model is exact.
import os
import random
import sys
import threading
import time

import nbd

import faultlib
import sdctest
from sdctest import Model, Server, check
from faultlib import check_same, read_file, stats

THREADS = 16
PRIVATE = 512 << 10
STRIPE = 4096
SHARED = 2 << 20
SHARED_AT = THREADS * PRIVATE
SIZE = SHARED_AT + SHARED
DURATION = float(os.environ.get("STRESS_SECONDS", "25"))


class Worker:
    def __init__(self, idx, srv, model, seed):
        self.idx, self.srv, self.model = idx, srv, model
        self.rng = random.Random(seed * 1000 + idx)
        self.error = None
        self.ops = self.reconnects = self.flushes = 0
        self.stripes = [SHARED_AT + s * STRIPE
                        for s in range(idx, SHARED // STRIPE, THREADS)]

    def pick(self):
        """A range this thread alone writes: in its region or one stripe."""
        rng = self.rng
        if rng.random() < 0.6:
            base, span = self.idx * PRIVATE, PRIVATE
        else:
            base, span = rng.choice(self.stripes), STRIPE
        off = rng.randrange(0, span)
        n = rng.randint(1, min(span - off, 65536))
        return base + off, n

    def check_read(self, h, off, n):
        got = h.pread(n, off)
        want = self.model.read(off, n)
        if got != want:
            d = next(j for j in range(n) if got[j] != want[j])
            raise AssertionError("thread %d: read [%d,+%d) differs at byte %d" %
                                 (self.idx, off, n, off + d))

    def run(self, deadline):
        try:
            h = self.srv.connect()
            rng = self.rng
            while time.monotonic() < deadline:
                self.ops += 1
                off, n = self.pick()
                op = rng.random()
                fua = nbd.CMD_FLAG_FUA if rng.random() < 0.03 else 0
                if op < 0.45:
                    data = rng.randbytes(n)
                    h.pwrite(data, off, fua)
                    self.model.write(off, data)
                elif op < 0.52:
                    h.zero(n, off, fua)
                    self.model.zero(off, n)
                elif op < 0.56:
                    h.trim(n, off, fua)
                    self.model.zero(off, n)
                elif op < 0.95:
                    self.check_read(h, off, n)
                elif op < 0.98:
                    h.flush()
                    self.flushes += 1
                else:
                    h.shutdown()  # disconnect mid-stream, then come back
                    h = self.srv.connect()
                    self.reconnects += 1
            self.check_read(h, self.idx * PRIVATE, PRIVATE)
            for s in self.stripes:
                self.check_read(h, s, STRIPE)
            h.shutdown()
        except Exception as e:  # reported by the main thread
            self.error = "thread %d: %r" % (self.idx, e)


def main():
    seed = int(os.environ.get("SEED", "16"))
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    ctl = os.path.join(tmp, "ctl.sock")
    # A small queue bound makes writers meet backpressure too.
    srv = Server(["file", img], ["threshold=8", "max-age=200ms", "queue-max-size=2M",
                                 "control=" + ctl], tmpdir=tmp)
    with srv:
        model = Model(SIZE)
        workers = [Worker(i, srv, model, seed) for i in range(THREADS)]
        deadline = time.monotonic() + DURATION
        threads = [threading.Thread(target=w.run, args=(deadline,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:  # bounds within meson's timeout (90 s)
            t.join(max(0.0, deadline + 15 - time.monotonic()))
        check(not any(t.is_alive() for t in threads), "a worker is still running")
        errors = [w.error for w in workers if w.error]
        check(not errors, "; ".join(errors))
        st = stats(ctl)
        print("%d ops, %d flushes, %d reconnects in %.0fs; batches=%s plugin_writes=%s "
              "backpressure_waits=%s peak_queued_bytes=%s" %
              (sum(w.ops for w in workers), sum(w.flushes for w in workers),
               sum(w.reconnects for w in workers), DURATION, st["batches_flushed"],
               st["plugin_writes"], st["backpressure_waits"], st["peak_queued_bytes"]))
        check(all(w.reconnects > 0 for w in workers) or DURATION < 10,
              "some thread never reconnected")

        h = srv.connect()
        check_same(h.pread(SIZE, 0), model.read(0, SIZE), "final read over all connections")
        h.shutdown()
        check(srv.stop(timeout=20) == 0, "nbdkit exit status")
        check("could not be written" not in srv.log_text(), "shutdown reported lost data")
        check_same(read_file(img), model.read(0, SIZE), "disk after shutdown")
    print("stress: ok")


if __name__ == "__main__":
    sys.exit(main())
