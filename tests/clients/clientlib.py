"""Helpers for the clients suite: bounded external tools, background processes
by PID, a plain (unfiltered) nbdkit, stats files and test images.

Every external command runs with a timeout; every background process is
started with Popen, remembered by PID and stopped by that PID.
"""
import hashlib
import os
import random
import shutil
import signal
import subprocess
import time

import sdctest
from sdctest import check, fail, wait_until


def require(*tools):
    """Fails (not skips) when a tool is missing: the suite is about them."""
    for t in tools:
        check(shutil.which(t) is not None, "required tool not found in PATH: " + t)


def run(cmd, timeout, expect_rc=0, env=None, cwd=None):
    """Runs cmd, killing it after `timeout` seconds; returns its output.
    Fails the test unless it exits with expect_rc (None: any status)."""
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        out = (e.output or b"").decode(errors="replace")
        fail("timed out after %ds: %s\n%s" % (timeout, " ".join(cmd), out))
    out = p.stdout.decode(errors="replace")
    if expect_rc is not None and p.returncode != expect_rc:
        fail("exit status %d (expected %d): %s\n%s" %
             (p.returncode, expect_rc, " ".join(cmd), out))
    return out, p.returncode


class Background:
    """A long-running helper process (nbdfuse, fuse2fs, plain nbdkit)."""

    def __init__(self, cmd, log_path, env=None):
        self.cmd = cmd
        self.log_path = log_path
        self.logf = open(log_path, "wb")
        self.proc = sdctest.track(
            subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=env), log_path)
        self.pid = self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def log_text(self):
        if not self.logf.closed:
            self.logf.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def wait_exit(self, timeout, what):
        """Waits for the process to exit by itself; returns its status."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            fail("%s (pid %d) did not exit within %ds\n%s" %
                 (what, self.pid, timeout, self.log_text()))
        self.logf.close()
        return self.proc.returncode

    def stop(self, timeout=30, sig=signal.SIGTERM):
        if self.alive():
            os.kill(self.pid, sig)
        return self.wait_exit(timeout, " ".join(self.cmd[:2]))

    def kill(self):
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def pidfile_ready(path):
    try:
        with open(path) as f:
            return f.read().strip().isdigit()
    except OSError:
        return False


# nbdkit creates its socket file (bind) a moment before it listens: a client
# that connects as soon as the file exists can get ECONNREFUSED.  nbdkit
# writes its -P pidfile only once it accepts connections, so wait for that.
def start_server(plugin_args, filter_args, tmpdir, start_timeout=10):
    """sdctest.Server (with sdccache) that accepts connections on return."""
    pidfile = os.path.join(tmpdir, "nbdkit.pid")
    srv = sdctest.Server(plugin_args, filter_args, extra=["-P", pidfile], tmpdir=tmpdir)
    deadline = time.monotonic() + start_timeout
    while not pidfile_ready(pidfile):
        if srv.proc.poll() is not None:
            fail("nbdkit exited early:\n" + srv.log_text())
        if time.monotonic() > deadline:
            srv.kill()
            fail("nbdkit did not write %s within %ds" % (pidfile, start_timeout))
        time.sleep(0.01)
    return srv


class PlainServer(Background):
    """nbdkit PLUGIN ARGS without any filter, on a Unix socket in tmpdir."""

    def __init__(self, tmpdir, name, plugin_args, start_timeout=10):
        self.sock = os.path.join(tmpdir, name + ".sock")
        pidfile = os.path.join(tmpdir, name + ".pid")
        super().__init__([sdctest.NBDKIT, "-f", "-U", self.sock, "-P", pidfile] +
                         list(plugin_args), os.path.join(tmpdir, name + ".log"))
        deadline = time.monotonic() + start_timeout
        while not pidfile_ready(pidfile):
            if not self.alive():
                fail("plain nbdkit exited early:\n" + self.log_text())
            if time.monotonic() > deadline:
                self.kill()
                fail("plain nbdkit did not write %s within %ds" % (pidfile, start_timeout))
            time.sleep(0.01)

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock


def uri(sock):
    return "nbd+unix:///?socket=" + sock


def read_stats(path):
    """Parses a `key: value` stats file into a dict of strings."""
    out = {}
    with open(path) as f:
        for line in f:
            k, _, v = line.rstrip("\n").partition(": ")
            out[k] = v
    return out


def stat_int(path, key):
    try:
        return int(read_stats(path).get(key, "-1"))
    except (OSError, ValueError):
        return -1


def fill(path, size, byte):
    """Writes `size` bytes of `byte` to path (a backing file with content,
    so that zero ranges the client sends must really reach it)."""
    block = bytes([byte]) * (1 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n


def random_image(path, size, seed, hole_every=4):
    """A sparse raw image: random 1 MiB blocks, every `hole_every`-th one a
    hole, plus a few unaligned random runs inside the holes."""
    rng = random.Random(seed)
    mib = 1 << 20
    with open(path, "wb") as f:
        f.truncate(size)
        for i in range(size // mib):
            if i % hole_every == hole_every - 1:
                off = i * mib + rng.randrange(1, mib - 70000)
                f.seek(off)
                f.write(rng.randbytes(rng.randint(1, 65536)))
            else:
                f.seek(i * mib)
                f.write(rng.randbytes(mib))


def sha256_file(path, length=None):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left is None or left > 0:
            chunk = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


def files_equal(a, b, length):
    """Compares the first `length` bytes of two files; returns the offset of
    the first difference or -1."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        done = 0
        while done < length:
            n = min(1 << 20, length - done)
            x, y = fa.read(n), fb.read(n)
            if x != y:
                for j in range(min(len(x), len(y))):
                    if x[j] != y[j]:
                        return done + j
                return done + min(len(x), len(y))
            done += n
    return -1

