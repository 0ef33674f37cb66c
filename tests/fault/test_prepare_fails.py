# The export's cache cannot be created (the filter cannot start its threads:
# EAGAIN, as under a pids limit).  The connection that asked fails with an
# error naming the problem; nbdkit keeps running, the next connection works,
# and nbdkit exits cleanly.  The failure is injected at the first, the
# second and the fifth thread the filter starts (writeback-threads=4: three
# batch writers, the flusher, the plugin-flush thread), so that threads
# already started must be stopped.
import os
import signal
import sys

import nbd

import faultlib
import sdctest
from sdctest import check

KiB = 1 << 10


def run(shim, fail_at):
    tmp = faultlib.tmpdir()
    flag = os.path.join(tmp, "fail-threads")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_FAIL_FLAG=flag,
               SDCCACHE_FAIL_AT=str(fail_at))
    with sdctest.start_server(["memory", "1M"], ["threshold=1000", "writeback-threads=4"],
                              tmpdir=tmp, env=env) as srv:
        open(flag, "w").close()
        try:
            srv.connect()
            sdctest.fail("fail_at=%d: the connection succeeded; the shim injected nothing"
                         % fail_at)
        except nbd.Error as e:
            print("fail_at=%d: connection refused as expected: %s" % (fail_at, e))
        log = srv.log_text()
        check("sdccache: prepare: Resource temporarily unavailable" in log,
              "fail_at=%d: no error naming the failure in nbdkit's log:\n%s" % (fail_at, log))
        os.unlink(flag)
        data = bytes([fail_at]) * (4 * KiB)
        try:
            h = srv.connect()
            h.pwrite(data, 8 * KiB)
            h.flush()
            got = h.pread(len(data), 8 * KiB)
            h.shutdown()
        except nbd.Error as e:
            sdctest.fail("fail_at=%d: the next connection failed (%s); nbdkit %s:\n%s" %
                         (fail_at, e, "is running" if srv.proc.poll() is None
                          else "exited with status %d" % srv.proc.returncode, srv.log_text()))
        check(got == data, "fail_at=%d: read back %r" % (fail_at, got[:4]))
        rc = srv.stop(signal.SIGTERM, timeout=30)
        check(rc == 0, "fail_at=%d: nbdkit exited %d:\n%s" % (fail_at, rc, srv.log_text()))


def main():
    shim = sys.argv[1]
    for fail_at in (1, 2, 5):
        run(shim, fail_at)


if __name__ == "__main__":
    main()
