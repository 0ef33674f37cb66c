# Targets 6 and 7: reads during a drain, and memory while writing.
"""Two experiments that the fio matrix cannot show.

reads_during_drain: 64 MiB of 4 KiB writes at distinct random blocks are
buffered over the slow backend (nothing is written back before: threshold
out of reach, max-age off for sdccache; the cache filter writes back only at
flush).  One connection then sends a flush; meanwhile a second connection
reads 4 KiB blocks that were not written (so every read goes to the plugin),
one read per millisecond on a fixed schedule, each read's latency counted
from the time it was due (so a stall counts once per read it delays), until
the flush returns.  The same reads run for 2 s before the flush, as a
control for this machine's own latency.  run.py repeats it (interleaved,
sdccache then cache, as many times as the fio rows) and reports each
figure's median over the repetitions (median_run), like every other target.

memory_run: 1 GiB of 4 KiB random writes (each block once) through sdccache
over file with queue-max-size=64M, the threshold out of reach and max-age
off: write-back starts at half the queue (32 MiB of data) and when writers
wait for room, so the queue fills with the smallest ranges there are.  The
statsfile and the control socket are sampled all along (memory_bytes
against queued_bytes), and nbdkit's peak RSS (VmHWM) is read at the end.
"""
import os
import random
import statistics
import threading
import time

from fio_runs import connect, disconnect, run_fio
from servers import BenchError, Nbdkit, control_stats, read_key_values

MIB = 1 << 20
BLOCK = 4096
READ_INTERVAL_S = 0.001
IDLE_READS_S = 2.0


def percentile(values, p):
    if not values:
        return 0.0
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def _write_blocks(h, blocks, depth=16):
    buf = bytearray(b"\xa5" * BLOCK)
    inflight = []
    for b in blocks:
        while len(inflight) >= depth:
            h.poll(-1)
            inflight = [c for c in inflight if not h.aio_command_completed(c)]
        inflight.append(h.aio_pwrite(buf, b * BLOCK))
    while inflight:
        h.poll(-1)
        inflight = [c for c in inflight if not h.aio_command_completed(c)]


def _scheduled_reads(h, blocks, go_on, limit_s):
    """4 KiB reads, one per READ_INTERVAL_S on a fixed schedule, while
    go_on() holds and limit_s has not passed; returns latencies in ms, each
    counted from the time its read was due: a read held for a second delays
    the thousand reads due meanwhile, as it would a client's."""
    lat = []
    start = time.monotonic()
    i = 0
    while go_on():
        due = start + i * READ_INTERVAL_S
        if due - start >= limit_s:
            break
        now = time.monotonic()
        if now < due:
            time.sleep(due - now)
        h.pread(BLOCK, blocks[i % len(blocks)] * BLOCK)
        lat.append((time.monotonic() - due) * 1000.0)
        i += 1
    return lat


def reads_during_drain(ctx, top, buffered=64 * MIB, delay="1ms", limit_s=300):
    """Returns drain time and the read latencies seen while it ran."""
    d = ctx.workdir
    tag = "drain-" + top
    if top == "sdccache":
        stats = os.path.join(d, tag + ".sdc-stats")
        args = ["--filter=" + ctx.filter_so, "--filter=delay", "file", ctx.image,
                "delay-write=" + delay, "threshold=1048576", "max-age=0",
                "queue-max-size=%d" % (4 * buffered), "sdccache-statsfile=" + stats]
    else:
        stats = None
        args = ["--filter=cache", "--filter=delay", "file", ctx.image,
                "delay-write=" + delay, "cache=writeback"]
    nblocks = ctx.image_size // BLOCK
    rng = random.Random(5)
    order = list(range(nblocks))
    rng.shuffle(order)
    written = order[:buffered // BLOCK]
    unwritten = order[buffered // BLOCK:]
    srv = Nbdkit(args, os.path.join(d, tag + ".sock"), os.path.join(d, tag + ".log"),
                 env=dict(os.environ, TMPDIR=d))
    try:
        hw, hf, hr = connect(srv.uri), connect(srv.uri), connect(srv.uri)
        _write_blocks(hw, written)
        queued = None
        if stats:  # prove nothing was written back before the drain
            deadline = time.monotonic() + 10
            while True:
                st = read_key_values(stats) or {}
                queued = st.get("queued_bytes")
                if queued == buffered:
                    break
                if time.monotonic() > deadline:
                    raise BenchError("sdccache holds %r bytes, not %d, before the drain"
                                     % (queued, buffered))
                time.sleep(0.02)
        result = {}

        def flusher():
            t0 = time.monotonic()
            try:
                hf.flush()
                result["drain_s"] = time.monotonic() - t0
            except Exception as e:  # reported below
                result["error"] = str(e)

        # Control: the same reads with nothing being written back, so the
        # figure during the drain can be told apart from this machine's noise.
        idle = _scheduled_reads(hr, unwritten, lambda: True, IDLE_READS_S)
        th = threading.Thread(target=flusher)
        th.start()
        lat = _scheduled_reads(hr, unwritten, th.is_alive, limit_s)
        th.join(limit_s)
        if th.is_alive():
            raise BenchError("the flush of %s did not return within %ds" % (top, limit_s))
        if "error" in result:
            raise BenchError("flush failed: " + result["error"])
        for h in (hw, hf, hr):
            disconnect(h)
        srv.stop()
    except BaseException:
        srv.kill()
        raise
    return {"top": top, "buffered": buffered, "queued_before": queued,
            "drain_s": result["drain_s"], "reads": len(lat),
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "max_ms": max(lat) if lat else 0.0,
            "idle_p99_ms": percentile(idle, 99), "idle_max_ms": max(idle) if idle else 0.0}


def median_run(runs):
    """One record from repeated reads_during_drain runs: each figure is the
    median over the runs (for an even count, the lower middle one, so that
    it is a measured value); the runs' p99s are kept as p99_runs."""
    out = {"top": runs[0]["top"], "buffered": runs[0]["buffered"], "runs": len(runs),
           "p99_runs": [r["p99_ms"] for r in runs],
           "idle_p99_runs": [r["idle_p99_ms"] for r in runs]}
    for k in ("queued_before", "drain_s", "reads", "p50_ms", "p99_ms", "max_ms",
              "idle_p99_ms", "idle_max_ms"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = statistics.median_low(vals) if vals else None
    return out


def memory_run(ctx, total=1 << 30, queue="64M", limit_s=600):
    """Samples memory_bytes/queued_bytes and peak RSS during a big write."""
    d = ctx.workdir
    img = os.path.join(d, "memory.img")
    with open(img, "wb") as f:
        f.truncate(total)
    stats = os.path.join(d, "memory.sdc-stats")
    ctl = os.path.join(d, "memory.ctl")
    for p in (stats, ctl):
        if os.path.exists(p):
            os.unlink(p)
    srv = Nbdkit(["--filter=" + ctx.filter_so, "file", img, "threshold=1048576", "max-age=0",
                  "queue-max-size=" + queue, "sdccache-statsfile=" + stats, "control=" + ctl],
                 os.path.join(d, "memory.sock"), os.path.join(d, "memory.log"))
    rss_start = srv.status_kib("VmRSS")
    samples = []
    rss_peak = [0]
    stop = threading.Event()

    def sampler():
        # The statsfile is rewritten when counters change (at most every
        # 50 ms); the control socket answers at once, at any moment of a
        # batch.  Both are sampled.
        while not stop.is_set():
            for src, st in (("statsfile", read_key_values(stats)),
                            ("control", control_stats(ctl))):
                if st and "memory_bytes" in st and "queued_bytes" in st:
                    samples.append((st["memory_bytes"], st["queued_bytes"], src))
            rss = srv.status_kib("VmRSS")
            if rss:
                rss_peak[0] = max(rss_peak[0], rss)
            stop.wait(0.02)

    th = threading.Thread(target=sampler)
    th.start()
    try:
        try:
            h = connect(srv.uri)
            t0 = time.monotonic()
            job = run_fio(srv.uri, ["--rw=randwrite", "--bs=4k", "--iodepth=16",
                                    "--io_size=%d" % total], size=total,
                          extra_timeout=limit_s)
            h.flush()
            elapsed = time.monotonic() - t0
            hwm = srv.status_kib("VmHWM")
            disconnect(h)
            del h
        finally:
            stop.set()
            th.join(10)
        final = read_key_values(stats) or {}
        srv.stop()
    except BaseException:
        srv.kill()
        raise
    finally:
        os.unlink(img)
    worst = None
    over = 0
    for mem, q, src in samples:
        bound = 1.1 * q + MIB
        over += mem > bound
        if worst is None or mem / bound > worst[0]:
            worst = (mem / bound, mem, q, src)
    return {"written": job["write"]["io_bytes"], "seconds": elapsed,
            "samples": len(samples), "worst_ratio": worst[0] if worst else None,
            "worst_memory_bytes": worst[1] if worst else None,
            "worst_queued_bytes": worst[2] if worst else None,
            "worst_source": worst[3] if worst else None, "samples_over": over,
            "max_queued_bytes": max((q for _, q, _ in samples), default=0),
            "peak_queued_bytes": final.get("peak_queued_bytes"),
            "backpressure_waits": final.get("backpressure_waits"),
            "vmhwm_kib": hwm, "vmrss_peak_kib": rss_peak[0], "vmrss_start_kib": rss_start}
