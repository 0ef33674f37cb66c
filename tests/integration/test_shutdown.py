# Shutdown.  With nbdkit 1.32 there is no write-back at unload: nbdkit waits
# for its clients to disconnect, and the last connection to an export writes
# and flushes everything buffered for it as it closes (libnbd's shutdown()
# returns once nbdkit has closed the connection, so the file holds the data
# right then).  SIGTERM then exits 0 and reports nothing lost, whether it
# comes after the client left or while it is still connected.
import signal

import nbd

import sdctest

BLOCK = 4096


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-shutdown-")
    img = sdctest.make_image(tmp, 4 << 20)
    # No trigger can write during the test: only disconnect/shutdown can.
    with sdctest.start_server(["file", img], ["threshold=1000", "max-age=1h"], tmpdir=tmp) as srv:
        h = srv.connect()
        data = [bytes([0x30 + i]) * (BLOCK + 100) for i in range(8)]
        offs = [i * 300000 + 7 for i in range(8)]
        for d, off in zip(data, offs):
            h.pwrite(d, off)
        for d, off in zip(data, offs):
            sdctest.check(sdctest.disk_read(img, off, len(d)) == bytes(len(d)),
                          "data reached the file before shutdown")
        h.shutdown()
        for i, (d, off) in enumerate(zip(data, offs)):
            sdctest.check(sdctest.disk_read(img, off, len(d)) == d,
                          "write %d missing from the file once the last connection closed" % i)
        rc = srv.stop(signal.SIGTERM, timeout=30)
        sdctest.check(rc == 0, "nbdkit exited %d on SIGTERM:\n%s" % (rc, srv.log_text()))
        sdctest.check("could not be written" not in srv.log_text(),
                      "shutdown reported lost data:\n" + srv.log_text())

    # SIGTERM while the client is still connected: nbdkit waits for it to
    # go, then exits 0 with the data written.
    img2 = sdctest.make_image(tmp, 1 << 20, "disk2.img")
    with sdctest.start_server(["file", img2], ["threshold=1000", "max-age=1h"],
                        tmpdir=sdctest.scratch_dir(prefix="sdc-shutdown2-")) as srv:
        h = srv.connect()
        d = b"\x5a" * BLOCK
        h.pwrite(d, 65536)
        sdctest.check(sdctest.disk_read(img2, 65536, BLOCK) == bytes(BLOCK),
                      "data reached the file before shutdown")
        srv.proc.send_signal(signal.SIGTERM)
        try:
            h.shutdown()
        except nbd.Error as e:  # nbdkit may have closed the connection already
            print("shutdown after SIGTERM: %s" % e)
        # nbdkit may have closed the connection itself: its thread writes
        # back as it closes.
        sdctest.wait_disk(img2, 65536, d, 30, "the write in the file after SIGTERM")
        rc = srv.stop(signal.SIGTERM, timeout=30)
        sdctest.check(rc == 0, "nbdkit exited %d:\n%s" % (rc, srv.log_text()))
        sdctest.check("could not be written" not in srv.log_text(),
                      "shutdown reported lost data:\n" + srv.log_text())
        sdctest.check(sdctest.disk_read(img2, 65536, BLOCK) == d,
                      "write missing from the file after SIGTERM with a client connected")


if __name__ == "__main__":
    main()
