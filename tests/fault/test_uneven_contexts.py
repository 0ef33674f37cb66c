# A plugin whose answers differ between connections: the filter writes any
# connection's buffered data through any writable connection's plugin
# context, as the first connection's answers allow, and nbdkit aborts on a
# trim (zero, FUA, flush) call to a context whose plugin said it cannot.
# So a connection whose plugin cannot do what the first one could is
# refused, with a message that says why; nbdkit and the first connection
# go on.
import os

import nbd

import faultlib
import sdctest
from sdctest import Server, check

SIZE = 1 << 20


def main():
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    mark = os.path.join(tmp, "asked")
    fail = os.path.join(tmp, "fail-trim")
    # can_trim: true for the first connection only; trim fails while `fail`
    # exists.
    args = faultlib.eval_file_plugin(img) + [
        "trim=if [ -e %s ]; then echo 'EIO injected' >&2; exit 1; fi" % fail,
        "can_trim=if [ -e %s ]; then exit 3; fi; touch %s; exit 0" % (mark, mark)]
    with Server(args, ["threshold=1000", "max-age=1h", "shutdown-timeout=1s"],
                tmpdir=tmp) as srv:
        h1 = srv.connect()
        check(h1.can_trim(), "the first connection cannot trim: the test tests nothing")
        try:
            h2 = srv.connect()
        except nbd.Error as e:
            h2 = None
            print("second connection refused: %s" % e)
        if h2 is not None:
            # Without the check: h2 is attached.  h1 buffers a trim and
            # leaves while the plugin fails it; the retry goes through h2.
            h1.trim(4096, 0)
            faultlib.touch(fail)
            h1.shutdown()
            faultlib.remove(fail)
            sdctest.wait_until(lambda: srv.proc.poll() is not None, 5,
                               "nbdkit to abort on a trim through a context that cannot trim")
            check(False, "a connection that cannot trim was taken; nbdkit died (%d):\n%s" %
                  (srv.proc.returncode, srv.log_text()[-2000:]))
        log = srv.log_text()
        check("this connection cannot trim" in log, "refusal not logged:\n" + log[-2000:])
        check(srv.proc.poll() is None, "nbdkit died:\n" + log[-2000:])
        h1.pwrite(b"\x07" * 4096, 0)
        h1.trim(4096, 8192)
        h1.flush()
        check(faultlib.read_file(img)[:4096] == b"\x07" * 4096, "the first connection's write")
        h1.shutdown()
        check(srv.stop() == 0, "nbdkit exit status")


if __name__ == "__main__":
    main()
