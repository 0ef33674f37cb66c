# Turns the bench's records into medians, text tables, RESULTS.md and a plot.
import statistics

from targets import verdict

METRICS = [  # key, header, format
    ("iops", "IOPS", "{:,.0f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("drain_s", "drain s", "{:.3f}"),
    ("iops_drain", "IOPS incl. drain", "{:,.0f}"),
    ("plugin_write_avg_kib", "plugin write avg KiB", "{:.1f}"),
    ("cpu_us_per_io", "nbdkit CPU µs/I/O", "{:.1f}"),
    ("steal_pct", "steal %", "{:.0f}"),
]


def medians(records):
    """(row, workload) -> median of each metric over the repetitions."""
    groups = {}
    for r in records:
        groups.setdefault((r["row"], r["workload"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        m = {k: statistics.median(r[k] for r in rs) for k, _, _ in METRICS}
        m["reps"] = len(rs)
        m["iops_drain_min"] = min(r["iops_drain"] for r in rs)
        m["iops_drain_max"] = max(r["iops_drain"] for r in rs)
        syncs = statistics.median(r.get("syncs", 0) for r in rs)
        m["ios_per_flush"] = statistics.median(r["ios"] for r in rs) / syncs if syncs else None
        sdc = [r["sdccache"] for r in rs if r.get("sdccache")]
        if sdc:
            m["sdccache"] = {k: statistics.median(s.get(k, 0) for s in sdc) for k in sdc[0]}
        out[key] = m
    return out


def steal_text(records, whole_run_pct, retry_pct=0):
    """How much CPU time the hypervisor took from this VM while fio ran: a
    row measured while a third of the machine was elsewhere is not
    comparable with one measured on a quiet host.  `records` are the runs
    kept, one per cell; a cell whose first run had retry_pct% or more steal
    was run twice (its record's "attempts")."""
    if not records:
        return "Hypervisor steal: no fio run finished."
    worst = max(records, key=lambda r: r["steal_pct"])
    over = sum(1 for r in records if r["steal_pct"] >= 10)
    text = ("Hypervisor steal (CPU time this VM's CPUs waited for while the host ran "
            "something else, from /proc/stat): %.1f%% over the fio matrix; per kept fio run "
            "median %.1f%%, max %.1f%% (%s, %s, repetition %d); %d of %d kept runs at 10%% or "
            "more." % (
                whole_run_pct, statistics.median(r["steal_pct"] for r in records),
                worst["steal_pct"], worst["row"], worst["workload"], worst.get("rep", 0),
                over, len(records)))
    if retry_pct > 0:
        rerun = [r for r in records if len(r.get("attempts", ())) > 1]
        text += (" A run with %g%% or more steal was run once more and its cell kept the run "
                 "with less steal (chosen by steal, never by IOPS; both runs are in "
                 "results.json): %d of %d cells were run twice." % (
                     retry_pct, len(rerun), len(records)))
    return text


def _table(header, lines):
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def summary_table(cells, rows, workloads, key="iops_drain", fmt="{:,.0f}"):
    lines = []
    for wl in workloads:
        line = [wl]
        for row in rows:
            c = cells.get((row, wl))
            line.append(fmt.format(c[key]) if c else "-")
        lines.append(line)
    return _table(["workload"] + rows, lines)


def workload_tables(cells, rows, workloads, labels):
    out = []
    for wl in workloads:
        out += ["", "#### %s (`%s`)" % (labels[wl], wl), ""]
        lines = []
        for row in rows:
            c = cells.get((row, wl))
            if c:
                lines.append([row] + [f.format(c[k]) for k, _, f in METRICS] + [
                    "{:,.0f}–{:,.0f}".format(c["iops_drain_min"], c["iops_drain_max"]),
                    "-" if c["ios_per_flush"] is None else "%.1f" % c["ios_per_flush"]])
        out += _table(["row"] + [h for _, h, _ in METRICS] + ["incl. drain min–max",
                                                              "I/Os per client flush"], lines)
    return out


def sdccache_table(cells, workloads):
    """The filter's own counters (medians), to explain the figures."""
    lines = []
    for (row, wl), c in sorted(cells.items()):
        s = c.get("sdccache")
        if not s or wl not in workloads:
            continue
        batches = s.get("batches_flushed", 0)
        lines.append([row, wl, "%d" % batches,
                      "%.1f" % (s.get("requests_flushed", 0) / batches if batches else 0),
                      "%.0f" % (s.get("bytes_flushed", 0) / batches / 1024 if batches else 0),
                      "%d" % s.get("plugin_writes", 0),
                      "%.1f" % (s.get("peak_queued_bytes", 0) / (1 << 20)),
                      "%.1f" % (s.get("max_flush_us", 0) / 1000.0),
                      "%d" % s.get("backpressure_waits", 0)])
    return _table(["row", "workload", "batches", "requests/batch", "KiB/batch", "plugin writes",
                   "peak queued MiB", "max batch ms", "backpressure waits"], lines)


def target_table(rows):
    return _table(["#", "target", "measured", "need", "result"],
                  [[t, what, meas, need, verdict(ok)] for t, what, meas, need, ok in rows])


def experiments_text(drain6, memory7, micro8):
    out = []
    if drain6:
        out += ["", "Reads during a drain of 64 MiB (4 KiB random writes) to the slow backend: "
                "one 4 KiB read of an unwritten block per ms on a second connection, latency "
                "counted from when the read was due:", ""]
        out += _table(["filter", "drain s", "reads", "p50 ms", "p99 ms", "max ms",
                       "idle p99 ms", "idle max ms"],
                      [[k, "%.3f" % v["drain_s"], "%d" % v["reads"], "%.2f" % v["p50_ms"],
                        "%.2f" % v["p99_ms"], "%.1f" % v["max_ms"],
                        "%.2f" % v.get("idle_p99_ms", 0), "%.1f" % v.get("idle_max_ms", 0)]
                       for k, v in drain6.items()])
        out += ["", "(idle: the same reads for 2 s before the flush, nothing being written "
                "back.)  Each figure is the median of %d interleaved repetition(s); their p99s, "
                "during the drain and idle:" % max(v["runs"] for v in drain6.values()), ""]
        out += ["- %s: %s ms; idle %s ms" % (k, ", ".join("%.2f" % x for x in v["p99_runs"]),
                                             ", ".join("%.2f" % x for x in v["idle_p99_runs"]))
                for k, v in drain6.items()]
    if memory7:
        m = memory7
        out += ["", "Memory during a 1 GiB 4 KiB random write, queue-max-size=64M, "
                "write-back by half-queue and backpressure only: %d samples (statsfile and "
                "control socket), %d of them "
                "over 1.1 x queued_bytes + 1 MiB; worst memory_bytes %d at queued_bytes %d "
                "(%s; ratio %.3f); max queued sampled %.1f MiB; RSS at start "
                "%.1f MiB, peak RSS (VmHWM) %.1f MiB; %.1f s." % (
                    m["samples"], m.get("samples_over", 0), m["worst_memory_bytes"] or 0,
                    m["worst_queued_bytes"] or 0, m.get("worst_source"),
                    m["worst_ratio"] or 0, m["max_queued_bytes"] / (1 << 20),
                    (m.get("vmrss_start_kib") or 0) / 1024.0,
                    (m["vmhwm_kib"] or 0) / 1024.0, m["seconds"])]
    if micro8:
        out += ["", "Engine microbenchmarks (median real time per operation): " +
                ", ".join("%s %.0f ns" % kv for kv in sorted(micro8.items())) + "."]
    return out


def plot(path, cells, rows, workloads):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 6))
    width = 0.8 / max(1, len(rows))
    cmap = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        xs, ys = [], []
        for j, wl in enumerate(workloads):
            c = cells.get((row, wl))
            if c:
                xs.append(j + (i - (len(rows) - 1) / 2) * width)
                ys.append(max(c["iops_drain"], 1))
        ax.bar(xs, ys, width, label=row, color=cmap(i % 10),
               hatch="//" if "sdccache" in row else None, edgecolor="black", linewidth=0.3)
    ax.set_yscale("log")
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels(workloads, rotation=15)
    ax.set_ylabel("IOPS incl. drain (log)")
    ax.set_title("sdccache bench: median IOPS incl. drain per workload and row")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(ncol=5, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
