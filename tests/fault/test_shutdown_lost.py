# Shutdown with a plugin that never recovers: the last disconnect retries for
# shutdown-timeout, then nbdkit's cleanup logs exactly what was lost.
#
# The last connection of an export writes everything buffered on disconnect
# and keeps retrying a failing plugin for shutdown-timeout before the
# connection closes; libnbd's shutdown() waits for that close.  Once that
# connection has gone nothing can write any more, so SIGTERM exits at once.
# nbdkit 1.32 does not drop a connected client on SIGTERM: in the second
# variant the signal comes first, and the retry window must still apply when
# the client then leaves during shutdown.
import errno
import os
import random
import re
import signal
import time

import nbd

import faultlib
import sdctest
from sdctest import Server, check, expect_errno, wait_until
from faultlib import error_args, read_file

SIZE = 4 << 20
TIMEOUT_S = 2
SLACK_S = 6  # scheduling slack on a loaded 2-core machine


def start(tmp, img, extra=()):
    # nbdkit's multi-conn filter below: when a .finalize fails, nbdkit 1.32
    # skips the .finalize of the layers below it, and this filter then
    # aborts nbdkit at exit (its connection group was never left).
    return Server(["file", img] + error_args(["pwrite"], "100%"),
                  ["threshold=3", "shutdown-timeout=%ds" % TIMEOUT_S,
                   "sdccache-statsfile=" + os.path.join(tmp, "stats")] + list(extra),
                  under=["multi-conn", "error"], tmpdir=tmp)


def write_disjoint(h, rng, count):
    """`count` writes in separate 100000-byte slots, never adjacent, so the
    filter can neither merge them nor report them as fewer ranges."""
    ranges = []
    for i in range(count):
        n = rng.randint(1, 90000)
        off = i * 100000 + rng.randrange(0, 100000 - n)
        h.pwrite(rng.randbytes(n), off)
        ranges.append((off, n))
    return ranges


def expected_listing(ranges):
    """The filter's summary: the first 8 ranges, then '... (N ranges)'."""
    shown = " ".join("[%d,+%d)" % r for r in ranges[:8])
    if len(ranges) > 8:
        shown += " ... (%d ranges)" % len(ranges)
    return shown


def timed_shutdown(h):
    start = time.monotonic()
    h.shutdown()
    return time.monotonic() - start


def wait_exit(srv, what):
    wait_until(lambda: srv.proc.poll() is not None, TIMEOUT_S + SLACK_S + 10, what,
               interval=0.02)


def check_lost(srv, img, tmp, ranges):
    log = srv.log_text()
    check(srv.proc.returncode >= 0 and "Assertion" not in log,
          "nbdkit died (status %d):\n%s" % (srv.proc.returncode, log[-3000:]))
    m = re.search(r"sdccache: export '': (\d+) requests, (\d+) bytes could not be written "
                  r"to the plugin \(([^)]*)\) and are lost: (.*)", log)
    check(m is not None, "no 'could not be written' line in the log:\n" + log[-3000:])
    written = sum(n for _, n in ranges)
    check(int(m.group(1)) == len(ranges),
          "log names %s requests lost, the client made %d" % (m.group(1), len(ranges)))
    check(int(m.group(2)) == written,
          "log names %s bytes lost, the client wrote %d unflushed bytes" % (m.group(2), written))
    check(m.group(3) == os.strerror(errno.EIO),
          "lost data blamed on %r, the plugin failed with EIO" % m.group(3))
    check(m.group(4).strip() == expected_listing(ranges),
          "lost ranges %r, the client wrote %r" % (m.group(4), expected_listing(ranges)))
    check(log.count("could not be written") == 1, "lost data reported more than once")
    check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")
    st = sdctest.read_stats_file(os.path.join(tmp, "stats"))
    check(st is not None and int(st["flush_errors"]) >= 2,
          "the disconnect did not retry the plugin: final stats %r" % st)
    # What the man page tells scripts to look at: the status does not show
    # the loss, the last stats file does.
    check(int(st["queued_requests"]) == len(ranges),
          "the last stats file shows %s requests still buffered, %d were lost" %
          (st["queued_requests"], len(ranges)))
    check(srv.proc.returncode == 0, "nbdkit exit status %d" % srv.proc.returncode)
    print("  lost %d bytes in %d requests, as logged; %s plugin errors" %
          (written, len(ranges), st["flush_errors"]))


def disconnect_then_sigterm(rng):
    """The client leaves first; its disconnect carries the retry window."""
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    with start(tmp, img) as srv:
        h = srv.connect()
        ranges = write_disjoint(h, rng, 9)
        expect_errno(h.flush, errno.EIO, "flush with a failing plugin")
        took = timed_shutdown(h)
        del h
        print("disconnect took %.2fs (shutdown-timeout=%ds)" % (took, TIMEOUT_S))
        check(took >= TIMEOUT_S * 0.9,
              "the last disconnect gave up after %.2fs, before shutdown-timeout=%ds" %
              (took, TIMEOUT_S))
        check(took <= TIMEOUT_S + SLACK_S, "the last disconnect took %.2fs" % took)
        check(srv.proc.poll() is None, "nbdkit exited without a signal")
        check("could not be written" not in srv.log_text(),
              "loss reported before nbdkit's cleanup")
        check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")

        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        wait_exit(srv, "nbdkit to exit after SIGTERM")
        took = time.monotonic() - t0
        srv.stop()
        print("nbdkit exited %.2fs after SIGTERM, status %d" % (took, srv.proc.returncode))
        # With no connection left nothing can be written: no second window.
        check(took < TIMEOUT_S * 0.75,
              "nbdkit took %.2fs to exit after the last client had gone" % took)
        check_lost(srv, img, tmp, ranges)


def sigterm_then_disconnect(rng):
    """SIGTERM arrives while the client is connected; nbdkit waits for the
    client, whose disconnect during shutdown still retries for the window."""
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    with start(tmp, img) as srv:
        h = srv.connect()
        ranges = write_disjoint(h, rng, 5)
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        took = timed_shutdown(h)
        del h
        wait_exit(srv, "nbdkit to exit after SIGTERM and disconnect")
        total = time.monotonic() - t0
        srv.stop()
        print("disconnect took %.2fs, nbdkit exited %.2fs after it began, status %d" %
              (took, total, srv.proc.returncode))
        check(total >= TIMEOUT_S * 0.9,
              "nbdkit exited %.2fs after the disconnect began, before shutdown-timeout=%ds" %
              (total, TIMEOUT_S))
        check(total <= TIMEOUT_S + SLACK_S, "nbdkit took %.2fs to exit" % total)
        check_lost(srv, img, tmp, ranges)


def sigterm_with_writers_waiting():
    """SIGTERM while writers wait for room in a full queue that the failing
    plugin never empties: those writers give up (their requests fail,
    never acknowledged), nbdkit closes the connection, and exits after the
    retry window, reporting what it acknowledged as lost.  The writers
    waited for ever, and so did nbdkit."""
    tmp = faultlib.tmpdir()
    img = sdctest.make_image(tmp, SIZE)
    with start(tmp, img, ["queue-max-size=64K"]) as srv:
        h = srv.connect()
        cookies = []
        for i in range(40):  # 160 KiB: about 15 fit in 64K, the rest wait for room
            cookies.append(h.aio_pwrite(bytes([1 + i]) * 4096, i * 100000))
        stats = os.path.join(tmp, "stats")
        wait_until(lambda: int((sdctest.read_stats_file(stats) or {}).get(
            "backpressure_waits", 0)) > 0, 10, "writers to wait for room")
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        # nbdkit 1.32 drops the connection once its requests have ended.
        ended = None
        try:
            while h.aio_in_flight() > 0 and time.monotonic() < t0 + 10:
                h.poll(100)
            if h.aio_in_flight() == 0:
                ended = "all answered"
        except nbd.Error as e:
            ended = "connection closed (%s)" % e
        took = time.monotonic() - t0
        check(ended is not None, "%d writes still waiting %.1fs after SIGTERM" %
              (h.aio_in_flight(), took))
        acked = 0
        for cookie in cookies:
            try:
                acked += bool(h.aio_command_completed(cookie))
            except nbd.Error:  # gave up (ESHUTDOWN), or its answer was cut off
                pass
        print("SIGTERM with writers waiting for room: %s after %.2fs; %d acknowledged" %
              (ended, took, acked))
        del h
        wait_exit(srv, "nbdkit to exit after SIGTERM")
        total = time.monotonic() - t0
        srv.stop()
        log = srv.log_text()
        check(srv.proc.returncode == 0 and "Assertion" not in log,
              "nbdkit exit status %d:\n%s" % (srv.proc.returncode, log[-3000:]))
        check(total <= TIMEOUT_S + SLACK_S, "nbdkit took %.2fs to exit" % total)
        m = re.search(r"export '': (\d+) requests, (\d+) bytes could not be written", log)
        check(m is not None, "no 'could not be written' line in the log:\n" + log[-3000:])
        # Each write is at its own offset: the filter lists each it
        # acknowledged (one whose answer was cut off too), and none that gave up.
        lost = int(m.group(1))
        check(acked <= lost < len(cookies) and int(m.group(2)) == lost * 4096,
              "%d acknowledged, %s requests of %s bytes lost" % (acked, m.group(1), m.group(2)))
        check(read_file(img) == bytes(SIZE), "a write reached the failing plugin")
        print("  nbdkit exited %.2fs after SIGTERM; %d requests reported lost" % (total, lost))


def main():
    rng = random.Random(int(os.environ.get("SEED", "31")))
    disconnect_then_sigterm(rng)
    sigterm_then_disconnect(rng)
    sigterm_with_writers_waiting()


if __name__ == "__main__":
    main()
