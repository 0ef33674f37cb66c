# Target 1's 64 KiB sequential check against filters that do nothing.
"""Runs 64k seq write QD8 (fio, ioengine=nbd, incl. drain) over the 256 MiB
image against the file plugin alone, under nbdkit's nofilter filter (a
filter with no callbacks: nbdkit passes every request on), under nbdkit's
fua filter with fuamode=pass (a filter whose pwrite only calls the next
layer's), and under sdccache, interleaved, each on an image written afresh
in 1 MiB pieces (the state bench/run.py's rows run on).

Why: with a CPU-bound plugin, sdccache sends 64 KiB writes straight to it
(bypass-min), so target 1's 64 KiB check compares the same plugin calls
with and without a filter in front; it has read 0.98x to 1.00x.  The two
do-nothing filters show what any filter layer costs there: what nbdkit
itself adds per request once a filter is loaded, and what a filter's own
pwrite adds on top.  sdccache's ratio is then read against theirs.

    /usr/bin/python3 bench/floor.py --filter build-bench/filter/nbdkit-sdccache-filter.so
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_runs import (make_image, measure_cell, median_of, side_bench_args,  # noqa: E402
                      side_bench_ctx)
from servers import ROWS_BY_NAME, Row  # noqa: E402

SIZE = 256 << 20
WORKLOAD = "seqwrite-64k-qd8"
VARIANTS = [("file", ROWS_BY_NAME["file"]),
            ("nofilter", Row("nofilter", "file", "nofilter")),
            ("fua fuamode=pass", Row("fua", "file", "fua-pass")),
            ("sdccache", ROWS_BY_NAME["sdccache"])]


def main():
    a = side_bench_args(__doc__.split("\n")[0], reps=5)
    runs = {v: [] for v, _ in VARIANTS}
    with side_bench_ctx(a.filter, "floor", SIZE) as ctx:
        for rep in range(a.reps):
            order = VARIANTS if rep % 2 == 0 else list(reversed(VARIANTS))
            for name, row in order:
                make_image(ctx.image, SIZE)
                rec = measure_cell(row, WORKLOAD, ctx, "r%d-%s" % (rep, row.name), a.runtime)
                runs[name].append(rec)
                print("rep %d %-18s %9.0f IOPS incl. drain %6.2f us CPU/IO" %
                      (rep, name, rec["iops_drain"], rec["cpu_us_per_io"]), flush=True)
    lines = table(runs)
    print("\n".join(lines))
    if a.out:
        per_run = "; ".join("%s: %s" % (v, ", ".join("%.0f" % r["iops_drain"] for r in runs[v]))
                            for v, _ in VARIANTS)
        with open(a.out, "a") as f:
            f.write("\n## Target 1's 64 KiB check against filters that do nothing "
                    "(`bench/floor.py`)\n\n"
                    "64k seq write QD8 over the file plugin, median of %d interleaved %g s runs; "
                    "the image is written afresh in 1 MiB pieces before each run. `nofilter` has "
                    "no callbacks; `fua fuamode=pass` has a pwrite that only calls the next "
                    "layer's. Ratios are of the medians; the pair column gives each "
                    "repetition's ratio to the file run next to it.\n\n%s\n\n"
                    "Runs (IOPS incl. drain): %s.\n" % (a.reps, a.runtime, "\n".join(lines),
                                                       per_run))


def table(runs):
    """Markdown lines: each variant's median IOPS incl. drain, its ratio to
    the file plugin's (of the medians, and per repetition), and nbdkit's
    CPU time per I/O."""
    base = median_of(runs["file"], lambda r: r["iops_drain"])
    lines = ["| variant | IOPS incl. drain | / file | per repetition / file | "
             "nbdkit CPU µs/I/O |", "|---|--:|--:|--|--:|"]
    for v, _ in VARIANTS:
        rs = runs[v]
        if not rs:
            continue
        med = median_of(rs, lambda r: r["iops_drain"])
        pairs = ", ".join("%.3f" % (r["iops_drain"] / f["iops_drain"])
                          for r, f in zip(rs, runs["file"]) if f["iops_drain"])
        lines.append("| %s | %s | %.3fx | %s | %.2f |" % (
            v, "{:,.0f}".format(med), med / base if base else 0.0, pairs,
            median_of(rs, lambda r: r["cpu_us_per_io"])))
    return lines


if __name__ == "__main__":
    main()
