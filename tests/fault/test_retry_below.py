# nbdkit's retry filter below sdccache: a batch that a client's thread
# writes goes through that client's own plugin connection.  Through another
# client's, a failed write made the retry filter reopen that connection
# from this thread, and nbdkit 1.32 aborted (plugins.c: Assertion
# `c->conn->exportname == NULL'), losing the acknowledged write.
import errno
import os

import nbd

import faultlib
import sdctest
from sdctest import Server, check
from faultlib import error_args, read_file, remove, touch

SIZE = 1 << 20


def main():
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    trig = os.path.join(tmp, "writes-fail")
    srv = Server(["file", img] + error_args(["pwrite"], "100%", trig) +
                 ["retries=2", "retry-delay=1", "retry-exponential=no"],
                 ["threshold=1000", "max-age=0"], under=["retry", "error"], tmpdir=tmp)
    with srv:
        first = srv.connect()   # its plugin connection is the oldest
        second = srv.connect()
        data = b"B" * 4096
        second.pwrite(data, 0)  # acknowledged, buffered
        touch(trig)
        # Twice: the outage outlasts the retry filter's budget.  After the
        # first failure the client left its own (failing) connection for
        # the first client's, never used (with a multi-conn plugin, since
        # 782c454), and the retry filter's reopen of that one from this
        # thread aborted nbdkit.  It stays on its own while no other
        # connection is known to work.
        for attempt in range(2):
            try:
                second.flush()  # written on this thread: the write fails, retry reopens
                check(False, "flush succeeded while every plugin write fails")
            except nbd.Error as e:
                check(e.errnum == errno.EIO, "flush %d while the plugin fails: %s" % (attempt, e))
            check(srv.proc.poll() is None,
                  "nbdkit exited (%s) when the retry filter reopened a plugin connection:\n%s"
                  % (srv.proc.poll(), srv.log_text()[-2000:]))
        remove(trig)
        second.flush()
        check(read_file(img)[:4096] == data, "acknowledged write not in the image")
        first.shutdown()
        second.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")
        check("Assertion" not in srv.log_text(), "nbdkit asserted:\n" + srv.log_text()[-2000:])
    print("retry-below: ok")


if __name__ == "__main__":
    main()
