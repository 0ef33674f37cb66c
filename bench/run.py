# The sdccache bench (issue 5): fio matrix, experiments, microbenchmarks, report.
"""Usage: /usr/bin/python3 bench/run.py [--quick] [options]   (or bench/run.sh)

Runs every workload against every row, interleaved (for each repetition,
for each workload, for each row), then the drain-read and memory experiments
and the engine microbenchmarks; prints the machine, the medians and the
targets, and writes RESULTS.md, results.json and results.png.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import experiments  # noqa: E402
import report  # noqa: E402
from fio_runs import (WORKLOADS, WORKLOADS_BY_NAME, cpu_times, least_stolen,  # noqa: E402
                      make_image, measure_cell, steal_pct)
from servers import ALL_ROWS, ROWS_BY_NAME, stats_filter_works_under  # noqa: E402
from targets import Targets, verdict  # noqa: E402

ROOT = os.path.dirname(HERE)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="2 s runs, 1 repetition, results in /var/tmp/sdcbench-quick")
    p.add_argument("--runtime", type=float, help="seconds per fio run (default 5; quick 2)")
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 5; quick 1)")
    p.add_argument("--rows", help="comma-separated rows (default all): " +
                   ",".join(r.name for r in ALL_ROWS))
    p.add_argument("--workloads", help="comma-separated workloads (default all): " +
                   ",".join(w[0] for w in WORKLOADS))
    p.add_argument("--sdc-args", default="", help="extra sdccache parameters, e.g. 'threshold=64'")
    p.add_argument("--build", default=os.environ.get("SDCCACHE_BUILD", os.path.join(ROOT, "build-bench")),
                   help="meson build directory (default build-bench)")
    p.add_argument("--out", help="where RESULTS.md, results.json and results.png go "
                   "(default bench/; quick: /var/tmp/sdcbench-quick)")
    p.add_argument("--workdir", help="images, sockets, logs (default: a new /var/tmp/sdcbench-*)")
    p.add_argument("--describe", help="what sdccache build this is, for the machine line "
                   "(default: the source tree's git commit)")
    p.add_argument("--no-experiments", action="store_true", help="skip targets 6 and 7")
    p.add_argument("--no-micro", action="store_true", help="skip the microbenchmarks (target 8)")
    p.add_argument("--steal-retry", type=float, default=20.0, metavar="PCT",
                   help="run a fio run again when the hypervisor took PCT%% or more of the "
                        "CPU time during it, and keep the run with less (default 20; 0: never)")
    a = p.parse_args()
    a.runtime = a.runtime or (2.0 if a.quick else 5.0)
    a.reps = a.reps or (1 if a.quick else 5)
    a.rows = a.rows.split(",") if a.rows else [r.name for r in ALL_ROWS]
    a.workloads = a.workloads.split(",") if a.workloads else [w[0] for w in WORKLOADS]
    for r in a.rows:
        if r not in ROWS_BY_NAME:
            p.error("unknown row " + r)
    for w in a.workloads:
        if w not in WORKLOADS_BY_NAME:
            p.error("unknown workload " + w)
    return a


def first_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


def machine_line(describe=None):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    if describe is None:
        commit = first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
        dirty = first_line(["git", "-C", ROOT, "status", "--porcelain", "filter"]) != "?"
        describe = commit + (" + uncommitted filter/ changes" if dirty else "")
    return ("%d x %s, %.1f GiB RAM, Linux %s, %s, %s, load avg %s at start, "
            "sdccache %s, %s" % (
                os.cpu_count(), cpu, mem_kib / (1 << 20), platform.release(),
                first_line(["nbdkit", "--version"]), first_line(["fio", "--version"]),
                " ".join(open("/proc/loadavg").read().split()[:3]), describe,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())))


def run_micro(build, quick):
    exe = os.path.join(build, "bench", "engine-bench")
    if not os.path.exists(exe):
        print("engine-bench not built (%s): target 8 not measured" % exe)
        return {}
    cmd = [exe, "--benchmark_format=json", "--benchmark_repetitions=5",
           "--benchmark_report_aggregates_only=true",
           "--benchmark_min_time=%s" % ("0.2" if quick else "1")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    res = {}
    scale = {"ns": 1.0, "us": 1e3, "ms": 1e6, "s": 1e9}
    for b in json.loads(out)["benchmarks"]:
        if b.get("aggregate_name") == "median":
            res[b["run_name"]] = b["real_time"] * scale[b.get("time_unit", "ns")]
    return res


def main():
    a = parse_args()
    filter_so = os.path.join(a.build, "filter", "nbdkit-sdccache-filter.so")
    if not os.path.exists(filter_so):
        sys.exit("no %s: build first (bench/run.sh does)" % filter_so)
    workdir = a.workdir or tempfile.mkdtemp(prefix="sdcbench-", dir="/var/tmp")
    os.makedirs(workdir, exist_ok=True)
    try:
        return run(a, filter_so, workdir)
    finally:
        if not a.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run(a, filter_so, workdir):
    out = a.out or ("/var/tmp/sdcbench-quick" if a.quick else HERE)
    os.makedirs(out, exist_ok=True)
    ctx = SimpleNamespace(workdir=workdir, filter_so=filter_so, image_size=256 << 20,
                          image=os.path.join(workdir, "disk.img"))
    machine = machine_line(a.describe)
    print("machine: " + machine, flush=True)
    ctx.stats_under_sdccache = stats_filter_works_under(filter_so, workdir)
    notes = []
    if not ctx.stats_under_sdccache:
        notes.append("nbdkit's stats filter cannot sit under sdccache (sdccache takes the "
                     "`statsfile=` parameter meant for it), so sdccache rows count plugin "
                     "writes with sdccache's own counters (plugin_writes, bytes_flushed).")
    for note in notes:
        print("NOTE: " + note, flush=True)
    print("runtime %gs x %d repetitions, rows %s, work dir %s" %
          (a.runtime, a.reps, ",".join(a.rows), workdir), flush=True)
    make_image(ctx.image, ctx.image_size)
    sdc_args = a.sdc_args.split()

    records, errors = [], []
    total = a.reps * len(a.workloads) * len(a.rows)
    n = 0
    started = time.monotonic()
    cpu_start = cpu_times()
    for rep in range(a.reps):
        for wl in a.workloads:
            for name in a.rows:
                n += 1
                tag = "r%d-%s-%s" % (rep, wl, name.replace("/", "-"))
                # A run the hypervisor took much CPU time from is run once
                # more, and the cell keeps whichever of the two it took
                # less from (both are in results.json).
                attempts = []
                while len(attempts) < (2 if a.steal_retry > 0 else 1):
                    try:
                        rec = measure_cell(ROWS_BY_NAME[name], wl, ctx, tag, a.runtime, sdc_args)
                    except Exception as e:  # noqa: BLE001 -- one cell fails, the run goes on
                        errors.append("%s: %s: %s" % (tag, type(e).__name__, e))
                        print("[%d/%d] %s: ERROR %s" % (n, total, tag, str(e).splitlines()[0]),
                              flush=True)
                        break
                    attempts.append(rec)
                    print("[%d/%d] %-17s %-15s %9.0f IOPS p99 %7.2f ms drain %6.3f s "
                          "incl. %9.0f  plugin writes %8.1f KiB avg  steal %4.1f%%%s  (%.0fs)" % (
                              n, total, wl, name, rec["iops"], rec["p99_ms"], rec["drain_s"],
                              rec["iops_drain"], rec["plugin_write_avg_kib"], rec["steal_pct"],
                              " (second run)" if len(attempts) > 1 else "",
                              time.monotonic() - started), flush=True)
                    if rec["steal_pct"] < a.steal_retry:
                        break
                if not attempts:
                    continue
                rec = dict(least_stolen(attempts))
                rec["rep"] = rep
                rec["attempts"] = [{"iops_drain": x["iops_drain"], "steal_pct": x["steal_pct"]}
                                   for x in attempts]
                records.append(rec)
    steal = report.steal_text(records, steal_pct(cpu_start, cpu_times()), a.steal_retry)
    print(steal, flush=True)

    drain6, memory7 = {}, None
    if not a.no_experiments:
        runs6 = {"sdccache": [], "cache": []}
        for rep in range(a.reps):
            for top in runs6:
                try:
                    r = experiments.reads_during_drain(ctx, top)
                    runs6[top].append(r)
                    print("reads during drain (%s, rep %d): %r" % (top, rep, r), flush=True)
                except Exception as e:  # noqa: BLE001
                    errors.append("reads during drain (%s, rep %d): %s" % (top, rep, e))
        drain6 = {top: experiments.median_run(runs) for top, runs in runs6.items() if runs}
        try:
            memory7 = experiments.memory_run(ctx)
            print("memory run: %r" % memory7, flush=True)
        except Exception as e:  # noqa: BLE001
            errors.append("memory run: %s" % e)
    micro8 = {}
    if not a.no_micro:
        try:
            micro8 = run_micro(a.build, a.quick)
        except (OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            errors.append("microbenchmarks: %s" % e)
    if micro8:
        print("microbenchmarks (ns): %r" % micro8, flush=True)

    cells = report.medians(records)
    rows = [r for r in a.rows if any((r, w) in cells for w in a.workloads)]
    labels = {w[0]: w[1] for w in WORKLOADS}
    tgt = Targets(cells, drain6, memory7, micro8).evaluate(a.workloads)
    elapsed = time.monotonic() - started
    machine += ", load avg %s at end" % " ".join(open("/proc/loadavg").read().split()[:3])

    summary = report.summary_table(cells, rows, a.workloads)
    print("\nmachine: " + machine)
    print("\nmedian IOPS incl. drain:")
    print("\n".join(summary))
    print("\nmedian IOPS (no drain):")
    print("\n".join(report.summary_table(cells, rows, a.workloads, key="iops")))
    print("\ntargets:")
    for t, what, meas, need, ok in tgt:
        print("  %-4s %-2s %-62s %14s  (need %s)" % (verdict(ok), t, what, meas, need))
    for e in errors:
        print("ERROR " + e)

    cmd = os.environ.get("SDCCACHE_BENCH_CMD") or " ".join(["bench/run.py"] + sys.argv[1:])
    md = ["# sdccache bench results", "",
          "Generated by `%s` in %.0f s. Each cell is the median of %d interleaved "
          "repetition(s) of %g s fio runs (ioengine=nbd) against a %d MiB image." % (
              cmd, elapsed, a.reps, a.runtime, ctx.image_size >> 20), "",
          "Machine: " + machine, "", steal, "",
          "Rows: `file` = nbdkit file plugin; `cache` = `--filter=cache cache=writeback`; "
          "`/slow` = nbdkit's delay filter (`delay-write=1ms`) under the tested filter; "
          "`/remote` = the nbd plugin forwarding to a second nbdkit with the delay filter. "
          "nbdkit's stats filter sits just above every plugin and counts plugin writes. "
          "Drain = one client flush timed from fio's exit; IOPS incl. drain = I/Os / "
          "(runtime + drain). nbdkit CPU µs/I/O = user + system CPU time of the row's nbdkit "
          "processes (both of them for /remote) from start to after the drain, per I/O. "
          "`I/Os per client flush` shows how often fio's nbd engine really "
          "flushed with fsync=32. sdccache parameters: defaults%s." % (
              (" + " + a.sdc_args) if a.sdc_args else ""), "",
          ] + ["Note: " + n + "\n" for n in notes] + [
          "## Targets (issue 5)", ""] + report.target_table(tgt)
    md += ["", "## Median IOPS incl. drain", ""] + summary
    md += ["", "![IOPS incl. drain](results.png)", "", "## Median IOPS (no drain)", ""]
    md += report.summary_table(cells, rows, a.workloads, key="iops")
    md += ["", "## Per workload"] + report.workload_tables(cells, rows, a.workloads, labels)
    md += ["", "## sdccache counters (medians)", ""] + report.sdccache_table(cells, a.workloads)
    md += ["", "## Experiments"] + report.experiments_text(drain6, memory7, micro8)
    if errors:
        md += ["", "## Errors", ""] + ["- " + e.replace("\n", " ")[:500] for e in errors]
    with open(os.path.join(out, "RESULTS.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"machine": machine, "runtime": a.runtime, "reps": a.reps,
                   "records": records, "drain6": drain6, "memory7": memory7,
                   "micro8": micro8, "errors": errors}, f, indent=1)
    report.plot(os.path.join(out, "results.png"), cells, rows, a.workloads)
    print("\nwrote %s/RESULTS.md, results.json, results.png" % out)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
