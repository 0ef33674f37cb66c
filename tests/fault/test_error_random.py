# Random plugin write failures under a model-checked random workload: only
# flush/FUA may fail; after the failures stop, nothing is lost.  And a plugin
# that is not multi-conn, failing now and then, still takes a large batch.
import errno
import os
import random

import nbd

import faultlib
import sdctest
from sdctest import Model, Server, check, wait_until
from faultlib import (FaultyOps, check_same, counter, error_args, read_file, remove, stats,
                      touch)

SIZE = 8 << 20


def run(seed, threshold, count, rate="30%"):
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    trig = os.path.join(tmp, "fail-now")
    ctl = os.path.join(tmp, "ctl.sock")
    touch(trig)
    # sdccache -> delay -> error -> file: every plugin write takes a little
    # while, so client writes land beside batches that are failing.
    delays = ["delay-write=2ms", "delay-zero=2ms", "delay-trim=2ms"]
    srv = Server(["file", img] + delays + error_args(["pwrite", "zero", "trim"], rate, trig),
                 ["threshold=%d" % threshold, "max-age=100ms", "control=" + ctl],
                 under=["delay", "error"], tmpdir=tmp)
    with srv:
        h = srv.connect()
        h2 = srv.connect()
        model = Model(SIZE)
        ops = FaultyOps(h, model, SIZE, seed, disk=img)
        ops.run(count)
        # A second connection sees the same content while failures go on.
        check_same(h2.pread(SIZE, 0), model.read(0, SIZE), "second connection while failing")
        st = stats(ctl)
        print("rate %s seed %d threshold %d: %d flushes ok, %d failed, %d FUA failed, "
              "flush_errors=%s batches=%s" %
              (rate, seed, threshold, ops.flush_ok, ops.flush_failures, ops.fua_failures,
               st["flush_errors"], st["batches_flushed"]))
        check(int(st["flush_errors"]) > 0, "no plugin write failed: the test tested nothing")
        if rate != "30%":
            # At a low rate, good and failed batches must alternate.
            check(int(st["batches_flushed"]) > 0, "no batch succeeded at rate %s" % rate)

        remove(trig)  # the plugin recovers; retries drain the queue
        wait_until(lambda: counter(ctl, "queued_requests") == 0, 30, "queue drained by retries")
        h.flush()
        h2.flush()
        check_same(read_file(img), model.read(0, SIZE), "disk after recovery")
        check_same(h2.pread(SIZE, 0), model.read(0, SIZE), "read after recovery")
        h.shutdown()
        h2.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
        check_same(read_file(img), model.read(0, SIZE), "disk after shutdown")
        check("could not be written" not in srv.log_text(), "shutdown reported lost data")


def many_ranges_without_multi_conn(seed):
    """A plugin that is not multi-conn, failing 2% of writes, and a batch of
    2000 separate ranges: a batch then almost never gets through without a
    failure, so what each attempt wrote must be flushed and retired, not
    written again in full (with that, no flush ever succeeded)."""
    size = 32 << 20
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, size)
    ctl = os.path.join(tmp, "ctl.sock")
    srv = Server(["file", img, "multi-conn-mode=disable"] + error_args(["pwrite"], "2%"),
                 ["threshold=1048576", "max-age=0", "control=" + ctl],
                 under=["multi-conn", "error"], tmpdir=tmp)
    with srv:
        h = srv.connect()
        check(not h.can_multi_conn(), "the plugin stack is multi-conn: the test tests nothing")
        model = Model(size)
        rng = random.Random(seed)
        for i in range(2000):
            data = rng.randbytes(4096)
            h.pwrite(data, i * 8192)
            model.write(i * 8192, data)
        tries = 0
        while True:
            tries += 1
            try:
                h.flush()
                break
            except nbd.Error as e:
                check(e.errnum == errno.EIO, "flush failed with %s, want EIO" % e)
                check(tries < 50, "no flush succeeded in %d tries: %s" % (tries, stats(ctl)))
        st = stats(ctl)
        print("2000 ranges, not multi-conn, 2%% failures: flushed after %d tries, "
              "flush_errors=%s" % (tries, st["flush_errors"]))
        check(int(st["flush_errors"]) > 0, "no plugin write failed: the test tested nothing")
        check_same(read_file(img), model.read(0, size), "disk after the flush")
        h.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")


def main():
    seed = int(os.environ.get("SEED", "7"))
    run(seed, threshold=4, count=3000)
    run(seed + 1, threshold=1, count=1500)
    run(seed + 2, threshold=2, count=2000, rate="5%")
    many_ranges_without_multi_conn(seed)


if __name__ == "__main__":
    main()
