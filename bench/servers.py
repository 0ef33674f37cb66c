# The bench's nbdkit rows: how each is started, stopped (by PID) and counted.
"""Rows of the bench and the nbdkit processes behind them.

Every row puts nbdkit's stats filter closest to the plugin, so the plugin's
writes are counted the same way whatever sits above.  "Slow" rows put the
delay filter (delay-write) between the tested filter and the stats filter.
The remote rows forward with the nbd plugin to a second nbdkit that serves
the image through the delay filter.
"""
import os
import re
import signal
import socket
import subprocess
import time

NBDKIT = os.environ.get("NBDKIT", "nbdkit")


class BenchError(Exception):
    pass


class Row:
    """One column of the results: a name, a backend and what sits on top."""

    def __init__(self, name, backend, top):
        self.name = name          # e.g. "sdccache/slow"
        self.backend = backend    # null | memory | file | slow | remote
        self.top = top            # None | "cache" | "sdccache" (| "nofilter" | "fua-pass")


ALL_ROWS = [
    Row("null", "null", None),
    Row("memory", "memory", None),
    Row("file", "file", None),
    Row("cache", "file", "cache"),
    Row("sdccache", "file", "sdccache"),
    Row("file/slow", "slow", None),
    Row("cache/slow", "slow", "cache"),
    Row("sdccache/slow", "slow", "sdccache"),
    Row("nbd/remote", "remote", None),
    Row("sdccache/remote", "remote", "sdccache"),
]
ROWS_BY_NAME = {r.name: r for r in ALL_ROWS}


class Nbdkit:
    """One nbdkit -f on a Unix socket, started and stopped by its PID."""

    def __init__(self, args, sock, log, env=None, start_timeout=15):
        self.sock = sock
        self.log = log
        self.cmd = [NBDKIT, "-f", "-U", sock] + list(args)
        if os.path.exists(sock):
            os.unlink(sock)
        self.logf = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     env=env)
        self.pid = self.proc.pid
        deadline = time.monotonic() + start_timeout
        while not os.path.exists(sock):
            if self.proc.poll() is not None:
                raise BenchError("nbdkit exited early (%d): %s\n%s" %
                                 (self.proc.returncode, " ".join(self.cmd), self.log_text()))
            if time.monotonic() > deadline:
                self.kill()
                raise BenchError("nbdkit did not create %s within %ds" % (sock, start_timeout))
            time.sleep(0.005)

    @property
    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def log_text(self):
        if not self.logf.closed:
            self.logf.flush()
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")[-4000:]

    def status_kib(self, key):
        """A 'kB' field of /proc/PID/status (VmHWM, VmRSS), or None."""
        try:
            with open("/proc/%d/status" % self.pid) as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self, timeout=60):
        """SIGTERM, then SIGKILL past `timeout`; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise BenchError("nbdkit %d did not exit within %ds of SIGTERM" %
                                 (self.pid, timeout))
        self.logf.close()
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if not self.logf.closed:
            self.logf.close()


def cpu_seconds(pid):
    """User + system CPU time a live process has used (all its threads)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RowServer:
    """The nbdkit process(es) of one row for one run, with their stats files."""

    def __init__(self, row, ctx, tag, sdc_args=(), delay="1ms"):
        self.row = row
        self.servers = []  # started order; stopped in reverse
        d = ctx.workdir
        self.plugin_stats = os.path.join(d, tag + ".plugin-stats")
        # sdccache's counters come from its control socket: its statsfile=
        # would take the stats filter's statsfile= (the outer filter sees
        # the key first).
        self.control = os.path.join(d, tag + ".ctl") if row.top == "sdccache" else None
        for p in (self.plugin_stats, self.control):
            if p and os.path.exists(p):
                os.unlink(p)
        env = dict(os.environ, TMPDIR=d)  # the cache filter's cache file
        try:
            top = []
            top_args = []
            if row.top == "cache":
                top = ["--filter=cache"]
                top_args = ["cache=writeback"]
            elif row.top == "sdccache":
                top = ["--filter=" + ctx.filter_so]
                top_args = ["control=" + self.control] + list(sdc_args)
            elif row.top == "nofilter":  # bench/floor.py: a filter with no callbacks
                top = ["--filter=nofilter"]
            elif row.top == "fua-pass":  # bench/floor.py: a pwrite that only passes on
                top = ["--filter=fua"]
                top_args = ["fuamode=pass"]
            elif row.top is not None:
                raise BenchError("unknown top " + row.top)
            stats = ["--filter=stats"]
            stats_args = ["statsfile=" + self.plugin_stats, "statsappend=false"]
            if row.top == "sdccache" and not ctx.stats_under_sdccache:
                stats, stats_args = [], []
                self.plugin_stats = None
            size = str(ctx.image_size)
            if row.backend == "null":
                plugin = ["null", "size=" + size]
            elif row.backend == "memory":
                plugin = ["memory", "size=" + size]
            elif row.backend == "file":
                plugin = ["file", ctx.image]
            elif row.backend == "slow":
                top = top + ["--filter=delay"]
                top_args = top_args + ["delay-write=" + delay]
                plugin = ["file", ctx.image]
            elif row.backend == "remote":
                far = Nbdkit(["--filter=delay", "file", ctx.image, "delay-write=" + delay],
                             os.path.join(d, tag + ".far.sock"), os.path.join(d, tag + ".far.log"))
                self.servers.append(far)
                plugin = ["nbd", "socket=" + far.sock]
            else:
                raise BenchError("unknown backend " + row.backend)
            self.near = Nbdkit(top + stats + plugin + top_args + stats_args,
                               os.path.join(d, tag + ".sock"), os.path.join(d, tag + ".log"),
                               env=env)
            self.servers.append(self.near)
        except BaseException:
            self.kill()
            raise

    @property
    def uri(self):
        return self.near.uri

    def stop(self):
        """Stops every process (nearest first); returns nbdkit's counters
        (sdccache's taken just before the stop)."""
        sdc = control_stats(self.control) if self.control else None
        cpu_s = sum(cpu_seconds(s.pid) for s in self.servers)
        try:
            for s in reversed(self.servers):
                rc = s.stop()
                if rc != 0:
                    raise BenchError("nbdkit %d exited with %d:\n%s" % (s.pid, rc, s.log_text()))
        finally:
            self.kill()
        if self.plugin_stats:
            out = parse_plugin_stats(self.plugin_stats)
        else:  # no stats filter possible: the filter's own count of its writes
            out = {"write_ops": sdc.get("plugin_writes", 0),
                   "write_bytes": sdc.get("bytes_flushed", 0), "flush_ops": 0}
        if sdc is not None:
            out["sdccache"] = sdc
        out["nbdkit_cpu_s"] = cpu_s
        return out

    def kill(self):
        for s in reversed(self.servers):
            s.kill()


def stats_filter_works_under(filter_so, workdir):
    """Whether `--filter=SDCCACHE --filter=stats ... statsfile=P` starts: an
    outer filter that claims the key statsfile= starves the stats filter."""
    stats = os.path.join(workdir, "probe.plugin-stats")
    try:
        srv = Nbdkit(["--filter=" + filter_so, "--filter=stats", "null", "size=1M",
                      "statsfile=" + stats], os.path.join(workdir, "probe.sock"),
                     os.path.join(workdir, "probe.log"))
    except BenchError:
        return False
    srv.stop()
    return os.path.exists(stats)


_UNITS = {"bytes": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def parse_plugin_stats(path):
    """ops and bytes of each operation in the stats filter's file."""
    out = {"write_ops": 0, "write_bytes": 0, "flush_ops": 0}
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        raise BenchError("the stats filter wrote no %s" % path)
    for m in re.finditer(r"^(\w+): (\d+) ops, [\d.]+ s, ([\d.]+) (\w+)", text, re.M):
        op, ops, amount, unit = m.group(1), int(m.group(2)), float(m.group(3)), m.group(4)
        if op == "write":
            out["write_ops"] = ops
            out["write_bytes"] = int(amount * _UNITS.get(unit, 1))
        elif op == "flush":
            out["flush_ops"] = ops
    return out


def _key_values(lines):
    out = {}
    for line in lines:
        key, sep, value = line.rstrip("\n").partition(": ")
        if sep:
            try:
                out[key] = int(value)
            except ValueError:
                out[key] = value
    return out


def control_stats(sock_path, timeout=30):
    """sdccache's control socket `stats` as a dict of ints (or strings)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(sock_path)
        s.sendall(b"stats\n")
        buf = b""
        while not (buf.endswith(b"\nok\n") or buf.startswith(b"error")):
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("control socket closed early: %r" % buf[-200:])
            buf += chunk
    finally:
        s.close()
    return _key_values(buf.decode(errors="replace").splitlines())


def read_key_values(path):
    """sdccache's text statsfile as a dict of ints (or strings)."""
    try:
        with open(path) as f:
            return _key_values(f.readlines())
    except FileNotFoundError:
        return None
