# qemu-io writes and pattern-checked reads (aligned, unaligned, zero) through the filter.
import os
import sys

import clientlib
from clientlib import check, run
import sdctest

SIZE = 16 << 20
MIB = 1 << 20


def qemu_io(uri, cmds, expect_ok=True):
    """Runs qemu-io on the export; every command must pass (or, with
    expect_ok=False, at least one must fail)."""
    # qemu-io defaults to cache=writethrough, which sends every write with
    # FUA; writeback lets the filter buffer them.
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for c in cmds:
        args += ["-c", c]
    out, rc = run(args + [uri], timeout=60, expect_rc=None)
    failed = rc != 0 or "verification failed" in out or "error" in out.lower()
    if expect_ok:
        check(not failed, "qemu-io failed (rc %d): %s\n%s" % (rc, cmds, out))
    else:
        check(failed, "qemu-io should have reported a mismatch (rc %d): %s\n%s" %
              (rc, cmds, out))
    return out


def main():
    clientlib.require("qemu-io")
    tmp = sdctest.scratch_dir(prefix="sdc-qemu-io-")
    disk = os.path.join(tmp, "disk.img")
    clientlib.fill(disk, SIZE, 0x11)
    stats = os.path.join(tmp, "stats.txt")
    params = ["threshold=1000", "max-age=0", "sdccache-statsfile=" + stats]
    srv = clientlib.start_server(["file", disk], params, tmpdir=tmp)
    with srv:
        # One qemu-io process: writes stay buffered (no trigger fires), and
        # its reads are served from the buffer.
        qemu_io(srv.uri, [
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 1000 5000",          # unaligned, inside the 0xab range
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 5000",
            "read -P 0xab 6000 1042576",
            "write -P 0xef 3145727 4097",       # unaligned, over old 0x11 data
            "read -P 0x11 3141632 4095",
            "read -P 0xef 3145727 4097",
            "read -P 0x11 3149824 4096",
            "write -z 2M 64k",                  # zero over 0x11
            "read -P 0 2M 64k",
            "write -P 0x5a 12M 4M",
            "read -P 0x5a 12M 4M",
        ])
        sdctest.wait_until(lambda: clientlib.stat_int(stats, "read_overlay_hits") >= 7, 5,
                           "reads served from the buffer (7 reads overlap buffered data)")
        # Negative control: a wrong pattern must be detected.
        qemu_io(srv.uri, ["read -P 0xac 0 4k"], expect_ok=False)

        # A second connection sees everything (qemu-io flushes when it closes).
        qemu_io(srv.uri, [
            "read -P 0xab 0 1000",
            "read -P 0xcd 1000 5000",
            "read -P 0xef 3145727 4097",
            "read -P 0 2M 64k",
            "read -P 0x5a 12M 4M",
        ])

        # Unflushed data reaches the disk after an explicit flush.
        qemu_io(srv.uri, ["write -P 0x77 5M 12345", "flush"])
        check(sdctest.disk_read(disk, 5 * MIB, 12345) == b"\x77" * 12345,
              "0x77 not on disk after qemu-io flush")
        rc = srv.stop()
        check(rc == 0, "nbdkit exit status %d\n%s" % (rc, srv.log_text()))

    # Read the backing file directly.
    expect = [
        (0, 1000, 0xAB), (1000, 5000, 0xCD), (6000, MIB - 6000, 0xAB),
        (MIB, MIB, 0x11), (2 * MIB, 64 << 10, 0x00),
        (3145727, 4097, 0xEF), (3145727 - 4095, 4095, 0x11),
        (5 * MIB, 12345, 0x77), (12 * MIB, 4 * MIB, 0x5A),
    ]
    for off, n, byte in expect:
        got = sdctest.disk_read(disk, off, n)
        check(got == bytes([byte]) * n, "disk [%d,+%d) is not 0x%02x" % (off, n, byte))
    print("PASS: qemu-io patterns through sdccache and on disk")


if __name__ == "__main__":
    main()
    sys.exit(0)
