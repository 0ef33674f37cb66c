# The export's cache cannot be created (the filter cannot start its threads:
# EAGAIN, as under a pids limit).  The connection that asked fails with an
# error naming the problem; nbdkit keeps running, the next connection works,
# and nbdkit exits cleanly.  The failure is injected at the first and the
# second thread the filter starts (the flusher, the plugin-flush thread), so
# that a thread already started must be stopped.
#
# The same when an export whose last writer left (its threads stopped)
# gets its next writer: that connection fails, the export's data stays,
# no thread is left behind, and the connection after it works.
#
# Write-back helpers start later, when a latency-bound plugin's batch wants
# them: if none can be started, the batch is written by the thread that runs
# it, and nothing is lost or refused; helpers start once threads can be had.
import os
import signal
import subprocess
import sys

import nbd

import faultlib
import sdctest
from sdctest import check

KiB = 1 << 10


def run(shim, fail_at):
    tmp = faultlib.tmpdir()
    flag = os.path.join(tmp, "fail-threads")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_FAIL_FLAG=flag,
               SDCCACHE_FAIL_AT=str(fail_at))
    with sdctest.start_server(["memory", "1M"], ["threshold=1000", "writeback-threads=4"],
                              tmpdir=tmp, env=env) as srv:
        open(flag, "w").close()
        try:
            srv.connect()
            sdctest.fail("fail_at=%d: the connection succeeded; the shim injected nothing"
                         % fail_at)
        except nbd.Error as e:
            print("fail_at=%d: connection refused as expected: %s" % (fail_at, e))
        log = srv.log_text()
        check("sdccache: prepare: Resource temporarily unavailable" in log,
              "fail_at=%d: no error naming the failure in nbdkit's log:\n%s" % (fail_at, log))
        os.unlink(flag)
        data = bytes([fail_at]) * (4 * KiB)
        try:
            h = srv.connect()
            h.pwrite(data, 8 * KiB)
            h.flush()
            got = h.pread(len(data), 8 * KiB)
            h.shutdown()
        except nbd.Error as e:
            sdctest.fail("fail_at=%d: the next connection failed (%s); nbdkit %s:\n%s" %
                         (fail_at, e, "is running" if srv.proc.poll() is None
                          else "exited with status %d" % srv.proc.returncode, srv.log_text()))
        check(got == data, "fail_at=%d: read back %r" % (fail_at, got[:4]))
        rc = srv.stop(signal.SIGTERM, timeout=30)
        check(rc == 0, "fail_at=%d: nbdkit exited %d:\n%s" % (fail_at, rc, srv.log_text()))


def restart_fails(shim, fail_at):
    tmp = faultlib.tmpdir()
    flag = os.path.join(tmp, "fail-threads")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_FAIL_FLAG=flag,
               SDCCACHE_FAIL_AT=str(fail_at))
    ctl = os.path.join(tmp, "ctl.sock")
    # threshold=1: the next writer's lone write is written back by the
    # flusher alone, so that it fails if Unpark left the export without one.
    with sdctest.start_server(["memory", "1M"], ["threshold=1", "max-age=1h", "control=" + ctl],
                              tmpdir=tmp, env=env, extra=["-v"]) as srv:
        pid = srv.proc.pid
        base = sdctest.threads_of(pid)
        first = bytes([0x40 + fail_at]) * (4 * KiB)
        h = srv.connect()
        h.pwrite(first, 0)  # buffered; written when the connection leaves
        h.shutdown()
        del h
        sdctest.wait_until(lambda: "threads stopped" in srv.log_text(), 20,
                           "fail_at=%d: the export's threads to stop" % fail_at)
        open(flag, "w").close()
        try:
            srv.connect()
            sdctest.fail("fail_at=%d: the connection after the export went idle succeeded; "
                         "the shim injected nothing" % fail_at)
        except nbd.Error as e:
            print("fail_at=%d, idle export: connection refused as expected: %s" % (fail_at, e))
        check("sdccache: prepare: Resource temporarily unavailable" in srv.log_text(),
              "fail_at=%d: no error naming the failure in nbdkit's log" % fail_at)
        os.unlink(flag)
        sdctest.wait_until(lambda: sdctest.threads_of(pid) <= base, 20,
                           "fail_at=%d: nbdkit back to %d threads after the refused connection"
                           % (fail_at, base))
        second = bytes([0x50 + fail_at]) * (4 * KiB)
        try:
            h = srv.connect()
            got_first = h.pread(len(first), 0)
            h.pwrite(second, 8 * KiB)
            sdctest.wait_until(lambda: sdctest.control_stats(ctl)["queued_requests"] == "0",
                               20, "fail_at=%d: the flusher to write the next writer's data"
                               % fail_at)
            got_second = h.pread(len(second), 8 * KiB)
            h.shutdown()  # no flush: the disconnect's own must not hang either
        except nbd.Error as e:
            sdctest.fail("fail_at=%d: the connection after the refused one failed (%s):\n%s"
                         % (fail_at, e, srv.log_text()[-3000:]))
        check(got_first == first, "fail_at=%d: the first writer's data read back %r"
              % (fail_at, got_first[:4]))
        check(got_second == second, "fail_at=%d: read back %r" % (fail_at, got_second[:4]))
        rc = srv.stop(signal.SIGTERM, timeout=30)
        check(rc == 0, "fail_at=%d: nbdkit exited %d" % (fail_at, rc))


def helpers_cannot_start(shim):
    tmp = faultlib.tmpdir()
    flag = os.path.join(tmp, "fail-threads")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_FAIL_FLAG=flag, SDCCACHE_FAIL_AT="3+")
    # The delay filter makes the plugin latency-bound, so batches want helpers.
    ctl = os.path.join(tmp, "ctl.sock")
    with sdctest.start_server(["memory", "4M", "delay-write=2ms"],
                              ["threshold=1000", "writeback-threads=8", "control=" + ctl],
                              tmpdir=tmp, env=env, under=["delay"],
                              extra=["-t", "1"]) as srv:  # no nbdkit worker threads
        open(flag, "w").close()
        h = srv.connect()  # threads 1 and 2: the flusher and the plugin flusher
        model = bytearray(4 * 1024 * KiB)

        def batch(tag):
            for i in range(16):  # 16 separate ranges: 16 plugin requests
                off = (2 * i + 1) * 64 * KiB
                data = bytes([tag + i]) * (4 * KiB)
                h.pwrite(data, off)
                model[off:off + len(data)] = data
            h.flush()
            st = sdctest.control_stats(ctl)
            return int(st["writeback_helpers"]), int(st["plugin_latency_bound"])
        helpers, bound = batch(1)
        check(bound == 1, "the delayed plugin was not found latency-bound: %r" % bound)
        check(helpers == 0, "%d helpers started while every pthread_create failed" % helpers)
        log = srv.log_text()
        check("error" not in log.lower(), "failing to start helpers logged an error:\n%s" % log)
        os.unlink(flag)
        helpers, _ = batch(40)
        check(helpers == 7, "helpers started once threads could be had: %d, want 7" % helpers)
        got = h.pread(len(model), 0)
        check(got == bytes(model), "read back differs from what was written")
        h.shutdown()
        rc = srv.stop(signal.SIGTERM, timeout=30)
        check(rc == 0, "nbdkit exited %d:\n%s" % (rc, srv.log_text()))
    print("helpers: none started while pthread_create failed, batch written; 7 after")


def after_fork_fails(shim, fail_at):
    """The control socket's (1) or the stats file's (2) thread cannot start,
    in .after_fork: nbdkit exits with an error naming the failure, and
    leaves no control socket behind (it exits without .cleanup, and the
    socket stayed, bound, when the stats file's thread or the control
    socket's own could not start)."""
    tmp = faultlib.tmpdir()
    flag = os.path.join(tmp, "fail-threads")
    open(flag, "w").close()
    ctl = os.path.join(tmp, "ctl.sock")
    env = dict(os.environ, LD_PRELOAD=shim, SDCCACHE_FAIL_FLAG=flag,
               SDCCACHE_FAIL_AT=str(fail_at), SDCCACHE_FAIL_MAIN="1")
    cmd = [sdctest.NBDKIT, "-f", "-U", os.path.join(tmp, "nbd.sock"),
           "--filter=" + sdctest.FILTER, "memory", "1M", "control=" + ctl,
           "sdccache-statsfile=" + os.path.join(tmp, "stats")]
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=30)
    out = r.stdout.decode(errors="replace")
    check(r.returncode != 0, "fail_at=%d: nbdkit started; the shim injected nothing:\n%s"
          % (fail_at, out))
    check("after_fork: Resource temporarily unavailable" in out,
          "fail_at=%d: no error naming the failure:\n%s" % (fail_at, out))
    check(not os.path.exists(ctl), "fail_at=%d: the control socket was left behind" % fail_at)
    print("after_fork fail_at=%d: nbdkit exited %d, no socket left" % (fail_at, r.returncode))


def main():
    shim = sys.argv[1]
    for fail_at in (1, 2):
        run(shim, fail_at)
        restart_fails(shim, fail_at)
    helpers_cannot_start(shim)
    # Under ASan (the sanitizer run sets SDCCACHE_ASAN_RT), an nbdkit that
    # has logged an errno message deadlocks at exit in libp11-kit's
    # destructor (tests/sanitizer/nbdkit).
    if not os.environ.get("SDCCACHE_ASAN_RT"):
        for fail_at in (1, 2):
            after_fork_fails(shim, fail_at)


if __name__ == "__main__":
    main()
