# One fio run against one row: the workloads, fio's JSON, the drain flush.
"""Runs fio's nbd engine against a row and measures the drain after it.

The drain is the time of one NBD flush sent from a connection opened before
fio started, measured from the moment fio exited until the flush returned:
whatever the filter still held when the client stopped writing has to reach
the plugin (and be flushed) within it.  IOPS incl. drain divides the I/Os
of the run by (runtime + drain).
"""
import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from types import SimpleNamespace

import nbd  # python3-libnbd (/usr/bin/python3)

from servers import BenchError, RowServer, stats_filter_works_under

# name, label, fio options
WORKLOADS = [
    ("randwrite-qd1", "4k randwrite QD1",
     ["--rw=randwrite", "--bs=4k", "--iodepth=1"]),
    ("randwrite-qd16", "4k randwrite QD16",
     ["--rw=randwrite", "--bs=4k", "--iodepth=16"]),
    ("seqwrite-4k-qd8", "4k seq write QD8",
     ["--rw=write", "--bs=4k", "--iodepth=8"]),
    ("seqwrite-64k-qd8", "64k seq write QD8",
     ["--rw=write", "--bs=64k", "--iodepth=8"]),
    ("randwrite-fsync32", "4k randwrite QD16, fsync=32",
     ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--fsync=32"]),
    ("randrw-70-30", "70/30 4k randrw QD16",
     ["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"]),
]
WORKLOADS_BY_NAME = {w[0]: w for w in WORKLOADS}


def make_image(path, size, piece=1 << 20):
    """A fresh image of `size` bytes of 0x5a (any old one's pages leave the
    page cache), written in `piece`-byte writes and synced.  How it is
    written decides how the kernel caches it (bench/folios.py)."""
    chunk = b"\x5a" * piece
    with open(path, "wb") as f:
        for _ in range(size // piece):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def median_of(recs, key):
    """The median of key(record) over a side bench's records (0 if none)."""
    vals = [key(r) for r in recs]
    return statistics.median(vals) if vals else 0.0


def side_bench_args(description, reps):
    """The command line of the side benches run after run.py (outlets.py,
    folios.py)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--filter", required=True, help="path of nbdkit-sdccache-filter.so")
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--out", help="append a Markdown section to this file")
    return ap.parse_args()


@contextlib.contextmanager
def side_bench_ctx(filter_so, name, image_size):
    """The run context of a side bench (what measure_cell needs) in a new
    work directory under /var/tmp, removed afterwards."""
    work = tempfile.mkdtemp(prefix="sdc-%s-" % name, dir="/var/tmp")
    try:
        ctx = SimpleNamespace(workdir=work, filter_so=os.path.abspath(filter_so),
                              image_size=image_size, image=os.path.join(work, "disk.img"))
        ctx.stats_under_sdccache = stats_filter_works_under(ctx.filter_so, work)
        yield ctx
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fio_json(stdout):
    """fio's nbd engine prints a line before the JSON document."""
    start = stdout.find("{")
    if start < 0:
        raise BenchError("fio printed no JSON:\n" + stdout[-2000:])
    return json.loads(stdout[start:])


def cpu_times():
    """The machine's CPU time so far, from /proc/stat's `cpu` line: (busy,
    idle, steal) in clock ticks.  Steal is time the hypervisor gave this
    VM's virtual CPUs to someone else while they had work to do."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq, idle + iowait, steal)


def steal_pct(before, after):
    """Steal as a percentage of all the CPU time between two cpu_times()."""
    d = [b - a for a, b in zip(before, after)]
    total = sum(d)
    return 100.0 * d[2] / total if total > 0 else 0.0


def least_stolen(attempts):
    """Of the runs of one cell, the one the hypervisor took least CPU time
    from.  Chosen by steal alone, never by the result, so that a re-run
    cannot favour any row."""
    return min(attempts, key=lambda r: r["steal_pct"])


def run_fio(uri, options, runtime=None, size=None, extra_timeout=90):
    """Runs one fio job to the end (bounded); returns its parsed JSON job."""
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri,
           "--output-format=json"] + list(options)
    if size is not None:
        cmd.append("--size=%d" % size)
    if runtime is not None:
        cmd += ["--time_based", "--runtime=%g" % runtime]
    limit = (runtime or 0) + extra_timeout
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise BenchError("fio (pid %d) did not finish within %ds" % (proc.pid, limit))
    if proc.returncode != 0:
        raise BenchError("fio failed (%d): %s\n%s" % (proc.returncode, " ".join(cmd), err[-2000:]))
    job = fio_json(out)["jobs"][0]
    if job.get("error"):
        raise BenchError("fio job error %r" % job["error"])
    return job


def summarise_job(job):
    """I/Os, runtime and the worse p99 completion latency of the directions."""
    ios = 0
    p99 = 0.0
    for d in ("read", "write"):
        part = job[d]
        ios += part["total_ios"]
        if part["total_ios"]:
            pct = part["clat_ns"].get("percentile", {})
            p99 = max(p99, pct.get("99.000000", 0) / 1e6)
    runtime_s = job["job_runtime"] / 1000.0
    return {"ios": ios, "runtime_s": runtime_s, "iops": ios / runtime_s if runtime_s else 0.0,
            "p99_ms": p99, "syncs": job.get("sync", {}).get("total_ios", 0)}


def connect(uri, timeout=10):
    """Connects, retrying while the socket exists but nbdkit has not called
    listen() yet (ECONNREFUSED), up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        h = nbd.NBD()
        try:
            h.connect_uri(uri)
            return h
        except nbd.Error as e:
            if "ECONNREFUSED" not in str(e) or time.monotonic() > deadline:
                raise BenchError("connect %s: %s" % (uri, e))
        time.sleep(0.01)


def disconnect(h):
    """Polite NBD_CMD_DISC; the handle itself goes with its last reference."""
    try:
        h.shutdown()
    except nbd.Error:
        pass


def measure_cell(row, workload, ctx, tag, runtime, sdc_args=()):
    """Starts the row, runs one workload, drains, stops; returns one record."""
    name, _, options = WORKLOADS_BY_NAME[workload]
    server = RowServer(row, ctx, tag, sdc_args=sdc_args)
    try:
        drain_h = connect(server.uri)
        try:
            cpu0 = cpu_times()
            job = run_fio(server.uri, options, runtime=runtime, size=ctx.image_size)
            steal = steal_pct(cpu0, cpu_times())
            t0 = time.monotonic()
            if drain_h.can_flush():
                drain_h.flush()
            drain_s = time.monotonic() - t0
        finally:
            disconnect(drain_h)
            del drain_h
        counted = server.stop()
    except nbd.Error as e:
        server.kill()
        raise BenchError("%s: %s" % (tag, e))
    except BaseException:
        server.kill()
        raise
    rec = summarise_job(job)
    rec.update(row=row.name, workload=name, drain_s=drain_s, steal_pct=steal,
               iops_drain=rec["ios"] / (rec["runtime_s"] + drain_s),
               plugin_write_ops=counted["write_ops"], plugin_write_bytes=counted["write_bytes"],
               plugin_flush_ops=counted["flush_ops"],
               cpu_us_per_io=counted["nbdkit_cpu_s"] * 1e6 / rec["ios"] if rec["ios"] else 0.0)
    rec["plugin_write_avg_kib"] = (counted["write_bytes"] / counted["write_ops"] / 1024.0
                                   if counted["write_ops"] else 0.0)
    sdc = counted.get("sdccache")
    if sdc:
        keep = ("batches_flushed", "requests_flushed", "bytes_flushed", "plugin_writes",
                "peak_queued_bytes", "max_flush_us", "backpressure_waits",
                "backpressure_wait_us", "flushes_threshold", "flushes_client",
                "flushes_disconnect", "flushes_backpressure", "flush_errors")
        rec["sdccache"] = {k: sdc[k] for k in keep if k in sdc}
    return rec
