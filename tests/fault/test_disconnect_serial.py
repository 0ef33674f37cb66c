# A client's NBD_CMD_DISC on a connection without worker threads (-t 1, or
# a layer that is not parallel), while the plugin fails: the last
# disconnect retries write-back for shutdown-timeout, and the data reaches
# the plugin once it recovers.
#
# The filter tells a filter above that reopens the connection (retry)
# from a real disconnect: a reopen's .finalize comes while the client is
# still connected, after a failed request.  Without workers,
# nbdkit_nanosleep does not see NBD_CMD_DISC (only a closed socket), so a
# client that sent it and kept its socket open was taken for a reopen when
# the filter asked only that: nothing retried, and the acknowledged write
# was logged as lost at exit although the plugin had recovered.  The
# client's last request here succeeded.
import os
import socket
import struct
import time

import faultlib
import sdctest
from sdctest import Server, check, wait_until
from faultlib import error_args, remove, touch, wait_counter

BLOCK = 4096
WINDOW_S = 30  # shutdown-timeout


def recv_exactly(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        check(chunk, "nbdkit closed the connection")
        got += chunk
    return got


def request(kind, handle, offset=0, length=0):
    return struct.pack(">IHHQQI", 0x25609513, 0, kind, handle, offset, length)


def write_then_disc(sock_path, data, flush_fails=False):
    """A raw NBD client: one write, acknowledged, then (with flush_fails) a
    flush that fails, then NBD_CMD_DISC; the socket is returned open
    (libnbd would shut it down at once)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_path)
    check(recv_exactly(s, 18)[:16] == b"NBDMAGICIHAVEOPT", "not a newstyle greeting")
    s.sendall(struct.pack(">I", 3))  # NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 0))  # NBD_OPT_EXPORT_NAME ""
    recv_exactly(s, 10)  # size and flags
    s.sendall(request(1, 1, 0, len(data)) + data)  # NBD_CMD_WRITE
    magic, error, handle = struct.unpack(">IIQ", recv_exactly(s, 16))
    check(magic == 0x67446698 and handle == 1, "not a reply to the write")
    check(error == 0, "the write failed: %d" % error)
    if flush_fails:
        s.sendall(request(3, 3))  # NBD_CMD_FLUSH
        magic, error, handle = struct.unpack(">IIQ", recv_exactly(s, 16))
        check(magic == 0x67446698 and handle == 3, "not a reply to the flush")
        check(error != 0, "the flush succeeded with the plugin failing")
    s.sendall(request(2, 2))  # NBD_CMD_DISC
    return s


def run(name, extra, over, flush_fails=False):
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, 1 << 20)
    trig, ctl = os.path.join(tmp, "fail-now"), os.path.join(tmp, "ctl.sock")
    touch(trig)
    data = b"D" * BLOCK
    with Server(["file", img] + error_args(["pwrite"], "100%", trig),
                ["threshold=1000", "max-age=0", "shutdown-timeout=%ds" % WINDOW_S,
                 "control=" + ctl], under=["error"], over=over, extra=extra,
                tmpdir=tmp) as srv:
        s = write_then_disc(srv.sock, data, flush_fails)
        try:
            if flush_fails:
                # Its last request failed, as before a reopen: the client
                # closes its socket 0.2 s after NBD_CMD_DISC (its own pace,
                # not a wait for the server), within the filter's grace.
                time.sleep(0.2)
                s.close()
                # The disconnect retries: flush_errors keeps moving.
                wait_counter(ctl, "flushes_disconnect", 1)
                wait_counter(ctl, "flush_errors", faultlib.counter(ctl, "flush_errors") + 2)
            else:
                # The disconnect's first write-back attempt has failed; the
                # client still holds its socket open.
                wait_counter(ctl, "flush_errors", 1)
            remove(trig)
            wait_until(lambda: sdctest.disk_read(img, 0, BLOCK) == data, WINDOW_S / 2,
                       "%s: the write to reach the recovered plugin" % name)
        finally:
            s.close()
        wait_until(lambda: faultlib.counter(ctl, "queued_requests") == 0, 10,
                   "%s: the queue to empty" % name)
        check(srv.stop() == 0, "%s: nbdkit exited non-zero" % name)
        log = srv.log_text()
        check("are lost" not in log and "reopened by a filter above" not in log,
              "%s: the disconnect was taken for a reopen:\n%s" % (name, log[-2000:]))
    print("%s: NBD_CMD_DISC with the socket %s: the write reached the plugin once it "
          "recovered" % (name, "closed 0.2 s later, after a failed flush" if flush_fails
                         else "held open"))


def main():
    # -v: the log would say "reopened by a filter above" (a debug line).
    run("-t 1", ["-v", "-t", "1"], ())
    run("noparallel above", ["-v"], ("noparallel",))
    run("-t 1", ["-v", "-t", "1"], (), flush_fails=True)


if __name__ == "__main__":
    main()
