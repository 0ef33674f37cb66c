# Issue 5's targets 1-8, evaluated on one run's medians and experiments.
"""Each target yields rows (id, what, measured, need, ok); ok is None when a
cell it needs was not measured in this run (rows or workloads left out)."""

KIB = 1024
MIB = 1 << 20


def _ratio(a, b):
    return a / b if a is not None and b else None


def _fmt(x, unit="x"):
    return "n/a" if x is None else ("%.2f%s" % (x, unit))


class Targets:
    def __init__(self, cells, drain6=None, memory7=None, micro8=None):
        self.cells = cells  # (row, workload) -> medians dict
        self.drain6 = drain6 or {}
        self.memory7 = memory7
        self.micro8 = micro8 or {}
        self.rows = []

    def _get(self, row, wl, key="iops_drain"):
        c = self.cells.get((row, wl))
        return c[key] if c else None

    def _add(self, tid, what, value, need, cmp, unit="x"):
        ok = None if value is None else (value >= need if cmp == ">=" else value <= need)
        self.rows.append((tid, what, _fmt(value, unit), "%s %s" % (cmp, _fmt(need, unit)), ok))

    def _ratio_target(self, tid, what, row, base, wl, need):
        self._add(tid, what, _ratio(self._get(row, wl), self._get(base, wl)), need, ">=")

    def evaluate(self, workloads):
        # 1. never slower than no filter, both backends, by IOPS incl. drain
        for suffix in ("", "/slow"):
            for wl in workloads:
                self._ratio_target("1", "sdccache%s / file%s, %s" % (suffix, suffix, wl),
                                   "sdccache" + suffix, "file" + suffix, wl, 1.0)
        # 2. fast backend
        self._ratio_target("2", "sdccache / file, randwrite-qd16", "sdccache", "file",
                           "randwrite-qd16", 2.0)
        self._ratio_target("2", "sdccache / memory, randwrite-qd16", "sdccache", "memory",
                           "randwrite-qd16", 0.8)
        # 3. slow backend
        self._ratio_target("3", "slow: sdccache / file, randwrite-qd16", "sdccache/slow",
                           "file/slow", "randwrite-qd16", 3.0)
        self._ratio_target("3", "slow: sdccache / cache, randwrite-qd16", "sdccache/slow",
                           "cache/slow", "randwrite-qd16", 2.0)
        self._ratio_target("3", "slow: sdccache / file, seqwrite-4k-qd8", "sdccache/slow",
                           "file/slow", "seqwrite-4k-qd8", 10.0)
        self._ratio_target("3", "slow: sdccache / file, randwrite-fsync32", "sdccache/slow",
                           "file/slow", "randwrite-fsync32", 1.5)
        # 4. drain after the slow random run
        self._add("4", "slow randwrite-qd16 drain: sdccache / cache",
                  _ratio(self._get("sdccache/slow", "randwrite-qd16", "drain_s"),
                         self._get("cache/slow", "randwrite-qd16", "drain_s")), 0.1, "<=")
        # 5. coalescing in the 4k sequential run
        for row in ("sdccache", "sdccache/slow"):
            self._add("5", "%s seqwrite-4k-qd8: plugin write avg" % row,
                      self._get(row, "seqwrite-4k-qd8", "plugin_write_avg_kib"),
                      256.0, ">=", " KiB")
        # 6. reads during a 64 MiB drain
        d = self.drain6.get("sdccache")
        self._add("6", "4k read p99 during a 64 MiB slow drain (sdccache)",
                  d["p99_ms"] if d else None, 2.0, "<=", " ms")
        # 7. memory
        m = self.memory7
        self._add("7", "memory_bytes / (1.1 x queued_bytes + 1 MiB), worst sample",
                  m["worst_ratio"] if m else None, 1.0, "<=")
        self._add("7", "peak RSS, 1 GiB write, queue-max-size=64M",
                  m["vmhwm_kib"] / 1024.0 if m and m.get("vmhwm_kib") else None,
                  104.0, "<=", " MiB")
        # 8. microbenchmarks
        self._add("8", "4 KiB enqueue (WriteBack::Write, random offsets, up to 64 MiB buffered)",
                  self.micro8.get("BM_Write4kRandom/64"), 1000.0, "<=", " ns")
        self._add("8", "overlay lookup, 100k buffered ranges",
                  self.micro8.get("BM_Lookup4k/100000"), 500.0, "<=", " ns")
        return self.rows


def verdict(ok):
    return "n/a" if ok is None else ("PASS" if ok else "MISS")
