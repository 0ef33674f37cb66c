# Shutdown with a plugin that recovers (before disconnect, or while shutdown
# retries): nothing is lost, the backing file equals the model.
import errno
import os
import random
import signal

import faultlib
import sdctest
from sdctest import Model, Server, check, wait_until
from faultlib import (check_same, error_args, expect_errno, read_file, remove, touch,
                      wait_counter)

SIZE = 4 << 20


def start(tmp, img, trig, ctl):
    return Server(["file", img] + error_args(["pwrite", "zero"], "100%", trig),
                  ["threshold=3", "max-age=0", "shutdown-timeout=30s", "control=" + ctl,
                   "statsfile=" + os.path.join(tmp, "stats")],
                  under=["error"], tmpdir=tmp)


def statsfile_counter(tmp, key):
    """A counter from the stats file, 0 while the file is missing."""
    st = sdctest.read_stats_file(os.path.join(tmp, "stats"))
    return int(st.get(key, 0)) if st else 0


def workload(h, model, rng):
    for _ in range(20):
        off = rng.randrange(0, SIZE - 100000)
        n = rng.randint(1, 100000)
        if rng.random() < 0.8:
            data = rng.randbytes(n)
            h.pwrite(data, off)
            model.write(off, data)
        else:
            h.zero(n, off)
            model.zero(off, n)


def recovered_before_disconnect(seed):
    rng = random.Random(seed)
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    trig, ctl = os.path.join(tmp, "fail-now"), os.path.join(tmp, "ctl.sock")
    touch(trig)
    srv = start(tmp, img, trig, ctl)
    with srv:
        h = srv.connect()
        model = Model(SIZE)
        workload(h, model, rng)
        wait_counter(ctl, "flush_errors", 1)
        check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")
        remove(trig)
        # No client flush: the data still buffered (or waiting for a retry)
        # must be written by the disconnect and shutdown paths.
        h.shutdown()
        del h
        check(srv.stop(timeout=40) == 0, "nbdkit exit status")
        log = srv.log_text()
        check("could not be written" not in log, "shutdown reported lost data:\n" + log[-2000:])
        check_same(read_file(img), model.read(0, SIZE), "disk after shutdown")
    print("recovered before disconnect: ok")


def recovered_during_shutdown(seed):
    rng = random.Random(seed)
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    trig, ctl = os.path.join(tmp, "fail-now"), os.path.join(tmp, "ctl.sock")
    touch(trig)
    srv = start(tmp, img, trig, ctl)
    with srv:
        h = srv.connect()
        model = Model(SIZE)
        workload(h, model, rng)
        expect_errno(h.flush, errno.EIO, "flush while failing")
        h.shutdown()  # its disconnect flush fails as well
        del h
        errors = statsfile_counter(tmp, "flush_errors")
        srv.proc.send_signal(signal.SIGTERM)
        # Shutdown now retries the failing plugin (for up to 30 s): it must
        # still be running, with nothing written, until the plugin recovers.
        wait_until(lambda: statsfile_counter(tmp, "flushes_shutdown") >= 1 and
                   statsfile_counter(tmp, "flush_errors") > errors, 10,
                   "a failed shutdown flush in the stats file", interval=0.02)
        check(srv.proc.poll() is None, "nbdkit exited while its plugin still failed:\n" +
              srv.log_text()[-2000:])
        check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")
        remove(trig)
        wait_until(lambda: srv.proc.poll() is not None, 20, "nbdkit to exit after recovery",
                   interval=0.05)
        check(srv.stop() == 0, "nbdkit exit status")
        log = srv.log_text()
        check("could not be written" not in log, "shutdown reported lost data:\n" + log[-2000:])
        check_same(read_file(img), model.read(0, SIZE), "disk after shutdown")
    print("recovered during shutdown: ok")


def main():
    seed = int(os.environ.get("SEED", "5"))
    recovered_before_disconnect(seed)
    recovered_during_shutdown(seed + 1)
    faultlib.cleanup()


if __name__ == "__main__":
    main()
