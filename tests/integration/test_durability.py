# Durability in the backing file: after a flush, a FUA write, and a disconnect.

import os

import sdctest

import nbd

BLOCK = 4096


def absent(img, off, what):
    sdctest.check(sdctest.disk_read(img, off, BLOCK) == bytes(BLOCK),
                  "%s reached the file before anything asked for it" % what)


def reached_plugin_durably(logfile, offset, count, what, call="Write"):
    """The log filter below saw a `call` (Write, Zero, Trim) of
    [offset, offset+count) succeed with FUA, or a flush begin after it
    ended, and succeed: the plugin was asked to make it durable (reading
    the backing file only shows it was written, as the page cache holds it
    either way).  A flush that began before the write ended need not cover
    it (nbdkit's multi-conn filter then takes the connection as clean)."""
    calls = sdctest.log_filter_calls(logfile)
    last = None
    for i, (kind, returned, f) in enumerate(calls):
        if (kind == call and not returned and int(f["offset"], 16) == offset and
                int(f["count"], 16) == count):
            last = i
    sdctest.check(last is not None, "%s: no plugin %s of [%d,+%d) in the log" %
                  (what, call, offset, count))
    start = calls[last][2]

    def end_of(kind, fields, after):
        return next((i for i, (k, returned, f) in enumerate(calls) if i > after and
                     k == kind and returned and (f["connection"], f["id"]) ==
                     (fields["connection"], fields["id"])), None)
    ended = end_of(call, start, last)
    sdctest.check(ended is not None and calls[ended][2].get("return") == "0",
                  "%s: the plugin write did not succeed" % what)
    flushed = any(kind == "Flush" and not returned and end_of("Flush", f, i) is not None and
                  calls[end_of("Flush", f, i)][2].get("return") == "0"
                  for i, (kind, returned, f) in enumerate(calls) if i > ended)
    sdctest.check(start["fua"] == "1" or flushed,
                  "%s: the plugin wrote it without FUA and no flush began after it ended "
                  "and succeeded: %r" % (what, calls[last:]))


def plugin_asked_for_durability():
    """A flush, a FUA write and a FUA write too large to buffer (written
    through) return only once the plugin was asked to make them durable."""
    tmp = sdctest.scratch_dir(prefix="sdc-durable-log-")
    img = sdctest.make_image(tmp, 4 << 20)
    logfile = os.path.join(tmp, "plugin.log")
    with sdctest.start_server(["file", img, "logfile=" + logfile],
                              ["threshold=1000", "max-age=1h", "queue-max-size=64K"],
                              under=["log"], tmpdir=tmp) as srv:
        h = srv.connect()
        h.pwrite(b"\x41" * BLOCK, 0)
        h.flush()
        reached_plugin_durably(logfile, 0, BLOCK, "a flushed write")
        h.pwrite(b"\x42" * BLOCK, 8 * BLOCK, nbd.CMD_FLAG_FUA)
        reached_plugin_durably(logfile, 8 * BLOCK, BLOCK, "a FUA write")
        h.pwrite(b"\x43" * (128 << 10), 1 << 20, nbd.CMD_FLAG_FUA)  # over queue-max-size
        reached_plugin_durably(logfile, 1 << 20, 128 << 10, "a FUA write written through")
        # FUA zeroes and trims: straight to the plugin (everything before
        # them flushed), and buffered behind an unflushed write.
        h.zero(BLOCK, 16 * BLOCK, nbd.CMD_FLAG_FUA)
        reached_plugin_durably(logfile, 16 * BLOCK, BLOCK, "a FUA zero", "Zero")
        h.trim(BLOCK, 17 * BLOCK, nbd.CMD_FLAG_FUA)
        reached_plugin_durably(logfile, 17 * BLOCK, BLOCK, "a FUA trim", "Trim")
        h.pwrite(b"\x44" * BLOCK, 20 * BLOCK)
        h.zero(BLOCK, 18 * BLOCK, nbd.CMD_FLAG_FUA)
        reached_plugin_durably(logfile, 18 * BLOCK, BLOCK, "a buffered FUA zero", "Zero")
        reached_plugin_durably(logfile, 20 * BLOCK, BLOCK, "a write before a FUA zero")
        h.pwrite(b"\x45" * BLOCK, 21 * BLOCK)
        h.trim(BLOCK, 19 * BLOCK, nbd.CMD_FLAG_FUA)
        reached_plugin_durably(logfile, 19 * BLOCK, BLOCK, "a buffered FUA trim", "Trim")
        reached_plugin_durably(logfile, 21 * BLOCK, BLOCK, "a write before a FUA trim")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("flush, FUA write, FUA write-through, FUA zero and trim: the plugin was asked to make "
          "each durable")


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-durable-")
    img = sdctest.make_image(tmp, 4 << 20)
    # Neither threshold nor age can write anything during the test.
    with sdctest.start_server(["file", img], ["threshold=1000", "max-age=1h"], tmpdir=tmp) as srv:
        h = srv.connect()

        # 1. Flush: every acknowledged write is in the file when it returns.
        a = [bytes([0x10 + i]) * BLOCK for i in range(3)]
        for i, d in enumerate(a):
            h.pwrite(d, i * 65536 + 512)  # unaligned
        for i in range(3):
            absent(img, i * 65536 + 512, "write %d" % i)
        h.flush()
        for i, d in enumerate(a):
            sdctest.check(sdctest.disk_read(img, i * 65536 + 512, BLOCK) == d,
                          "write %d not in the file right after flush" % i)

        # 2. FUA, before any later flush: the FUA write is in the file when
        # it returns.  A plain write first shows buffering is still on.
        plain = b"\x21" * BLOCK
        h.pwrite(plain, 1 << 20)
        absent(img, 1 << 20, "the plain write")
        fua = b"\x22" * BLOCK
        h.pwrite(fua, (1 << 20) + 8 * BLOCK, nbd.CMD_FLAG_FUA)
        sdctest.check(sdctest.disk_read(img, (1 << 20) + 8 * BLOCK, BLOCK) == fua,
                      "FUA write not in the file when it returned")
        # A FUA zero too.
        h.pwrite(b"\x23" * BLOCK, 2 << 20, nbd.CMD_FLAG_FUA)
        h.zero(BLOCK, 2 << 20, nbd.CMD_FLAG_FUA)
        sdctest.check(sdctest.disk_read(img, 2 << 20, BLOCK) == bytes(BLOCK),
                      "FUA zero not in the file when it returned")

        # 3. Disconnect without a flush: written before the connection closes.
        last = b"\x24" * BLOCK
        h.pwrite(last, 3 << 20)
        absent(img, 3 << 20, "the write before disconnect")
        h.shutdown()
        sdctest.wait_disk(img, 3 << 20, last, 10, "the write in the file after disconnect")
        sdctest.check(srv.proc.poll() is None, "nbdkit exited after the client disconnected")

        # The server still serves, and reads what the file holds.
        h2 = srv.connect()
        sdctest.check(h2.pread(BLOCK, 3 << 20) == last, "reconnect reads stale data")
        h2.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")

    # 4. Disconnect over a plugin whose requests wait (the delay filter):
    # the write-back for a closing connection must not run in that
    # connection's thread, where nbdkit aborts the delay's sleep with
    # ESHUTDOWN; no plugin error may be recorded, and the data must land.
    tmp2 = sdctest.scratch_dir(prefix="sdc-durable-slow-")
    img2 = sdctest.make_image(tmp2, 4 << 20)
    ctl = tmp2 + "/ctl.sock"
    with sdctest.start_server(["file", img2, "delay-write=1ms"],
                              ["threshold=1000", "max-age=1h", "control=" + ctl],
                              under=["delay"], tmpdir=tmp2) as srv:
        blocks = {}
        for round_ in range(3):
            h = srv.connect()
            for i in range(64):
                off = ((round_ * 64 + i) * 7919 % 1024) * BLOCK
                blocks[off] = bytes([0x30 + round_]) * BLOCK
                h.pwrite(blocks[off], off)
            h.shutdown()
        # Nothing else writes (threshold and max-age cannot trigger): the
        # disconnects alone must put every block in the file.
        for off, d in blocks.items():
            sdctest.wait_disk(img2, off, d, 30, "block at %d in the file after the disconnects" % off)
        def written_back():
            stats = sdctest.control_stats(ctl)
            return int(stats["flushes_disconnect"]) >= 3 and stats["queued_requests"] == "0"
        sdctest.wait_until(written_back, 30, "flushes_disconnect >= 3 and queued_requests == 0")
        h = srv.connect()
        h.flush()
        h.shutdown()
        stats = sdctest.control_stats(ctl)
        sdctest.check(stats["flush_errors"] == "0" and stats["last_error"] == "none",
                      "plugin errors during disconnect write-back: flush_errors=%s last_error=%s"
                      % (stats["flush_errors"], stats["last_error"]))
        for off, d in blocks.items():
            sdctest.check(sdctest.disk_read(img2, off, BLOCK) == d,
                          "block at %d not in the file after disconnects and a flush" % off)
        sdctest.check("aborting sleep" not in srv.log_text(),
                      "a plugin call from a closing connection was aborted:\n" + srv.log_text())
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")


def flushed_under_the_multi_conn_filter():
    """nbdkit's multi-conn filter (multi-conn-mode=emulate) advertises
    multi-conn, but forgets a closed connection's unflushed writes: its
    later flushes reach no plugin connection.  b's write is written back
    through a's context (the oldest); a leaves; b's flush must still have
    made the plugin flush after that write."""
    tmp = sdctest.scratch_dir(prefix="sdc-durable-mconn-")
    img = sdctest.make_image(tmp, 4 << 20)
    logfile, ctl = os.path.join(tmp, "plugin.log"), os.path.join(tmp, "ctl.sock")
    with sdctest.start_server(["file", img, "multi-conn-mode=emulate", "logfile=" + logfile],
                              ["threshold=1", "max-age=1h", "control=" + ctl],
                              under=["multi-conn", "log"], tmpdir=tmp) as srv:
        a, b = srv.connect(), srv.connect()
        sdctest.check(b.can_multi_conn(), "the multi-conn filter did not advertise multi-conn")
        b.pwrite(b"\x46" * BLOCK, 0)  # written back at once (threshold=1), not flushed
        sdctest.wait_until(lambda: sdctest.control_stats(ctl)["queued_requests"] == "0", 10,
                           "the write to be written back")
        sdctest.check(not [c for c in sdctest.log_filter_calls(logfile) if c[0] == "Flush"],
                      "the plugin was flushed before a left")
        a.shutdown()  # returns once nbdkit has closed a's connection
        b.flush()
        reached_plugin_durably(logfile, 0, BLOCK, "a write through a connection that left")
        b.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("multi-conn filter (emulate): a flush after a connection left covered its writes")


def flushed_beside_another_exports_flush():
    """nbdkit's multi-conn filter groups every export's connections by
    default: one export's flush cleans the others' connections too.  b's
    plugin flush must not run while a's write-back write is in flight
    (review: it did, then a's flush succeeded with no plugin flush after
    a's write, for the plugin-call turns were per export)."""
    tmp = sdctest.scratch_dir(prefix="sdc-durable-exports-")
    exports = os.path.join(tmp, "exports")
    os.mkdir(exports)
    for name in ("a", "b"):
        with open(os.path.join(exports, name), "wb") as f:
            f.truncate(4 << 20)
    logfile = os.path.join(tmp, "plugin.log")
    with sdctest.start_server(["file", "dir=" + exports, "multi-conn-mode=emulate",
                               "logfile=" + logfile, "delay-write=1000ms"],
                              ["threshold=1", "max-age=0", "bypass-min=0"],
                              under=["multi-conn", "log", "delay"], tmpdir=tmp) as srv:
        a, b = srv.connect("a"), srv.connect("b")
        b.pwrite(b"\x47" * BLOCK, 0)  # written back at once, for 1 s
        b_flush = b.aio_flush()       # its plugin flush comes once that write ends
        sdctest.wait_until(lambda: any(kind == "Write" for kind, _, _ in
                                       sdctest.log_filter_calls(logfile)), 10,
                           "b's write to reach the plugin")
        a.pwrite(b"\x48" * BLOCK, 8 * BLOCK)  # written back while b's is
        a.flush()
        while not b.aio_command_completed(b_flush):
            b.poll(-1)
        reached_plugin_durably(logfile, 8 * BLOCK, BLOCK, "a's write beside b's flush")
        for h in (a, b):
            h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("multi-conn filter (emulate), two exports: one's flush waited for the other's write")


if __name__ == "__main__":
    main()
    plugin_asked_for_durability()
    flushed_under_the_multi_conn_filter()
    flushed_beside_another_exports_flush()
