# Shutdown with a plugin that recovers (before the disconnect, while the last
# disconnect retries, or while it retries after SIGTERM): nothing is lost.
#
# The last connection of an export writes everything buffered before it
# closes, retrying a failing plugin for up to shutdown-timeout; libnbd's
# shutdown() returns once the server has closed, so the backing file must
# equal the model right then, before nbdkit is even asked to exit.
import os
import random
import signal
import threading
import time

import faultlib
import sdctest
from sdctest import Model, Server, check, wait_until
from faultlib import check_same, counter, error_args, read_file, remove, touch, wait_counter

SIZE = 4 << 20
WINDOW_S = 30  # shutdown-timeout: far longer than any recovery below


def start(tmp, img, trig, ctl):
    return Server(["file", img] + error_args(["pwrite", "zero"], "100%", trig),
                  ["threshold=3", "max-age=0", "shutdown-timeout=%ds" % WINDOW_S,
                   "control=" + ctl, "sdccache-statsfile=" + os.path.join(tmp, "stats")],
                  under=["error"], tmpdir=tmp)


def setup(seed):
    """A server whose plugin fails, and a client that wrote a workload."""
    rng = random.Random(seed)
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    trig, ctl = os.path.join(tmp, "fail-now"), os.path.join(tmp, "ctl.sock")
    touch(trig)
    srv = start(tmp, img, trig, ctl)
    h = srv.connect()
    model = Model(SIZE)
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
    wait_counter(ctl, "flush_errors", 1)
    check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")
    return srv, h, model, img, trig, ctl


class Disconnect(threading.Thread):
    """h.shutdown() in the background: it blocks while the filter retries."""

    def __init__(self, h):
        super().__init__(daemon=True)
        self.h, self.error, self.took = h, None, None

    def run(self):
        t0 = time.monotonic()
        try:
            self.h.shutdown()
        except Exception as e:  # reported by finish()
            self.error = e
        self.took = time.monotonic() - t0

    def finish(self, what):
        self.join(timeout=WINDOW_S / 2)
        check(not self.is_alive(), "%s: the disconnect still blocks %ds after recovery" %
              (what, WINDOW_S // 2))
        check(self.error is None, "%s: shutdown() failed: %s" % (what, self.error))
        return self.took


def await_disconnect_retry(srv, img, ctl, disc, what, attempts):
    """Waits until the last disconnect's flush has failed `attempts` times.

    The disconnect's flush is counted once in flushes_disconnect, when it
    starts; from then on every attempt to write back (the disconnect's own
    retries, or the flusher's, which it waits for) fails and is counted in
    flush_errors."""
    wait_until(lambda: counter(ctl, "flushes_disconnect") >= 1, 20,
               "%s: the disconnect's flush (flushes_disconnect >= 1)" % what, interval=0.02)
    errors = counter(ctl, "flush_errors")
    wait_until(lambda: counter(ctl, "flush_errors") >= errors + attempts, 20,
               "%s: %d failed attempts during the disconnect (flush_errors >= %d)" %
               (what, attempts, errors + attempts), interval=0.02)
    check(counter(ctl, "flushes_disconnect") == 1,
          "%s: one disconnect counted as %d flushes" % (what, counter(ctl, "flushes_disconnect")))
    check(disc.is_alive(), "%s: the disconnect returned while the plugin still failed" % what)
    check(srv.proc.poll() is None, "%s: nbdkit exited while its plugin still failed:\n%s" %
          (what, srv.log_text()[-2000:]))
    check(read_file(img) == bytes(SIZE), "%s: a write reached the failing plugin" % what)


def check_nothing_lost(srv, img, model, what):
    log = srv.log_text()
    check("could not be written" not in log, "%s: reported lost data:\n%s" % (what, log[-2000:]))
    check_same(read_file(img), model.read(0, SIZE), "%s: disk after shutdown" % what)
    # Everything was written and flushed, so a shutdown error is false; noted
    # here and failed at the end, so that every scenario still runs.
    for line in log.splitlines():
        if "final plugin flush failed" in line:
            false_errors.append("%s: %s" % (what, line))


false_errors = []


def recovered_before_disconnect(seed):
    what = "recovered before disconnect"
    srv, h, model, img, trig, ctl = setup(seed)
    with srv:
        remove(trig)
        # No client flush: the disconnect writes what is still buffered (the
        # background retry may have written some or all of it by now) and
        # flushes it, without reporting the failures from before the
        # recovery (check_nothing_lost).
        h.shutdown()
        del h
        check_same(read_file(img), model.read(0, SIZE), what + ": disk after disconnect")
        check(srv.stop() == 0, what + ": nbdkit exit status")
        check_nothing_lost(srv, img, model, what)
    print(what + ": ok")


def recovered_while_disconnect_retries(seed):
    what = "recovered during the last disconnect"
    srv, h, model, img, trig, ctl = setup(seed)
    with srv:
        disc = Disconnect(h)
        disc.start()
        await_disconnect_retry(srv, img, ctl, disc, what, 3)
        errors = counter(ctl, "flush_errors")
        remove(trig)
        took = disc.finish(what)
        del h
        print("%s: disconnect took %.2fs, %d plugin errors before recovery" %
              (what, took, errors))
        check_same(read_file(img), model.read(0, SIZE), what + ": disk after disconnect")
        check(srv.proc.poll() is None, what + ": nbdkit exited without a signal")
        check(srv.stop(timeout=10) == 0, what + ": nbdkit exit status after SIGTERM")
        check_nothing_lost(srv, img, model, what)
    print(what + ": ok")


def recovered_after_sigterm(seed):
    """SIGTERM while the client is connected: nbdkit 1.32 waits for the
    client; its disconnect, now during shutdown, retries the same way."""
    what = "recovered during shutdown"
    srv, h, model, img, trig, ctl = setup(seed)
    with srv:
        srv.proc.send_signal(signal.SIGTERM)
        disc = Disconnect(h)
        disc.start()
        # Deeper into the retries (longer backoff) than the case above.
        await_disconnect_retry(srv, img, ctl, disc, what, 6)
        remove(trig)
        took = disc.finish(what)
        del h
        wait_until(lambda: srv.proc.poll() is not None, 10,
                   what + ": nbdkit to exit once the client had gone", interval=0.02)
        print("%s: disconnect took %.2fs" % (what, took))
        check(srv.stop() == 0, what + ": nbdkit exit status")
        check_nothing_lost(srv, img, model, what)
    print(what + ": ok")


def main():
    seed = int(os.environ.get("SEED", "5"))
    recovered_before_disconnect(seed)
    recovered_while_disconnect_retries(seed + 1)
    recovered_after_sigterm(seed + 2)
    check(not false_errors,
          "nbdkit logged a failed final flush although all data reached the plugin and "
          "was flushed (a stale error from before the recovery?):\n" + "\n".join(false_errors))


if __name__ == "__main__":
    main()
