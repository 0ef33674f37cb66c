# Backpressure: a slow plugin and a 1M queue bound; writers wait, nothing lost.
import os
import time

import sdctest

MiB = 1 << 20
SIZE = 20 * MiB
CHUNK = 65536
COUNT = 256  # 16 MiB through a 1 MiB queue


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-backpressure-")
    img = sdctest.make_image(tmp, SIZE)
    stats_path = os.path.join(tmp, "stats")
    model = sdctest.Model(SIZE)
    # Only backpressure (and the final flush) can start a batch.
    args = ["queue-max-size=1M", "threshold=1000", "max-age=1h", "delay-write=20ms",
            "sdccache-statsfile=" + stats_path]
    with sdctest.start_server(["file", img], args, under=["delay"], tmpdir=tmp) as srv:
        h = srv.connect()
        start = time.monotonic()
        for i in range(COUNT):
            d = os.urandom(CHUNK)
            h.pwrite(d, i * CHUNK)
            model.write(i * CHUNK, d)
        took = time.monotonic() - start
        print("16 MiB written in %.2f s" % took)
        for off in range(0, COUNT * CHUNK, 4 * MiB):
            sdctest.check(h.pread(4 * MiB, off) == model.read(off, 4 * MiB),
                          "read back differs in [%d,+4M)" % off)

        # A write larger than the queue bound goes through, after the older
        # buffered write it overlaps, and is in the file at once.
        small = os.urandom(4096)
        h.pwrite(small, 17 * MiB + 100)
        model.write(17 * MiB + 100, small)
        big = os.urandom(2 * MiB)
        h.pwrite(big, 16 * MiB + 7)
        model.write(16 * MiB + 7, big)
        sdctest.check(sdctest.disk_read(img, 16 * MiB + 7, len(big)) == big,
                      "write-through not in the file when acknowledged")
        newer = os.urandom(1000)
        h.pwrite(newer, 17 * MiB)
        model.write(17 * MiB, newer)
        sdctest.check(h.pread(3 * MiB, 16 * MiB) == model.read(16 * MiB, 3 * MiB),
                      "read back differs around the write-through")

        h.flush()
        sdctest.check(sdctest.disk_read(img, 0, SIZE) == model.read(0, SIZE),
                      "backing file differs from the model after flush")
        st = sdctest.wait_stats(stats_path,
                                lambda s: int(s["writethrough_requests"]) == 1 and
                                int(s["queued_requests"]) == 0,
                                10, "final counters")
        print("stats:", {k: st[k] for k in ("backpressure_waits", "backpressure_wait_us",
                                             "flushes_backpressure", "peak_queued_bytes",
                                             "batches_flushed", "plugin_writes")})
        sdctest.check(int(st["backpressure_waits"]) > 0, "no backpressure wait counted")
        sdctest.check(int(st["backpressure_wait_us"]) > 0, "no backpressure wait time")
        sdctest.check(int(st["flushes_backpressure"]) > 0, "no backpressure batch counted")
        sdctest.check(int(st["peak_queued_bytes"]) <= MiB,
                      "queued %s bytes past queue-max-size=1M" % st["peak_queued_bytes"])
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")


if __name__ == "__main__":
    main()
