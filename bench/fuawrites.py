# FUA writes one at a time (a client that writes through) with and without sdccache.
"""Writes with FUA at queue depth 1 (libnbd, one write after the other,
sequential over the 256 MiB image) for `--runtime` seconds per cell, in
4 KiB, 64 KiB and 1 MiB writes, against the file plugin alone and under
sdccache, and against the nbd plugin forwarding to a second nbdkit with
nbdkit's delay filter (delay-write=1ms) alone and under sdccache,
interleaved.  SDC_OLD_FILTER=SO in the environment adds sdccache rows
with another build of the filter (an A/B in the same run).

Why: qemu's cache=writethrough sends every write with FUA.  A FUA reply
covers everything acknowledged before it, so sdccache buffered such a
write, wrote it back and flushed the plugin: a copy and two plugin calls
where the plugin alone gets one.  Now a FUA write that finds everything
before it flushed goes to the plugin with FUA.

    /usr/bin/python3 bench/fuawrites.py --filter build-bench/filter/nbdkit-sdccache-filter.so
"""
import os
import sys
import time

import nbd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_runs import make_image, median_of, side_bench_args, side_bench_ctx  # noqa: E402
from servers import ROWS_BY_NAME, RowServer  # noqa: E402

SIZE = 256 << 20
BLOCKS = [4 << 10, 64 << 10, 1 << 20]
PAIRS = [("file", "sdccache"), ("nbd/remote", "sdccache/remote")]


def fua_writes(uri, block, runtime):
    """(writes, seconds): FUA writes of `block` bytes, one at a time."""
    h = nbd.NBD()
    h.connect_uri(uri)
    buf = bytes([block % 251]) * block
    n, off = 0, 0
    start = time.monotonic()
    end = start + runtime
    while time.monotonic() < end:
        h.pwrite(buf, off, nbd.CMD_FLAG_FUA)
        n += 1
        off = (off + block) % SIZE
    secs = time.monotonic() - start
    h.shutdown()
    return n, secs


def measure(name, block, ctx, tag, runtime):
    row = ROWS_BY_NAME[name.replace(" old", "")]
    srv = RowServer(row, ctx, tag)
    try:
        n, secs = fua_writes(srv.uri, block, runtime)
    finally:
        out = srv.stop()
    sdc = out.get("sdccache") or {}
    return {"rate": n / secs, "writes": n, "plugin_flushes": out["flush_ops"],
            "bypass_writes": sdc.get("bypass_writes")}


def main():
    ap_args = side_bench_args(__doc__.split("\n")[0], reps=3)
    old = os.environ.get("SDC_OLD_FILTER")
    names = [n for pair in PAIRS for n in pair]
    if old:
        names += ["sdccache old", "sdccache/remote old"]
    runs = {(n, b): [] for n in names for b in BLOCKS}
    with side_bench_ctx(ap_args.filter, "fua", SIZE) as ctx:
        new_so = ctx.filter_so
        make_image(ctx.image, SIZE)
        for rep in range(ap_args.reps):
            for block in BLOCKS:
                order = names if rep % 2 == 0 else list(reversed(names))
                for name in order:
                    ctx.filter_so = os.path.abspath(old) if name.endswith(" old") else new_so
                    tag = "r%d-%d-%s" % (rep, block, name.replace("/", "-").replace(" ", "-"))
                    rec = measure(name, block, ctx, tag, ap_args.runtime)
                    runs[(name, block)].append(rec)
                    print("rep %d %7d B %-20s %8.0f writes/s, plugin flushes %s" %
                          (rep, block, name, rec["rate"], rec["plugin_flushes"]), flush=True)
    lines = table(runs, names)
    print("\n".join(lines))
    if ap_args.out:
        with open(ap_args.out, "a") as f:
            f.write("\n## FUA writes one at a time (`bench/fuawrites.py`)\n\n"
                    "Writes with FUA at queue depth 1, sequential, median of %d interleaved %g s "
                    "runs per cell. `/remote` = the nbd plugin forwarding to a second nbdkit "
                    "with delay-write=1ms.\n\n%s\n" % (ap_args.reps, ap_args.runtime,
                                                       "\n".join(lines)))


def table(runs, names):
    """Markdown lines: writes/s of each row and block size, and each
    sdccache row's ratio to its plugin alone."""
    base_of = {s: p for p, s in PAIRS}
    base_of.update({s + " old": p for p, s in PAIRS})
    lines = ["| row | block | FUA writes/s | / plugin alone | plugin flushes per write | "
             "bypass_writes per write |", "|---|--:|--:|--:|--:|--:|"]
    for name in names:
        for block in BLOCKS:
            rs = runs[(name, block)]
            if not rs:
                continue
            med = median_of(rs, lambda r: r["rate"])
            base = median_of(runs[(base_of[name], block)], lambda r: r["rate"]) \
                if name in base_of else med
            flushes = median_of(rs, lambda r: r["plugin_flushes"] / max(r["writes"], 1))
            bypass = "-" if rs[0]["bypass_writes"] is None else "%.2f" % median_of(
                rs, lambda r: r["bypass_writes"] / max(r["writes"], 1))
            lines.append("| %s | %d KiB | %s | %.2fx | %s | %s |" % (
                name, block >> 10, "{:,.0f}".format(med), med / base if base else 0.0,
                "%.2f" % flushes, bypass))
    return lines


if __name__ == "__main__":
    main()
