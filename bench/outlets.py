# Issue 3 target: the stats file and control socket cost <= 2% of IOPS.
"""Interleaves 4k randwrite QD16 runs (fio, ioengine=nbd) against sdccache
over the file plugin with its outlets enabled (sdccache-statsfile= and
control=) and disabled, and compares the medians of the two.

    /usr/bin/python3 bench/outlets.py --filter build-bench/filter/nbdkit-sdccache-filter.so
"""
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fio_runs import run_fio, side_bench_args, summarise_job  # noqa: E402
from servers import Nbdkit  # noqa: E402


def main():
    a = side_bench_args(__doc__.split("\n")[0], reps=5)
    work = tempfile.mkdtemp(prefix="sdc-outlets-", dir="/var/tmp")
    image = os.path.join(work, "disk.img")
    with open(image, "wb") as f:
        f.truncate(256 << 20)
    iops = {"disabled": [], "enabled": []}
    for rep in range(a.reps):
        for variant in ("disabled", "enabled") if rep % 2 == 0 else ("enabled", "disabled"):
            args = ["--filter=" + a.filter, "file", image]
            if variant == "enabled":
                args += ["sdccache-statsfile=" + os.path.join(work, "stats"),
                         "control=" + os.path.join(work, "ctl.sock")]
            srv = Nbdkit(args, os.path.join(work, "nbd.sock"), os.path.join(work, "nbdkit.log"))
            try:
                job = run_fio(srv.uri, ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
                              runtime=a.runtime, size=256 << 20)
            finally:
                rc = srv.stop()
            if rc != 0:
                sys.exit("nbdkit exited %d:\n%s" % (rc, srv.log_text()))
            iops[variant].append(summarise_job(job)["iops"])
            print("rep %d %-8s %8.0f IOPS" % (rep, variant, iops[variant][-1]), flush=True)
    on, off = statistics.median(iops["enabled"]), statistics.median(iops["disabled"])
    ratio = on / off
    verdict = "PASS" if ratio >= 0.98 else "MISS"
    line = ("| outlets (statsfile + control) / none, 4k randwrite QD16, file | %.3fx | >= 0.98x | %s |"
            % (ratio, verdict))
    print("median enabled %.0f, disabled %.0f IOPS: %s" % (on, off, line))
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n## Stats file and control socket cost (issue 3)\n\n"
                    "Median of %d interleaved %g s runs each, sdccache defaults over the file "
                    "plugin (`bench/outlets.py`).\n\n"
                    "| target | measured | need | result |\n|---|--:|--:|--:|\n%s\n\n"
                    "Runs (IOPS): enabled %s; disabled %s.\n"
                    % (a.reps, a.runtime, line,
                       ", ".join("%.0f" % x for x in iops["enabled"]),
                       ", ".join("%.0f" % x for x in iops["disabled"])))


if __name__ == "__main__":
    main()
