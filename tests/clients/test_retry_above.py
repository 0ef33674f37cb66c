# nbdkit's retry filter above sdccache, over the nbd plugin, when the
# remote server dies and comes back.  On a failed request the retry filter
# reopens the layers below it: it finalizes and closes sdccache's context
# and opens a new one, on the same connection, while the client stays.
# sdccache took that finalize for the client's last disconnect and retried
# its write-back through the dead plugin connection for shutdown-timeout,
# holding up the reconnect and the client's request (31 s instead of 3 s
# with the default 30 s).  Now a context closed while its client is still
# connected makes one write-back attempt and leaves the rest buffered for
# the new context, which writes it at once.
import os
import signal
import time

import clientlib
import sdctest
from sdctest import check

SIZE = 8 << 20
BLOCK = 4096
SHUTDOWN_TIMEOUT_S = 20


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-retry-above-")
    back_disk = sdctest.make_image(tmp, SIZE, "back.img")
    back = clientlib.PlainServer(tmp, "back", ["file", back_disk])
    front_tmp = os.path.join(tmp, "front")
    os.mkdir(front_tmp)
    stats = os.path.join(front_tmp, "stats.txt")
    params = ["retries=5", "retry-delay=1",  # the retry filter's
              "shutdown-timeout=%ds" % SHUTDOWN_TIMEOUT_S, "sdccache-statsfile=" + stats]
    front = sdctest.start_server(["nbd", "socket=" + back.sock], params, over=("retry",),
                                 tmpdir=front_tmp)
    with front:
        h = front.connect()
        data = [bytes([0x20 + j]) * BLOCK for j in range(64)]
        for j, d in enumerate(data):
            h.pwrite(d, j * BLOCK)  # acknowledged, buffered
        sdctest.wait_stats(stats, lambda st: int(st["queued_requests"]) == len(data), 10,
                           "the writes to be buffered")
        # The remote dies and comes back at once: the nbd plugin's
        # connection of this client stays dead, so its next request fails
        # and the retry filter reopens (after retry-delay=1).
        back.proc.send_signal(signal.SIGKILL)
        back.wait_exit(10, "the remote server to die")
        os.unlink(os.path.join(tmp, "back.pid"))
        os.unlink(back.sock)
        back = clientlib.PlainServer(tmp, "back", ["file", back_disk])
        start = time.monotonic()
        got = h.pread(BLOCK, 1 << 20)
        took = time.monotonic() - start
        print("read across the reconnect took %.1f s" % took)
        check(got == b"\0" * BLOCK, "the read across the reconnect returned other data")
        check(took < SHUTDOWN_TIMEOUT_S / 2,
              "the read took %.1f s: the reconnect waited for write-back through the dead "
              "connection (shutdown-timeout=%ds)" % (took, SHUTDOWN_TIMEOUT_S))
        for j, d in enumerate(data):
            check(h.pread(BLOCK, j * BLOCK) == d, "block %d reads back stale" % j)
        h.flush()
        disk = sdctest.disk_read(back_disk, 0, 64 * BLOCK)
        for j, d in enumerate(data):
            check(disk[j * BLOCK:(j + 1) * BLOCK] == d,
                  "block %d, acknowledged and flushed, is not in the remote image" % j)
        h.shutdown()
        check(front.stop() == 0, "nbdkit exit status")
    back.proc.send_signal(signal.SIGTERM)
    back.wait_exit(10, "the remote server to exit")
    print("retry filter above: the reconnect took %.1f s, nothing lost" % took)


def working_context_leaves_first():
    """Two clients; the remote restarts.  h0's next request fails, the
    retry filter reopens its connection (a working context), h0 leaves at
    once; h1's context still talks to the dead remote connection.  h0's
    context, the only one that works, must write the data before it goes:
    it was left to h1's, and logged as lost at exit (review)."""
    tmp = sdctest.scratch_dir(prefix="sdc-retry-above2-")
    back_disk = sdctest.make_image(tmp, SIZE, "back.img")
    back = clientlib.PlainServer(tmp, "back", ["file", back_disk])
    front_tmp = os.path.join(tmp, "front")
    os.mkdir(front_tmp)
    front = sdctest.start_server(["nbd", "socket=" + back.sock],
                                 ["retries=5", "retry-delay=1", "shutdown-timeout=10s"],
                                 over=("retry",), tmpdir=front_tmp)
    with front:
        h0, h1 = front.connect(), front.connect()
        data = [bytes([0x30 + j]) * BLOCK for j in range(16)]
        for j, d in enumerate(data):
            h0.pwrite(d, j * BLOCK)  # acknowledged, buffered
        back.proc.send_signal(signal.SIGKILL)
        back.wait_exit(10, "the remote server to die")
        os.unlink(os.path.join(tmp, "back.pid"))
        os.unlink(back.sock)
        back = clientlib.PlainServer(tmp, "back", ["file", back_disk])
        h0.pread(BLOCK, 1 << 20)  # fails, the retry filter reopens, then succeeds
        h0.shutdown()  # returns once nbdkit has closed h0's connection
        disk = sdctest.disk_read(back_disk, 0, 16 * BLOCK)
        check(disk == b"".join(data), "h0's working context left without writing the data")
        h1.shutdown()
        check(front.stop() == 0, "nbdkit exit status")
        check("are lost" not in front.log_text(), "data lost:\n" + front.log_text()[-1500:])
    back.proc.send_signal(signal.SIGTERM)
    back.wait_exit(10, "the remote server to exit")
    print("retry filter above, two clients: the working context wrote the data as it left")


if __name__ == "__main__":
    main()
    working_context_leaves_first()
