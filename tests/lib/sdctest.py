"""Shared helpers for sdccache's integration tests (libnbd's Python binding).

Every server is started by PID, on a private Unix socket in a temporary
directory, and stopped by that PID: SIGTERM, then SIGKILL if it has not
exited within its bound.  Tests wait for conditions (socket present, process
exited, file content changed) with explicit deadlines, never bare sleeps.
"""
import atexit
import errno
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import nbd  # python3-libnbd

FILTER = os.environ.get("SDCCACHE_FILTER", "sdccache")
NBDKIT = os.environ.get("NBDKIT", "nbdkit")


# Every process a test starts (track) and every scratch directory it makes
# (scratch_dir) is registered here.  However the test ends (it passes, fail()
# exits, an exception escapes, or meson's timeout sends SIGTERM), the
# processes still running are killed by PID and the directories removed; on
# a failure the tail of each log a test registered goes to stderr first (set
# SDCTEST_KEEP=1 to keep the directories instead).
_procs = []    # subprocess.Popen
_logs = []     # paths
_scratch = []  # directories
_mounts = []   # FUSE mount points: lazily unmounted before the removal
_daemons = []  # PIDs of nbdkit daemons (started without -f), from their pidfiles
_failed = False


def track(proc, log=None):
    """Registers a started process (and its log) for the cleanup at exit."""
    _procs.append(proc)
    if log:
        _logs.append(log)
    return proc


def pidfile_written(path):
    """Whether nbdkit has written its PID to `path` (-P): it accepts
    connections from then on."""
    return os.path.exists(path) and os.path.getsize(path) > 0


def threads_of(pid):
    """How many threads process `pid` has (/proc/PID/task)."""
    return len(os.listdir("/proc/%d/task" % pid))


def threads_named(pid, name):
    """How many threads of process `pid` are called `name` (their comm)."""
    n = 0
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
                n += f.read().strip() == name
        except OSError:  # the thread ended meanwhile
            pass
    return n


def daemon_from_pidfile(pidfile, timeout=10):
    """The PID a backgrounded nbdkit wrote to `pidfile` (waited for),
    registered so that the cleanup at exit kills it if the test has not
    stopped it (stop_daemon)."""
    wait_until(lambda: pidfile_written(pidfile), timeout,
               "the daemon's pidfile %s" % pidfile)
    with open(pidfile) as f:
        pid = int(f.read().strip())
    _daemons.append(pid)
    return pid


def _is_nbdkit(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"nbdkit" in f.read().split(b"\0")[0]
    except OSError:
        return False


def stop_daemon(pid, timeout=10, sig=signal.SIGTERM):
    """Signals a daemon from daemon_from_pidfile and waits until it has gone."""
    if not _is_nbdkit(pid):  # gone already (its PID not yet reused by another program)
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    wait_until(lambda: not os.path.exists("/proc/%d" % pid), timeout,
               "the daemon (pid %d) to exit" % pid)


def track_mount(path):
    _mounts.append(path)


def scratch_dir(prefix="sdctest-", dir=None):
    """A temporary directory, removed when the test ends, pass or fail."""
    d = tempfile.mkdtemp(prefix=prefix, dir=dir)
    _scratch.append(d)
    return d


def fusermount():
    """The FUSE unmount tool this system has."""
    return "fusermount3" if shutil.which("fusermount3") else "fusermount"


def mounted(path):
    """Whether `path` is a mount point, from /proc/self/mountinfo:
    os.path.ismount() says False for a FUSE mount whose daemon has died
    (lstat fails with ENOTCONN), which still needs unmounting."""
    want = os.path.abspath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)),
                               line.split()[4])
                if point == want:
                    return True
    except OSError:
        return os.path.ismount(path)
    return False


def _cleanup():
    for p in _procs:
        try:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        except Exception as e:  # keep cleaning up
            print("cleanup: pid %d: %s" % (p.pid, e), file=sys.stderr)
    for pid in _daemons:
        try:
            stop_daemon(pid, sig=signal.SIGKILL)
        except BaseException as e:  # keep cleaning up (wait_until fails by exiting)
            print("cleanup: daemon pid %d: %s" % (pid, e), file=sys.stderr)
    if _failed:
        for log in _logs:
            try:
                with open(log, "rb") as f:
                    lines = f.read().decode(errors="replace").splitlines()
            except OSError:
                continue
            print("---- last %d lines of %s ----" % (min(len(lines), 60), log), file=sys.stderr)
            print("\n".join(lines[-60:]), file=sys.stderr)
    for m in _mounts:
        if mounted(m):
            subprocess.run([fusermount(), "-u", "-z", m], timeout=10,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if os.environ.get("SDCTEST_KEEP"):
        if _scratch:
            print("kept: " + " ".join(_scratch), file=sys.stderr)
        return
    for d in reversed(_scratch):
        shutil.rmtree(d, ignore_errors=True)


def _on_exception(kind, value, tb):
    global _failed
    _failed = True
    _excepthook(kind, value, tb)


def _on_sigterm(signum, frame):
    global _failed
    _failed = True
    print("FAIL: terminated (signal %d), cleaning up" % signum, file=sys.stderr)
    sys.exit(128 + signum)


_excepthook = sys.excepthook
sys.excepthook = _on_exception
atexit.register(_cleanup)
signal.signal(signal.SIGTERM, _on_sigterm)


def fail(msg):
    global _failed
    _failed = True
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def expect_errno(fn, want, what):
    """Calls fn(); it must fail with nbd.Error whose errno is `want`."""
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum == want, "%s failed with %s, want %s" %
              (what, e, errno.errorcode[want]))
        return e
    fail("%s succeeded; it must fail with %s" % (what, errno.errorcode[want]))


def wait_until(pred, timeout, what, interval=0.01):
    """Polls pred() until true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return
        if time.monotonic() > deadline:
            fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def assert_stays(pred, seconds, what, interval=0.02):
    """A negative check: pred() must keep holding for `seconds` (something
    must not happen within that window).  Polled, so that it fails as soon
    as it stops holding; there is no event to wait for instead."""
    deadline = time.monotonic() + seconds
    while True:
        if not pred():
            fail("%s (checked for %.1fs)" % (what, seconds))
        if time.monotonic() > deadline:
            return
        time.sleep(interval)


class Server:
    """nbdkit [filters] --filter=sdccache PLUGIN ARGS on a Unix socket."""

    def __init__(self, plugin_args, filter_args=(), under=(), over=(), extra=(),
                 tmpdir=None, start_timeout=10, env=None):
        self.tmp = tmpdir or scratch_dir()
        self.sock = os.path.join(self.tmp, "nbd.sock")
        self.log = os.path.join(self.tmp, "nbdkit.log")
        self.pidfile = os.path.join(self.tmp, "nbdkit.pid")
        # nbdkit writes its pidfile only once it accepts connections.
        cmd = [NBDKIT, "-f", "-U", self.sock, "-P", self.pidfile]
        cmd += list(extra)
        for f in over:
            cmd += ["--filter=" + f]
        cmd += ["--filter=" + FILTER]
        for f in under:
            cmd += ["--filter=" + f]
        cmd += list(plugin_args) + list(filter_args)
        self.cmd = cmd
        self.logf = open(self.log, "wb")
        self.proc = track(subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                           env=env), self.log)
        # Ready once nbdkit has written its pidfile (it accepts connections
        # then) and the filter's control socket accepts and its stats file
        # exists: those come just after the pidfile, in .after_fork.  The
        # control socket listens just before its thread starts (and names
        # itself): tests that count nbdkit's threads need that one counted.
        opts = dict(a.split("=", 1) for a in filter_args if "=" in a)
        self.control = opts.get("control")
        statsfile = opts.get("sdccache-statsfile")

        def ready():
            # The thread first: each probe of control_accepts is a client
            # the control socket serves later.
            return (pidfile_written(self.pidfile) and
                    (self.control is None or threads_named(self.proc.pid, "sdccache-ctl") > 0) and
                    control_accepts(self.control) and
                    (statsfile is None or os.path.exists(statsfile)))
        deadline = time.monotonic() + start_timeout
        while not ready():
            if self.proc.poll() is not None:
                fail("nbdkit exited early (%d): %s\n%s" %
                     (self.proc.returncode, " ".join(cmd), self.log_text()))
            if time.monotonic() > deadline:
                self.kill()
                fail("nbdkit was not ready (pidfile, control socket, stats file) within %ds:\n%s"
                     % (start_timeout, self.log_text()))
            time.sleep(0.01)

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def connect(self, exportname=""):
        h = nbd.NBD()
        h.set_export_name(exportname)
        h.connect_unix(self.sock)
        return h

    def log_text(self):
        if not self.logf.closed:
            self.logf.flush()
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Signals nbdkit and waits for it; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                fail("nbdkit did not exit within %ds of signal %d" % (timeout, sig))
        self.logf.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
        return False


def disk_read(path, offset, length):
    """Reads the backing file directly, bypassing nbdkit."""
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def make_image(tmp, size, name="disk.img"):
    path = os.path.join(tmp, name)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


class Model:
    """Shadow buffer: what every read must return."""

    def __init__(self, size):
        self.buf = bytearray(size)

    def write(self, off, data):
        self.buf[off:off + len(data)] = data

    def zero(self, off, n):
        self.buf[off:off + n] = bytes(n)

    def read(self, off, n):
        return bytes(self.buf[off:off + n])


def check_read(h, model, off, n, where):
    """Reads [off, off+n) through h; fails the test, naming the first
    differing byte, unless it equals the model."""
    got = h.pread(n, off)
    want = model.read(off, n)
    if got != want:
        first = next(j for j in range(n) if got[j] != want[j])
        fail("%s: read [%d,+%d) differs at byte %d (got %d want %d)" %
             (where, off, n, off + first, got[first], want[first]))


def random_ops(h_list, model, size, count, seed, ops_log=None):
    """Runs `count` random requests, spread over the handles in h_list,
    checking every read against the model.  Offsets and lengths are
    unaligned and overlap on a small hot area."""
    rng = random.Random(seed)
    for i in range(count):
        h = h_list[rng.randrange(len(h_list))]
        hot = rng.random() < 0.7
        span = min(size, 256 * 1024) if hot else size
        n = rng.randint(1, 70000)
        off = rng.randrange(0, span)
        n = min(n, size - off)
        op = rng.random()
        if op < 0.40:
            data = rng.randbytes(n)
            fua = rng.random() < 0.05
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
            model.write(off, data)
        elif op < 0.75:
            check_read(h, model, off, n, "seed %d op %d" % (seed, i))
        elif op < 0.85:
            h.zero(n, off, nbd.CMD_FLAG_FUA if rng.random() < 0.05 else 0)
            model.zero(off, n)
        elif op < 0.93:
            h.trim(n, off)
            model.zero(off, n)  # file and memory both read trimmed bytes as zero
        else:
            h.flush()
        if ops_log is not None:
            ops_log.append(op)


# ---------------------------------------------------------------------------
# Helpers added for the integration suite: stats file, control socket and
# backing-file polling.  Appended only; nothing above depends on them.

def parse_stats_text(text):
    """'key: value' lines -> dict of strings (values keep inner spaces)."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            out[key] = value
    return out


def read_stats_file(path, json_format=False):
    """The stats file as a dict, or None if it does not exist yet.
    The filter replaces it atomically (rename), so a read is never torn."""
    import json
    try:
        with open(path, "r") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    if json_format:
        return json.loads(text)
    return parse_stats_text(text)


def wait_stats(path, pred, timeout, what, json_format=False):
    """Polls the stats file until pred(stats) holds; returns those stats."""
    seen = {}

    def ok():
        st = read_stats_file(path, json_format)
        if st is None:
            return False
        seen["last"] = st
        return pred(st)
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            fail("timed out after %.1fs waiting for stats: %s; last stats: %r" %
                 (timeout, what, seen.get("last")))
        time.sleep(0.02)
    return seen["last"]


def control_accepts(sock_path):
    """Whether the control socket at sock_path (None: no socket, True)
    accepts a connection; the connection is closed unused."""
    if sock_path is None:
        return True
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def connect_unix(path, timeout):
    """A stream socket connected to the Unix socket `path`, with `timeout`
    set.  A socket with a timeout connects without blocking, and that fails
    at once with EAGAIN while the listen backlog is full (the server has
    not accepted the clients before yet): retried until `timeout`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(path)
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                raise
            time.sleep(0.01)
        except BaseException:
            s.close()
            raise


def control_command(sock_path, line, timeout=30, newline=True):
    """Sends one line to the control socket; returns (body_lines, status),
    status being the final 'ok' or 'error ...' line.  Without `newline`,
    sends the line bare and shuts down the sending side, as
    `printf CMD | socat - UNIX-CONNECT:...` does."""
    s = connect_unix(sock_path, timeout)
    try:
        s.sendall(line.encode() + (b"\n" if newline else b""))
        if not newline:
            s.shutdown(socket.SHUT_WR)
        buf = b""
        lines = []
        while True:
            while b"\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    fail("control socket closed before a status line; got %r" % buf)
                buf += chunk
            raw, buf = buf.split(b"\n", 1)
            text = raw.decode(errors="replace")
            if text == "ok" or text.startswith("error"):
                return lines, text
            lines.append(text)
    finally:
        s.close()


def control_stats(sock_path):
    """The control socket's `stats` as a dict of strings."""
    lines, status = control_command(sock_path, "stats")
    check(status == "ok", "control stats answered %r" % status)
    return parse_stats_text("\n".join(lines))


def wait_disk(path, offset, data, timeout, what):
    """Polls the backing file until it holds `data` at `offset`."""
    wait_until(lambda: disk_read(path, offset, len(data)) == data, timeout, what)


def run_command(cmd, timeout=30, check_rc=True, input=None):
    """Runs a client command with a bound (and `input` on its stdin);
    returns CompletedProcess."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        fail("%s did not finish within %ds" % (" ".join(cmd), timeout))
    if check_rc and p.returncode != 0:
        fail("%s exited %d:\n%s%s" % (" ".join(cmd), p.returncode,
                                      p.stdout.decode(errors="replace"),
                                      p.stderr.decode(errors="replace")))
    return p


def run_nbdkit(args, timeout=10, foreground=False, extra=()):
    """Runs nbdkit [extra] with the filter and args (plugin first) until it
    exits by itself; returns CompletedProcess.  Normally with --run true,
    which suits refusals made before the command starts (.config,
    .config_complete, .get_ready): nbdkit 1.32 exits with the command's
    status if the command ends first.  With foreground=True it runs with -f
    and no --run, and must exit on its own: for refusals in .after_fork."""
    if foreground:
        sock = os.path.join(scratch_dir(prefix="sdc-run-"), "nbd.sock")
        cmd = [NBDKIT, "-f", "-U", sock] + list(extra) + ["--filter=" + FILTER] + list(args)
    else:
        cmd = ([NBDKIT, "-U", "-"] + list(extra) + ["--filter=" + FILTER] + list(args) +
               ["--run", "true"])
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        fail("%s did not exit within %ds" % (" ".join(cmd), timeout))


def start_server(*args, **kwargs):
    """Server(...), which returns once nbdkit accepts connections (it waits
    for nbdkit's pidfile; a probe connection would make nbdkit log an
    error, and under ASan nbdkit 1.32 deadlocks at exit after logging a %m
    message)."""
    return Server(*args, **kwargs)


def extents_of(h, count, offset, flags=0):
    """[(offset, length, type)] of base:allocation from one block status
    request (the handle must have asked for that meta context)."""
    got = []

    def cb(meta, off, entries, err):
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            pos = off
            for i in range(0, len(entries), 2):
                got.append((pos, entries[i], entries[i + 1]))
                pos += entries[i]
        return 0
    h.block_status(count, offset, cb, flags)
    return got


def log_filter_calls(path):
    """The calls nbdkit's log filter (logfile=PATH) recorded, in order, as
    (kind, returned, fields): kind such as "Write", "Zero" or "Flush";
    returned, whether the line is the "...Kind" one of a call's end; fields,
    its key=value words (strings: id, offset, count, fua, return, ...), and
    "connection" (ids count per connection)."""
    out = []
    with open(path) as f:
        for line in f:
            words = line.split()[2:]  # after the date and time
            conn = None
            if words and words[0].startswith("connection="):
                conn = words[0].split("=", 1)[1]
                words = words[1:]
            if not words:
                continue
            kind = words[0]
            fields = dict(w.split("=", 1) for w in words[1:] if "=" in w)
            fields["connection"] = conn
            out.append((kind.lstrip("."), kind.startswith("..."), fields))
    return out
