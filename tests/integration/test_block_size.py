# A plugin's minimum block size: a write, zero or trim it does not divide
# is refused with EINVAL at once, as the plugin may refuse it.  Buffered
# and refused only in the background, after it was acknowledged, it could
# never be written, and every later flush would fail.
import errno
import os

import nbd
import sdctest

MIN = 4096
SIZE = 1 << 20


def expect_einval(what, fn):
    """fn() fails with the server's EINVAL (libnbd's own checks are off)."""
    e = sdctest.expect_errno(fn, errno.EINVAL, what + ", not aligned to %d," % MIN)
    sdctest.check("command failed" in str(e), "%s failed in libnbd, not the server: %s" % (what, e))


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-blocksize-")
    # nbdkit's blocksize-policy filter makes the memory plugin advertise a
    # minimum of 4096 and refuse what does not meet it.
    with sdctest.start_server(["memory", str(SIZE), "blocksize-minimum=%d" % MIN,
                               "blocksize-error-policy=error"],
                              ["threshold=1000", "max-age=1h"], under=["blocksize-policy"],
                              tmpdir=tmp) as srv:
        h = srv.connect()
        h.set_strict_mode(0)  # libnbd would refuse misaligned requests itself
        sdctest.check(h.get_block_size(nbd.SIZE_MINIMUM) == MIN,
                      "minimum block size %d advertised, want %d" %
                      (h.get_block_size(nbd.SIZE_MINIMUM), MIN))
        expect_einval("a 512-byte write", lambda: h.pwrite(b"\x01" * 512, 0))
        expect_einval("a write at offset 512", lambda: h.pwrite(b"\x02" * MIN, 512))
        expect_einval("a 512-byte zero", lambda: h.zero(512, MIN))
        expect_einval("a 512-byte trim", lambda: h.trim(512, 2 * MIN))
        data = b"\x03" * (2 * MIN)
        h.pwrite(data, 4 * MIN)
        h.zero(MIN, 8 * MIN)
        h.flush()  # fails if anything refused was buffered
        sdctest.check(h.pread(2 * MIN, 4 * MIN) == data, "aligned write not read back")
        sdctest.check(h.pread(MIN, 0) == bytes(MIN), "a refused write was applied")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
        log = srv.log_text()
        sdctest.check("could not be written" not in log, "data lost at exit:\n" + log[-2000:])
        sdctest.check("minimum block size 4096" in log, "the refusal was not logged:\n" + log)
    print("misaligned write, zero, trim refused with EINVAL; aligned ones flushed")
    coalesced_up_to_the_maximum(sdctest.scratch_dir(prefix="sdc-blocksize-"))


def coalesced_up_to_the_maximum(tmp):
    """Write-back coalesces adjacent writes no further than the maximum the
    layer below advertises: the man page's answer to a splitting layer
    (blocksize) that advertises none is blocksize-policy's maximum."""
    logfile = os.path.join(tmp, "plugin.log")
    with sdctest.start_server(["memory", str(4 * SIZE), "blocksize-maximum=65536",
                               "logfile=" + logfile],
                              ["threshold=1000", "max-age=1h"],
                              under=["blocksize-policy", "log"], tmpdir=tmp) as srv:
        h = srv.connect()
        data = bytes(range(256)) * 16
        for i in range(256):  # 1 MiB in adjacent 4 KiB writes
            h.pwrite(data, i * 4096)
        h.flush()
        sdctest.check(h.pread(1 << 20, 0) == data * 256, "the writes not read back")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    sizes = [int(f["count"], 16) for kind, returned, f in sdctest.log_filter_calls(logfile)
             if kind == "Write" and not returned]
    sdctest.check(sizes and sum(sizes) == 1 << 20, "plugin writes %r" % sizes[:20])
    sdctest.check(max(sizes) == 65536, "plugin writes up to %d bytes, the maximum is 65536"
                  % max(sizes))
    print("write-back coalesced 1 MiB of 4 KiB writes into %d plugin writes of at most %d"
          % (len(sizes), max(sizes)))


def stop_with_no_request_over_the_maximum(srv, h):
    """Disconnects h, stops srv, and checks that blocksize-policy refused
    no request for being over the maximum."""
    h.shutdown()
    sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    log = srv.log_text()
    sdctest.check("larger than maximum" not in log, "a request over the maximum:\n" + log[-1500:])


def pieces_within_the_maximum(tmp):
    """Every plugin request the filter makes stays within the maximum the
    plugin advertises (blocksize-policy refuses anything larger): adjacent
    writes of a size that does not divide it, a buffered write larger than
    it, and a zero the plugin cannot do, written as zeroed data."""
    maximum = 65536
    with sdctest.start_server(["memory", str(4 * SIZE), "blocksize-maximum=%d" % maximum,
                               "blocksize-error-policy=error", "zeromode=none"],
                              ["threshold=1000", "max-age=1h", "bypass-min=0"],
                              under=["blocksize-policy", "nozero"], tmpdir=tmp) as srv:
        h = srv.connect()
        h.set_strict_mode(0)  # libnbd would refuse the write over the maximum itself
        model = bytearray(4 * SIZE)
        for i in range(100):  # 300,000 bytes in adjacent 3000-byte writes
            data = bytes([i + 1]) * 3000
            h.pwrite(data, i * 3000)
            model[i * 3000:(i + 1) * 3000] = data
        h.flush()
        big = bytes(range(256)) * 1024  # 256 KiB, buffered (bypass-min=0)
        h.pwrite(big, SIZE)
        model[SIZE:SIZE + len(big)] = big
        h.flush()
        h.zero(SIZE, 2 * SIZE - 4096)  # over data and beyond it
        model[2 * SIZE - 4096:3 * SIZE - 4096] = bytes(SIZE)
        h.pwrite(b"\xee" * maximum, 3 * SIZE)  # so that the zero has data to clear later
        model[3 * SIZE:3 * SIZE + maximum] = b"\xee" * maximum
        h.flush()
        h.zero(maximum * 2, 3 * SIZE - maximum // 2)
        model[3 * SIZE - maximum // 2:3 * SIZE + 3 * maximum // 2] = bytes(2 * maximum)
        h.flush()
        got = b"".join(h.pread(maximum, off) for off in range(0, 4 * SIZE, maximum))
        sdctest.check(got == bytes(model), "what was written not read back")
        stop_with_no_request_over_the_maximum(srv, h)
    print("adjacent 3000-byte writes, a 256 KiB write and zeroes of up to 1 MiB: plugin "
          "requests within %d bytes" % maximum)


def no_write_over_the_maximum_sent_straight(tmp):
    """With the defaults (bypass on), a client write larger than the
    maximum is buffered and written back in pieces, or written through in
    pieces, not sent straight to the plugin, which would refuse it: a FUA
    write with nothing before it, a large write, and one larger than
    queue-max-size."""
    maximum = 65536
    with sdctest.start_server(["memory", str(4 * SIZE), "blocksize-maximum=%d" % maximum,
                               "blocksize-error-policy=error"],
                              ["threshold=1000", "max-age=1h", "queue-max-size=256K"],
                              under=["blocksize-policy"], tmpdir=tmp) as srv:
        h = srv.connect()
        h.set_strict_mode(0)  # libnbd would refuse the writes over the maximum itself
        fua = bytes(range(256)) * 512  # 128 KiB
        h.pwrite(fua, 0, nbd.CMD_FLAG_FUA)
        large = b"\x5a" * (128 << 10)
        for i in range(4):
            h.pwrite(large, SIZE + i * len(large))
        through = b"\xa5" * (512 << 10)  # over queue-max-size
        h.pwrite(through, 2 * SIZE)
        h.flush()

        def read(count, offset):  # reads within the maximum too
            return b"".join(h.pread(maximum, o) for o in range(offset, offset + count, maximum))
        sdctest.check(read(len(fua), 0) == fua, "the FUA write not read back")
        sdctest.check(read(4 * len(large), SIZE) == large * 4, "the large writes not read back")
        sdctest.check(read(len(through), 2 * SIZE) == through, "the write-through not read back")
        stop_with_no_request_over_the_maximum(srv, h)
    print("writes over the %d-byte maximum (FUA, large, over queue-max-size): none sent to the "
          "plugin in one piece" % maximum)


def maximum_no_multiple_of_the_minimum(tmp):
    """nbdkit 1.32's blocksize-policy accepts a maximum that is no multiple
    of the minimum (6144 over 4096; libnbd then ignores the advertised
    sizes).  The pieces a larger write reaches the plugin in must stay
    aligned: a 12 KiB write cut at 6144 had its second piece refused, and
    was lost; one over queue-max-size failed."""
    with sdctest.start_server(["memory", str(16 * SIZE), "blocksize-minimum=4096",
                               "blocksize-maximum=6144", "blocksize-error-policy=error"],
                              ["threshold=1000", "max-age=1h", "queue-max-size=4M"],
                              under=["blocksize-policy"], tmpdir=tmp) as srv:
        h = srv.connect()
        small, big = b"\x05" * 12288, b"\x06" * (8 << 20)  # big: over queue-max-size
        h.pwrite(small, 0)
        h.pwrite(big, 4 << 20, nbd.CMD_FLAG_FUA)
        h.flush()

        def read(count, offset):  # within both limits
            return b"".join(h.pread(4096, o) for o in range(offset, offset + count, 4096))
        sdctest.check(read(len(small), 0) == small, "the 12 KiB write not read back")
        sdctest.check(read(len(big), 4 << 20) == big, "the 8 MiB write not read back")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
        log = srv.log_text()
        sdctest.check("not a multiple" not in log and "larger than maximum" not in log,
                      "a request the plugin refused:\n" + log[-1500:])
    print("maximum 6144 over minimum 4096: 12 KiB and 8 MiB writes reached the plugin in "
          "aligned pieces")


if __name__ == "__main__":
    main()
    pieces_within_the_maximum(sdctest.scratch_dir(prefix="sdc-blocksize-"))
    no_write_over_the_maximum_sent_straight(sdctest.scratch_dir(prefix="sdc-blocksize-"))
    maximum_no_multiple_of_the_minimum(sdctest.scratch_dir(prefix="sdc-blocksize-"))
