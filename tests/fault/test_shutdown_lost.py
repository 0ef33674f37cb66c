# Shutdown with a plugin that never recovers: nbdkit exits once
# shutdown-timeout has passed and logs how many bytes could not be written.
import errno
import os
import random
import re
import signal
import time

import faultlib
import sdctest
from sdctest import Server, check, wait_until
from faultlib import error_args, expect_errno, read_file

SIZE = 4 << 20
TIMEOUT_S = 2


def main():
    rng = random.Random(int(os.environ.get("SEED", "31")))
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    srv = Server(["file", img] + error_args(["pwrite"], "100%"),
                 ["threshold=3", "shutdown-timeout=%ds" % TIMEOUT_S], under=["error"], tmpdir=tmp)
    with srv:
        h = srv.connect()
        # Disjoint ranges, so the bytes left over are exactly their sum.
        lengths = [rng.randint(1, 90000) for _ in range(9)]
        written = 0
        for i, n in enumerate(lengths):
            h.pwrite(rng.randbytes(n), i * 100000 + rng.randrange(0, 100000 - n + 1))
            written += n
        expect_errno(h.flush, errno.EIO, "flush with a failing plugin")
        h.shutdown()  # the flush on disconnect fails too
        del h

        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: srv.proc.poll() is not None, TIMEOUT_S + 15,
                   "nbdkit to exit after SIGTERM", interval=0.05)
        elapsed = time.monotonic() - start
        srv.stop()
        log = srv.log_text()
        print("nbdkit exited %.2fs after SIGTERM (shutdown-timeout=%ds), status %d" %
              (elapsed, TIMEOUT_S, srv.proc.returncode))
        check(elapsed >= TIMEOUT_S * 0.9,
              "nbdkit gave up after %.2fs, before shutdown-timeout=%ds" % (elapsed, TIMEOUT_S))
        check(elapsed <= TIMEOUT_S + 10, "nbdkit took %.2fs to exit" % elapsed)
        m = re.search(r"(\d+) requests, (\d+) bytes could not be written", log)
        check(m is not None, "no 'bytes could not be written' in the log:\n" + log[-3000:])
        check(int(m.group(2)) == written,
              "log names %s bytes lost, the client wrote %d unflushed bytes" %
              (m.group(2), written))
        check(int(m.group(1)) == len(lengths),
              "log names %s requests lost, the client made %d" % (m.group(1), len(lengths)))
        check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")
        print("lost %d bytes in %d requests, as logged" % (written, len(lengths)))
    faultlib.cleanup()


if __name__ == "__main__":
    main()
