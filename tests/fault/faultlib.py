# Helpers shared by the fault suite: scratch dirs, control-socket stats,
# error-filter arguments, a file-backed eval plugin, a fault-tolerant workload.
import errno
import os
import random

import nbd

from sdctest import check, check_read, control_stats, fail, scratch_dir, wait_until


def tmpdir():
    """A scratch directory (sdctest removes it when the test ends, pass or
    fail, after printing the tail of nbdkit's log on a failure)."""
    return scratch_dir(prefix="sdcfault-")


def stats(path):
    """The control socket's counters as a dict of strings."""
    return control_stats(path)


def counter(path, key):
    return int(stats(path)[key])


def wait_counter(path, key, at_least, timeout=20):
    wait_until(lambda: counter(path, key) >= at_least, timeout,
               "counter %s >= %d" % (key, at_least), interval=0.02)


def error_args(kinds, rate, trigger_file=None, err="EIO"):
    """nbdkit-error-filter parameters failing `kinds` (pwrite, zero, trim)."""
    args = []
    for k in kinds:
        args.append("error-%s=%s" % (k, err))
        args.append("error-%s-rate=%s" % (k, rate))
        if trigger_file:
            args.append("error-%s-file=%s" % (k, trigger_file))
    return args


def eval_file_plugin(image, thread_model=None, lock_dir=None, marker=None,
                     call_log=None, flush_error_file=None, hold="0", cache=False):
    """Arguments for `nbdkit eval` serving `image` with dd.

    With lock_dir, every data call takes a mkdir lock for its duration
    (`hold` seconds of extra work inside it, to widen any overlap); a call
    that finds the lock taken writes `marker`.  With call_log, each call
    appends "METHOD COUNT OFFSET" to it.  With flush_error_file, flush fails
    with ENOSPC while that file exists.  With cache, it has a native cache
    method (which does nothing)."""
    def guarded(body, name):
        if not lock_dir:
            return body
        enter = ('if ! mkdir %s 2>/dev/null; then echo "overlap in %s $$" >> %s; '
                 'mine=0; else mine=1; fi; ' % (lock_dir, name, marker))
        log = ('echo "%s $3 $4" >> %s; ' % (name, call_log)) if call_log else ""
        leave = ('sleep %s; [ $mine = 1 ] && rmdir %s; ' % (hold, lock_dir))
        return enter + log + body + "; rc=$?; " + leave + "exit $rc"

    pread = "dd if=%s skip=$4 count=$3 iflag=count_bytes,skip_bytes status=none" % image
    pwrite = "dd of=%s seek=$4 conv=notrunc oflag=seek_bytes status=none" % image
    flush = "true"
    if flush_error_file:
        flush = ('if [ -e %s ]; then echo "ENOSPC injected flush failure" >&2; false; fi'
                 % flush_error_file)
    args = ["eval",
            "get_size=stat -Lc %%s %s" % image,
            "pread=" + guarded(pread, "pread"),
            "pwrite=" + guarded(pwrite, "pwrite"),
            "flush=" + guarded(flush, "flush")]
    if cache:
        args += ["can_cache=echo native", "cache=" + guarded("true", "cache")]
    if thread_model:
        args.append("thread_model=echo %s" % thread_model)
    return args


class FaultyOps:
    """Random model-checked I/O where only flush and FUA requests may fail.

    A failed FUA request leaves its range holding either the old or the new
    content (NBD leaves it unspecified); the range is read back, must be one
    of the two, and the model takes what was read.  With `disk` (the
    plugin's image file, which no other connection writes to), the file must
    hold the model after each flush that succeeded."""

    def __init__(self, h, model, size, seed, hot=256 * 1024, disk=None):
        self.h, self.model, self.size, self.disk = h, model, size, disk
        self.rng = random.Random(seed)
        self.hot = min(hot, size)
        self.seed = seed
        self.flush_failures = 0
        self.flush_ok = 0
        self.fua_failures = 0

    def _settle_failed_fua(self, off, n, old, new, i):
        got = self.h.pread(n, off)
        check(got == new or got == old,
              "seed %d op %d: failed FUA left [%d,+%d) neither old nor new" %
              (self.seed, i, off, n))
        self.model.write(off, got)

    def _write(self, i, off, n, fua):
        """A write, zero or trim; only a FUA one may fail."""
        rng, h = self.rng, self.h
        flags = nbd.CMD_FLAG_FUA if fua else 0
        kind = rng.choice(["pwrite"] * 5 + ["zero", "trim"])
        new = rng.randbytes(n) if kind == "pwrite" else bytes(n)
        old = self.model.read(off, n)
        try:
            if kind == "pwrite":
                h.pwrite(new, off, flags)
            else:
                getattr(h, kind)(n, off, flags)
        except nbd.Error as e:
            if not fua:
                fail("seed %d op %d: %s [%d,+%d) without FUA failed: %s" %
                     (self.seed, i, kind, off, n, e))
            check(e.errnum == errno.EIO, "FUA %s failed with %s, want EIO" % (kind, e))
            self.fua_failures += 1
            self._settle_failed_fua(off, n, old, new, i)
            return
        self.model.write(off, new)

    def run(self, count):
        rng, h, model = self.rng, self.h, self.model
        for i in range(count):
            span = self.hot if rng.random() < 0.7 else self.size
            off = rng.randrange(0, span)
            n = min(rng.randint(1, 70000), self.size - off)
            op = rng.random()
            if op < 0.50:
                self._write(i, off, n, fua=rng.random() < 0.08)
            elif op < 0.92:
                check_read(h, model, off, n, "seed %d op %d" % (self.seed, i))
            else:
                try:
                    h.flush()
                    self.flush_ok += 1
                    if self.disk:
                        check_same(read_file(self.disk), model.read(0, self.size),
                                   "seed %d op %d: disk after a flush that succeeded" %
                                   (self.seed, i))
                except nbd.Error as e:
                    check(e.errnum == errno.EIO, "flush failed with %s, want EIO" % e)
                    self.flush_failures += 1


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def first_diff(a, b):
    if a == b:
        return -1
    for i in range(min(len(a), len(b))):
        if a[i] != b[i]:
            return i
    return min(len(a), len(b)) if len(a) != len(b) else -1


def check_same(got, want, what):
    d = first_diff(got, want)
    check(d == -1, "%s differs from the model at byte %d (len %d vs %d)" %
          (what, d, len(got), len(want)))


def touch(path):
    with open(path, "w"):
        pass


def remove(path):
    if os.path.exists(path):
        os.unlink(path)
