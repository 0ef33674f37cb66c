# Control socket: flush, pause/resume, threshold, refusals, socket mode.
import os
import stat

import sdctest

BLOCK = 4096
# Each refused line, and what its error must say.
BAD = {
    "bogus": "unknown command", "thresholdx": "unknown command", "": "empty command",
    " \t ": "empty command", "threshold " + "9" * 300: "line too long",
    "flush now": "unknown command", "FLUSH": "unknown command",
    "threshold": "usage: threshold N", "threshold abc": "not a number",
    "threshold -1": "not a number", "threshold 3x": "not a number",
    "threshold 0": "between 1 and", "threshold 0000": "between 1 and",
    "threshold 99999999": "between 1 and", "threshold 1048577": "between 1 and",
    "threshold 000000000000000000000001048577": "between 1 and",
}


def stats(ctl):
    return sdctest.control_stats(ctl)


def ok(ctl, line):
    lines, status = sdctest.control_command(ctl, line)
    sdctest.check(status == "ok", "control %r answered %r" % (line, status))
    return lines


def absent(img, off, n, what):
    sdctest.check(sdctest.disk_read(img, off, n) == bytes(n), "%s reached the file" % what)


def main():
    tmp = sdctest.scratch_dir(prefix="sdc-control-")
    img = sdctest.make_image(tmp, 4 << 20)
    ctl = os.path.join(tmp, "ctl.sock")
    with sdctest.start_server(["file", img], ["threshold=1000", "max-age=1h", "control=" + ctl],
                        tmpdir=tmp) as srv:
        st = os.stat(ctl)
        sdctest.check(stat.S_ISSOCK(st.st_mode), "control path is not a socket")
        sdctest.check(stat.S_IMODE(st.st_mode) == 0o600,
                      "control socket mode %o, want 600" % stat.S_IMODE(st.st_mode))

        h = srv.connect()
        # flush answers only once the data is in the file.
        data = os.urandom(3 * BLOCK + 5)
        h.pwrite(data, 4097)
        absent(img, 4097, len(data), "the write before control flush")
        ok(ctl, "flush")
        sdctest.check(sdctest.disk_read(img, 4097, len(data)) == data,
                      "control flush answered ok before the data was in the file")

        # Refusals: an error line, nothing changed.
        before = stats(ctl)
        for line, want in BAD.items():
            _, status = sdctest.control_command(ctl, line)
            sdctest.check(status.startswith("error ") and want in status,
                          "control %r answered %r, want an error saying %r" % (line, status, want))
            after = stats(ctl)
            for k in ("threshold", "paused", "flushes_control", "batches_flushed"):
                sdctest.check(after[k] == before[k], "control %r changed %s: %s -> %s" %
                              (line, k, before[k], after[k]))
        sdctest.check(before["threshold"] == "1000", "threshold %r" % before["threshold"])
        lines = ok(ctl, "help")
        sdctest.check(any("threshold" in l for l in lines), "help: %r" % lines)

        # threshold N changes the trigger at run time (leading zeros are
        # just zeros).
        ok(ctl, "threshold 000000000000000000005")
        sdctest.check(stats(ctl)["threshold"] == "5", "threshold 0...05 not applied")
        ok(ctl, "\tthreshold\t 4 \t")
        sdctest.check(stats(ctl)["threshold"] == "4", "threshold<TAB>4 not applied")
        ok(ctl, "threshold 3")
        sdctest.check(stats(ctl)["threshold"] == "3", "threshold 3 not applied")
        blocks = [((1 << 20) + i * 65536, bytes([0x40 + i]) * BLOCK) for i in range(3)]
        for off, d in blocks[:2]:
            h.pwrite(d, off)
        sdctest.check(stats(ctl)["queued_requests"] == "2", "2 writes not queued")
        h.pwrite(blocks[2][1], blocks[2][0])
        for off, d in blocks:
            sdctest.wait_disk(img, off, d, 10, "write at %d after threshold 3" % off)

        # pause holds batches back past the threshold; resume releases them.
        ok(ctl, "threshold 2")
        ok(ctl, "pause")
        sdctest.check(stats(ctl)["paused"] == "1", "pause not shown in stats")
        held = [((2 << 20) + i * 65536, bytes([0x60 + i]) * BLOCK) for i in range(5)]
        for off, d in held:
            h.pwrite(d, off)
        # About time: paused data stays buffered, for a second at least.
        sdctest.assert_stays(
            lambda: all(sdctest.disk_read(img, off, BLOCK) == bytes(BLOCK) for off, _ in held),
            1.0, "a write reached the file while paused")
        sdctest.check(stats(ctl)["queued_requests"] == "5", "queued while paused")
        ok(ctl, "resume")
        for off, d in held:
            sdctest.wait_disk(img, off, d, 10, "write at %d after resume" % off)
        sdctest.check(stats(ctl)["paused"] == "0", "resume not shown in stats")

        # A last command without a newline, at the end of the client's input.
        for line, paused in (("pause", "1"), ("resume", "0")):
            _, status = sdctest.control_command(ctl, line, newline=False)
            sdctest.check(status == "ok", "control %r without a newline answered %r" %
                          (line, status))
            sdctest.check(stats(ctl)["paused"] == paused,
                          "control %r without a newline not applied" % line)

        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
        sdctest.check(not os.path.exists(ctl), "control socket left behind after exit")


def documented_socat(tmp):
    """The documented command, `echo flush | socat -t 600 - UNIX-CONNECT:...`,
    prints the answer of a flush that takes longer than socat's default
    0.5 s wait after the end of its input (without -t it printed nothing)."""
    img = sdctest.make_image(tmp, 1 << 20)
    ctl = os.path.join(tmp, "slow.sock")
    with sdctest.start_server(["file", img], ["delay-write=1", "threshold=1000", "max-age=1h",
                                              "control=" + ctl], under=["delay"],
                              tmpdir=sdctest.scratch_dir(dir=tmp)) as srv:
        h = srv.connect()
        h.pwrite(b"\x77" * BLOCK, 0)
        p = sdctest.run_command(["socat", "-t", "600", "-", "UNIX-CONNECT:" + ctl],
                                input=b"flush\n", timeout=30)
        sdctest.check(p.stdout == b"ok\n", "socat -t 600 printed %r" % p.stdout)
        sdctest.check(sdctest.disk_read(img, 0, BLOCK) == b"\x77" * BLOCK,
                      "the control flush answered before the data was in the file")
        h.shutdown()
        sdctest.check(srv.stop() == 0, "nbdkit exited non-zero")
    print("echo flush | socat -t 600 ...: %r after a 1 s plugin write" % p.stdout)


if __name__ == "__main__":
    main()
    documented_socat(sdctest.scratch_dir(prefix="sdc-control-"))
