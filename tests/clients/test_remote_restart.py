# sdccache over the nbd plugin when the remote server dies and comes back.
# The nbd plugin never reconnects an open connection: a client connected
# before the restart keeps a dead plugin context (every call fails with
# EINVAL), while one connected after it works.  The flusher kept writing
# through the oldest context, the dead one, and (the remote not being
# multi-conn) every flush had to reach it too: no flush ever succeeded
# again, and the data was lost when the old client left.  Now the flusher
# avoids a context whose last call failed, and a context whose flush fails
# has its unflushed writes counted as lost (that flush fails; the data is
# written again elsewhere), so that a later flush succeeds.  Both with a
# remote that is not multi-conn and with one that is (the plain file
# plugin, the common case): with multi-conn the old client's thread kept
# writing through its own dead context, so its FUA writes failed (20/20)
# and so did a quarter of the new client's flushes.
import os
import signal

import nbd

import clientlib
import sdctest
from sdctest import check

SIZE = 4 << 20


def run(multi_conn):
    print("remote multi-conn: %s" % multi_conn)
    tmp = sdctest.scratch_dir(prefix="sdc-restart-")
    back_disk = sdctest.make_image(tmp, SIZE, "back.img")
    if multi_conn:
        back_args = ["file", back_disk]
    else:  # a flush must reach every context written through
        back_args = ["--filter=multi-conn", "file", back_disk, "multi-conn-mode=disable"]
    back = clientlib.PlainServer(tmp, "back", back_args)
    front_tmp = os.path.join(tmp, "front")
    os.mkdir(front_tmp)
    stats = os.path.join(front_tmp, "stats.txt")
    params = ["threshold=1048576", "max-age=100ms", "sdccache-statsfile=" + stats,
              "shutdown-timeout=1s"]
    front = sdctest.start_server(["nbd", "socket=" + back.sock, "retry=10"], params, tmpdir=front_tmp)
    with front:
        old = front.connect()
        old.pwrite(b"\x01" * 4096, 0)
        old.flush()
        back.proc.send_signal(signal.SIGKILL)
        back.wait_exit(10, "the remote server to die")
        # Killed, it left its socket and pidfile: the new one makes its own
        # (its pidfile says when it is ready).
        os.unlink(os.path.join(tmp, "back.pid"))
        os.unlink(back.sock)
        back = clientlib.PlainServer(tmp, "back", back_args)
        new = front.connect()
        # Buffered, acknowledged; its write-back through the old client's
        # dead context fails.
        old.pwrite(b"\x02" * 4096, 65536)
        new.pwrite(b"\x03" * 4096, 131072)
        sdctest.wait_stats(stats, lambda st: int(st["flush_errors"]) >= 1, 10,
                           "a write-back through the dead context to fail")
        errors = []
        for _ in range(5):
            try:
                new.flush()
                break
            except nbd.Error as e:
                errors.append(str(e))
        else:
            check(False, "every flush of the new client fails: %s" % errors)
        check(len(errors) <= 1, "flushes failed before one succeeded: %s" % errors)
        disk = sdctest.disk_read(back_disk, 0, 135168)
        check(disk[65536:69632] == b"\x02" * 4096 and disk[131072:135168] == b"\x03" * 4096,
              "a successful flush left acknowledged writes out of the remote image")
        # The old client goes on writing with FUA (through its own dead
        # context, its writes made that context unflushed again each time,
        # and the new client's next flush failed on it: 47 of 50; with
        # multi-conn its write-back batches, holding everyone's data,
        # failed there).  Once a flush or (multi-conn) a call through its
        # context has failed, its writes go through a working one: neither
        # client's requests fail any more.
        old_fails, new_fails = [], []
        for i in range(20):
            try:
                old.pwrite(bytes([0x10 + i]) * 4096, 196608, nbd.CMD_FLAG_FUA)
                old.flush()
            except nbd.Error as e:
                old_fails.append(str(e))
            new.pwrite(bytes([0x40 + i]) * 4096, 262144 + 4096 * i)
            try:
                new.flush()
            except nbd.Error as e:
                new_fails.append(str(e))
        print("old client's FUA writes and flushes failed %d/20, new client's flushes %d/20" %
              (len(old_fails), len(new_fails)))
        check(not new_fails, "the new client's flushes failed: %s" % new_fails)
        check(not old_fails, "the old client's FUA writes or flushes failed: %s" % old_fails)
        disk = sdctest.disk_read(back_disk, 196608, 262144 + 4096 * 20 - 196608)
        check(disk[:4096] == bytes([0x10 + 19]) * 4096, "the last FUA write is not durable")
        for i in range(20):
            off = 262144 + 4096 * i - 196608
            check(disk[off:off + 4096] == bytes([0x40 + i]) * 4096,
                  "a flushed write of the new client is not in the remote image")
        new.shutdown()
        try:
            old.shutdown()
        except nbd.Error:
            pass
        check(front.stop() == 0, "nbdkit exit status")
    back.proc.send_signal(signal.SIGTERM)
    back.wait_exit(10, "the remote server to exit")


def main():
    run(multi_conn=False)
    run(multi_conn=True)


if __name__ == "__main__":
    main()
