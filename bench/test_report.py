#!/usr/bin/python3
# Target 6's repetitions: median_run (experiments.py) and how report.py
# shows them; the hypervisor steal of fio_runs.py and report.py, and which
# run a cell run twice keeps; the tables of thresholds.py, sizing.py and
# floor.py.
# Runs no server.
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree

import experiments  # noqa: E402
import fio_runs  # noqa: E402
import floor  # noqa: E402
import report  # noqa: E402
import sizing  # noqa: E402
import thresholds  # noqa: E402


def run(p99, idle_p99, drain_s, top="sdccache"):
    return {"top": top, "buffered": 64 << 20, "queued_before": None, "drain_s": drain_s,
            "reads": int(drain_s * 1000), "p50_ms": p99 / 4, "p99_ms": p99,
            "max_ms": p99 * 2, "idle_p99_ms": idle_p99, "idle_max_ms": idle_p99 * 2}


class MedianRun(unittest.TestCase):
    def test_each_figure_is_its_own_median(self):
        # One stalled run out of five must not decide the p99.
        runs = [run(0.6, 0.3, 0.55), run(38.9, 3.1, 0.95), run(0.7, 0.9, 0.56),
                run(0.5, 0.2, 0.60), run(0.8, 0.4, 0.58)]
        m = experiments.median_run(runs)
        self.assertEqual(m["runs"], 5)
        self.assertEqual(m["p99_ms"], 0.7)
        self.assertEqual(m["idle_p99_ms"], 0.4)
        self.assertEqual(m["drain_s"], 0.58)
        self.assertEqual(m["reads"], 580)
        self.assertEqual(m["p99_runs"], [0.6, 38.9, 0.7, 0.5, 0.8])
        self.assertIsNone(m["queued_before"])  # the cache filter's: not known

    def test_even_count_takes_a_measured_value(self):
        m = experiments.median_run([run(1.0, 0.1, 0.5), run(9.0, 0.2, 0.6)])
        self.assertEqual(m["p99_ms"], 1.0)  # the lower middle, not 5.0

    def test_report_lists_every_run(self):
        runs = [run(0.6, 0.3, 0.55), run(38.9, 3.1, 0.95), run(0.7, 0.9, 0.56)]
        text = "\n".join(report.experiments_text(
            {"sdccache": experiments.median_run(runs)}, None, {}))
        self.assertIn("median of 3 interleaved", text)
        self.assertIn("- sdccache: 0.60, 38.90, 0.70 ms; idle 0.30, 3.10, 0.90 ms", text)
        self.assertIn("| sdccache | 0.560 | 560 |", text)


class Steal(unittest.TestCase):
    def test_share_of_all_cpu_time(self):
        # (busy, idle, steal) ticks: 50 busy, 30 idle, 20 stolen since.
        self.assertAlmostEqual(fio_runs.steal_pct((100, 50, 0), (150, 80, 20)), 20.0)
        self.assertEqual(fio_runs.steal_pct((5, 5, 5), (5, 5, 5)), 0.0)

    def test_cpu_times_reads_proc_stat(self):
        a = fio_runs.cpu_times()
        self.assertEqual(len(a), 3)
        self.assertGreater(a[0] + a[1], 0)

    def test_text_names_the_worst_run(self):
        recs = [{"row": "file", "workload": "randwrite-qd1", "rep": 0, "steal_pct": 2.0},
                {"row": "sdccache", "workload": "randrw-70-30", "rep": 2, "steal_pct": 34.0},
                {"row": "memory", "workload": "randwrite-qd1", "rep": 1, "steal_pct": 12.0}]
        text = report.steal_text(recs, 15.5)
        self.assertIn("15.5% over the fio matrix", text)
        self.assertIn("per kept fio run median 12.0%", text)
        self.assertIn("max 34.0% (sdccache, randrw-70-30, repetition 2)", text)
        self.assertIn("2 of 3 kept runs at 10% or more", text)
        self.assertNotIn("run once more", text)

    def test_text_counts_the_cells_run_twice(self):
        recs = [{"row": "file", "workload": "randwrite-qd1", "steal_pct": 2.0,
                 "attempts": [{"iops_drain": 5.0, "steal_pct": 2.0}]},
                {"row": "sdccache", "workload": "randrw-70-30", "steal_pct": 4.0,
                 "attempts": [{"iops_drain": 9.0, "steal_pct": 30.0},
                              {"iops_drain": 7.0, "steal_pct": 4.0}]}]
        text = report.steal_text(recs, 9.0, 20)
        self.assertIn("with 20% or more steal was run once more", text)
        self.assertIn("1 of 2 cells were run twice", text)

    def test_a_cell_keeps_the_run_with_least_steal_not_most_iops(self):
        runs = [{"iops_drain": 900.0, "steal_pct": 25.0}, {"iops_drain": 500.0, "steal_pct": 3.0},
                {"iops_drain": 700.0, "steal_pct": 12.0}]
        self.assertEqual(fio_runs.least_stolen(runs)["iops_drain"], 500.0)
        self.assertEqual(fio_runs.least_stolen(list(reversed(runs)))["iops_drain"], 500.0)


def cell(iops, cpu, requests, batches):
    return {"iops_drain": iops, "cpu_us_per_io": cpu,
            "sdccache": {"requests_flushed": requests, "batches_flushed": batches}}


class ThresholdTable(unittest.TestCase):
    def test_ratios_are_default_over_old(self):
        runs = {("randwrite-qd16", "default (1024)"): [cell(60000, 18.0, 3000, 2),
                                                       cell(50000, 20.0, 2000, 2),
                                                       cell(55000, 16.0, 1000, 1)],
                ("randwrite-qd16", "threshold=32"): [cell(40000, 24.0, 300, 3),
                                                     cell(44000, 22.0, 300, 1)],
                ("randwrite-qd1", "default (1024)"): [],
                ("randwrite-qd1", "threshold=32"): [cell(1, 1.0, 1, 1)]}
        lines = thresholds.table(runs)
        self.assertEqual(len(lines), 3)  # header, rule, QD16 only (QD1 lacks a variant)
        self.assertEqual(lines[2], "| randwrite-qd16 | 55,000 | 42,000 | 1.31x | 18.0 | 23.0 "
                                   "| 0.78x | 1000 | 200 |")


def sized(iops, cpu, drain_s, plugin_writes, ios, peak=None):
    r = {"iops_drain": iops, "cpu_us_per_io": cpu, "drain_s": drain_s,
         "plugin_write_ops": plugin_writes, "ios": ios}
    if peak is not None:
        r["sdccache"] = {"peak_queued_bytes": peak}
    return r


class SizingTable(unittest.TestCase):
    def runs(self, sdc_iops):
        names = [v for v, _, _ in sizing.VARIANTS]
        return {names[0]: [sized(200000, 4.5, 0.0, 10, 10), sized(220000, 4.4, 0.0, 10, 10),
                           sized(210000, 4.6, 0.0, 10, 10)],
                names[1]: [sized(80000, 12.0, 0.1, 10, 10)],
                names[2]: [sized(100000, 8.0, 0.1, 8, 10, 64 << 20)],
                names[3]: [sized(sdc_iops, 5.0, 0.2, 0, 10, 256 << 20)]}

    def test_ratios_are_against_the_median_of_each_variant(self):
        lines, checks = sizing.table(self.runs(170000))
        self.assertEqual(len(lines), 6)
        self.assertEqual(lines[2], "| memory | 210,000 | 1.00x | 2.62x | 0.000 | 4.5 | 1.00 | - |")
        self.assertEqual(lines[4], "| sdccache | 100,000 | 0.48x | 1.25x | 0.100 | 8.0 | 0.80 "
                                   "| 64.0 |")
        self.assertEqual(checks[0], "- target 2, sdccache: 1.25x file (need >= 2.0x) MISS; "
                                    "0.48x memory (need >= 0.8x) MISS")
        self.assertEqual(len(checks), 2)
        self.assertIn("2.12x file (need >= 2.0x) PASS; 0.81x memory (need >= 0.8x) PASS",
                      checks[1])

    def test_a_check_fails_on_its_own(self):
        _, checks = sizing.table(self.runs(165000))  # 2.06x file, 0.79x memory
        self.assertIn("2.06x file (need >= 2.0x) PASS; 0.79x memory (need >= 0.8x) MISS",
                      checks[1])



class FloorTable(unittest.TestCase):
    def test_ratios_are_of_the_medians_and_of_each_pair(self):
        def recs(*iops):
            return [{"iops_drain": x, "cpu_us_per_io": 28.0 + i} for i, x in enumerate(iops)]
        names = [v for v, _ in floor.VARIANTS]
        runs = {names[0]: recs(36000, 35000, 34000), names[1]: recs(35000, 35700, 33660),
                names[2]: recs(35500, 34300, 34000), names[3]: recs(34000, 36000, 35000)}
        lines = floor.table(runs)
        self.assertEqual(len(lines), 6)
        self.assertEqual(lines[2], "| file | 35,000 | 1.000x | 1.000, 1.000, 1.000 | 29.00 |")
        self.assertEqual(lines[3], "| nofilter | 35,000 | 1.000x | 0.972, 1.020, 0.990 | 29.00 |")
        self.assertEqual(lines[5], "| sdccache | 35,000 | 1.000x | 0.944, 1.029, 1.029 | 29.00 |")

if __name__ == "__main__":
    unittest.main()
