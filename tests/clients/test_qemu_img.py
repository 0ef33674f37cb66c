# qemu-img convert -n of a random sparse 64 MiB image into the export, then qemu-img compare.
import os
import sys

import clientlib
from clientlib import check, run
import sdctest

SIZE = 64 << 20


def main():
    clientlib.require("qemu-img")
    srv_tmp = sdctest.scratch_dir(prefix="sdc-qemu-img-")
    src = os.path.join(srv_tmp, "src.img")
    clientlib.random_image(src, SIZE, seed=1234)
    # The backing file starts as 0xff, so holes of the source must be
    # written as zeroes through the filter, not skipped.
    disk = os.path.join(srv_tmp, "disk.img")
    clientlib.fill(disk, SIZE, 0xFF)
    stats = os.path.join(srv_tmp, "stats.txt")

    params = ["threshold=8", "queue-max-size=8M", "max-age=0", "sdccache-statsfile=" + stats]
    srv = clientlib.start_server(["file", disk], params, tmpdir=srv_tmp)
    with srv:
        out, _ = run(["qemu-img", "convert", "-n", "-p", "-f", "raw", "-O", "raw", "-W",
                      src, srv.uri], timeout=120)
        # Through the filter: the export equals the source.
        out, _ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri],
                     timeout=120)
        check("Images are identical" in out, "qemu-img compare: " + out)

        # Negative control: compare must notice a one-byte difference.
        h = srv.connect()
        old = h.pread(1, SIZE // 2 + 17)
        h.pwrite(bytes([old[0] ^ 0x5A]), SIZE // 2 + 17)
        h.shutdown()
        out, rc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, srv.uri],
                      timeout=120, expect_rc=None)
        check(rc == 1 and "mismatch" in out.lower(),
              "compare missed a changed byte (rc %d): %s" % (rc, out))
        h = srv.connect()
        h.pwrite(old, SIZE // 2 + 17)
        h.shutdown()

        # The stats file is rewritten shortly after each batch.
        sdctest.wait_until(lambda: clientlib.stat_int(stats, "flushes_threshold") +
                           clientlib.stat_int(stats, "flushes_backpressure") > 0, 5,
                           "threshold/backpressure batches in " + stats)
        st = clientlib.read_stats(stats)
        print("stats after convert:", {k: st.get(k) for k in
              ("batches_flushed", "bytes_flushed", "plugin_writes", "flushes_threshold",
               "flushes_backpressure", "flushes_disconnect", "peak_queued_bytes")})
        check(int(st["peak_queued_bytes"]) <= 8 << 20,
              "peak_queued_bytes %s above queue-max-size" % st["peak_queued_bytes"])
        rc = srv.stop()
        check(rc == 0, "nbdkit exit status %d\n%s" % (rc, srv.log_text()))

    # On disk, read directly: the backing file equals the source.
    diff = clientlib.files_equal(src, disk, SIZE)
    check(diff == -1, "backing file differs from the source at byte %d" % diff)
    out, _ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", src, disk], timeout=60)
    check("Images are identical" in out, "qemu-img compare on disk: " + out)
    print("PASS: qemu-img convert/compare through sdccache, 64 MiB")


if __name__ == "__main__":
    main()
    sys.exit(0)
