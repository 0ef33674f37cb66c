# nbdinfo/nbdcopy over unflushed data: summary, block status map, full copy.
import json
import os

import sdctest

MiB = 1 << 20
SIZE = 4 * MiB
W_OFF, W_LEN = 1 * MiB + 4096, 61440          # unflushed write over a hole (< bypass-min)
F_OFF, F_LEN = 2 * MiB, 65536                  # flushed write
Z_OFF, Z_LEN = 2 * MiB + 16384, 16384          # unflushed zero over flushed data


def map_at(extents, off):
    """The extent (dict from nbdinfo --map --json) covering `off`."""
    for e in extents:
        if e["offset"] <= off < e["offset"] + e["length"]:
            return e
    sdctest.fail("no extent covers %d: %r" % (off, extents))


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-nbdinfo-")
    img = sdctest.make_image(tmp, SIZE)  # sparse: all hole
    with sdctest.start_server(["file", img], ["threshold=1000", "max-age=1h"], tmpdir=tmp) as srv:
        h = srv.connect()  # the writer stays connected throughout
        h.pwrite(b"\x11" * F_LEN, F_OFF)
        h.flush()
        unflushed = os.urandom(W_LEN)
        h.pwrite(unflushed, W_OFF)
        h.zero(Z_LEN, Z_OFF)

        def still_unflushed():
            sdctest.check(sdctest.disk_read(img, W_OFF, W_LEN) == bytes(W_LEN),
                          "the unflushed write reached the file")
            sdctest.check(sdctest.disk_read(img, Z_OFF, Z_LEN) == b"\x11" * Z_LEN,
                          "the unflushed zero reached the file")
        still_unflushed()

        # Summary in the export description, with this run's numbers.
        out = sdctest.run_command(["nbdinfo", srv.uri], timeout=30).stdout.decode()
        want = ("sdccache: threshold=1000 queued_requests=2 queued_bytes=%d "
                "batches_flushed=1" % W_LEN)
        desc = [l for l in out.splitlines() if "description" in l]
        sdctest.check(desc and want in desc[0],
                      "nbdinfo description lacks %r:\n%s" % (want, out))

        # Block status: unflushed data is data, unflushed zero is zero.
        out = sdctest.run_command(["nbdinfo", "--map", "--json", srv.uri], timeout=30)
        extents = json.loads(out.stdout.decode())
        print("map:", [(e["offset"], e["length"], e["type"]) for e in extents])
        for off in (W_OFF, W_OFF + W_LEN - 1):
            e = map_at(extents, off)
            sdctest.check(e["type"] & 3 == 0, "unflushed write at %d mapped as %r" % (off, e))
        for off in (Z_OFF, Z_OFF + Z_LEN - 1):
            e = map_at(extents, off)
            sdctest.check(e["type"] & 2, "unflushed zero at %d mapped as %r" % (off, e))
        e = map_at(extents, F_OFF)
        sdctest.check(e["type"] & 3 == 0, "flushed data at %d mapped as %r" % (F_OFF, e))
        e = map_at(extents, 3 * MiB)
        sdctest.check(e["type"] & 2, "untouched hole at 3M mapped as %r" % e)

        # nbdcopy copies what a read returns, unflushed data included.
        copy = os.path.join(tmp, "out.img")
        sdctest.run_command(["nbdcopy", srv.uri, copy], timeout=60)
        with open(copy, "rb") as f:
            copied = f.read()
        expected = h.pread(SIZE, 0)
        sdctest.check(len(copied) == SIZE, "nbdcopy wrote %d bytes" % len(copied))
        sdctest.check(copied == expected, "nbdcopy output differs from a read")
        sdctest.check(copied[W_OFF:W_OFF + W_LEN] == unflushed,
                      "nbdcopy output lacks the unflushed write")
        sdctest.check(copied[Z_OFF:Z_OFF + Z_LEN] == bytes(Z_LEN),
                      "nbdcopy output lacks the unflushed zero")
        still_unflushed()  # the read-only clients flushed nothing

        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")


def plugin_descriptions():
    """The plugin's description comes first, with the summary after it; one
    too long for both within NBD's 4096 bytes comes alone (nbdkit would drop
    the whole string)."""
    for base, want in (("a disk", "a disk (sdccache: threshold="), ("d" * 4050, "d" * 4050)):
        tmp = sdctest.scratch_dir(prefix="sdc-nbdinfo-desc-")
        with sdctest.start_server(["memory", "1M", "exportdesc=fixed:" + base], ["threshold=7"],
                                  under=["exportname"], tmpdir=tmp) as srv:
            out = sdctest.run_command(["nbdinfo", "--json", srv.uri], timeout=30)
            desc = json.loads(out.stdout.decode())["exports"][0].get("description")
            sdctest.check(desc is not None and desc.startswith(want) and
                          (len(base) < 4000 or desc == base),
                          "description %r, want it to start with %r" % (desc, want[:40]))
            sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("plugin descriptions: ok")


if __name__ == "__main__":
    main()
    plugin_descriptions()
