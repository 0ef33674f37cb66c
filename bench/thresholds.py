# Why sdccache's threshold defaults to 1024: the same runs at threshold=32.
"""Runs 4k randwrite at QD16 and QD1 (fio, ioengine=nbd, incl. drain) against
sdccache over the file plugin with the default threshold and with
threshold=32 (the default before), interleaved, on the image run.py makes
(written in 1 MiB pieces, so cached in large folios).  Reports IOPS incl.
drain and nbdkit's CPU time per I/O.

Why: a batch is written in offset order; the more requests it holds, the
closer together its writes land in the file, and ext4's buffered write then
finds each folio's buffer heads still in the CPU's caches (a perf profile,
taken outside bench/, had ext4_block_write_begin at 36% of nbdkit's CPU
with threshold=32 and 14% with 4096).  Fewer batches also mean fewer
thread wakeups.  On 2 cores, the CPU time per I/O decides the IOPS; it is
also steadier than IOPS when the host steals CPU time.

    /usr/bin/python3 bench/thresholds.py --filter build-bench/filter/nbdkit-sdccache-filter.so
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_runs import make_image, measure_cell, side_bench_args, side_bench_ctx  # noqa: E402
from servers import ROWS_BY_NAME  # noqa: E402

SIZE = 256 << 20
WORKLOADS = ["randwrite-qd16", "randwrite-qd1"]
VARIANTS = [("default (1024)", ()), ("threshold=32", ("threshold=32",))]


def main():
    a = side_bench_args(__doc__.split("\n")[0], reps=5)
    runs = {(w, v): [] for w in WORKLOADS for v, _ in VARIANTS}
    with side_bench_ctx(a.filter, "thresholds", SIZE) as ctx:
        make_image(ctx.image, SIZE)
        for rep in range(a.reps):
            order = VARIANTS if rep % 2 == 0 else list(reversed(VARIANTS))
            for wl in WORKLOADS:
                for name, args in order:
                    tag = "r%d-%s-%s" % (rep, wl, name.split()[0].replace("=", ""))
                    rec = measure_cell(ROWS_BY_NAME["sdccache"], wl, ctx, tag, a.runtime, args)
                    runs[(wl, name)].append(rec)
                    print("rep %d %-15s %-15s %9.0f IOPS incl. drain %6.1f us CPU/IO  "
                          "steal %4.1f%%" % (rep, wl, name, rec["iops_drain"],
                                             rec["cpu_us_per_io"], rec["steal_pct"]), flush=True)
    lines = table(runs)
    print("\n".join(lines))
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n## Threshold 1024 against 32 (`bench/thresholds.py`)\n\n"
                    "sdccache over the file plugin, median of %d interleaved %g s runs each; "
                    "the ratios are the default's over threshold=32's.\n\n%s\n"
                    % (a.reps, a.runtime, "\n".join(lines)))


def table(runs):
    """Markdown lines: per workload, the medians of both variants and ratios."""
    (dflt, _), (old, _) = VARIANTS
    lines = ["| workload | IOPS incl. drain, default | threshold=32 | ratio | "
             "nbdkit CPU µs/I/O, default | threshold=32 | ratio | requests/batch, default "
             "| threshold=32 |", "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for wl in WORKLOADS:
        m = {}
        for v in (dflt, old):
            rs = runs[(wl, v)]
            if not rs:
                continue
            per_batch = [r["sdccache"]["requests_flushed"] / r["sdccache"]["batches_flushed"]
                         for r in rs if r.get("sdccache", {}).get("batches_flushed")]
            m[v] = (statistics.median(r["iops_drain"] for r in rs),
                    statistics.median(r["cpu_us_per_io"] for r in rs),
                    statistics.median(per_batch) if per_batch else 0.0)
        if len(m) < 2:
            continue
        (i1, c1, b1), (i0, c0, b0) = m[dflt], m[old]
        lines.append("| %s | %s | %s | %.2fx | %.1f | %.1f | %.2fx | %.0f | %.0f |" % (
            wl, "{:,.0f}".format(i1), "{:,.0f}".format(i0), i1 / i0 if i0 else 0.0,
            c1, c0, c1 / c0 if c0 else 0.0, b1, b0))
    return lines


if __name__ == "__main__":
    main()
