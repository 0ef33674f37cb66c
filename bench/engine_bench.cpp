// Engine microbenchmarks (Google Benchmark): the cost of buffering one 4 KiB
// write and of an overlay lookup, measured on WriteBack with a Sink that
// discards everything (issue 5, target 8).
//
// The flusher never runs inside the timed loop: the threshold is out of
// reach, max-age is off and the queue bound is far above what a loop buffers.
// When the buffered set grows past the benchmark's argument (MiB), the loop
// pauses timing and drains it with Flush(), so every timed Write pays for an
// insert into a map of that size, never for write-back.  64 MiB is the
// default queue-max-size, so the largest set the filter buffers by default
// (16k ranges of 4 KiB); 256 MiB is shown for comparison.  The sink reads
// every byte it is given, as a plugin's pwrite does: buffers return to the
// pool as warm as they do in the filter.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "dirty_map.h"
#include "sink.h"
#include "writeback.h"

namespace sdccache {
namespace {

// Accepts everything; reads what it is given (like a plugin's pwrite) into
// a scratch buffer.
class NullSink : public Sink {
 public:
  int Write(const void* buf, uint32_t count, uint64_t, bool) override {
    if (scratch_.size() < count) scratch_.resize(count);
    std::memcpy(scratch_.data(), buf, count);
    benchmark::DoNotOptimize(scratch_.data());
    return 0;
  }
  int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
  int Trim(uint32_t, uint64_t, bool) override { return 0; }
  int Flush() override { return 0; }

 private:
  std::vector<uint8_t> scratch_;  // the flusher's thread only: writeback-threads=1
};

constexpr uint32_t kBlock = 4096;
constexpr uint64_t kDiskBytes = 1ull << 30;           // offsets fall in 1 GiB
constexpr uint64_t kQueueBytes = 2ull << 30;          // never reached
constexpr uint32_t kHugeThreshold = 1u << 30;         // never reached

WriteBackOptions Untriggered() {
  WriteBackOptions o;
  o.threshold = kHugeThreshold;
  o.queue_max_bytes = kQueueBytes;
  o.max_age = std::chrono::milliseconds(0);
  o.write_threads = 1;  // NullSink's scratch buffer is not shared
  return o;
}

// Random 4 KiB-aligned offsets, precomputed so the RNG is not timed.
std::vector<uint64_t> RandomOffsets(size_t n, uint64_t span, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<uint64_t> pick(0, span / kBlock - 1);
  std::vector<uint64_t> v(n);
  for (auto& o : v) o = pick(rng) * kBlock;
  return v;
}

void WriteLoop(benchmark::State& state, bool sequential) {
  const uint64_t flush_every = static_cast<uint64_t>(state.range(0)) << 20;
  NullSink sink;
  WriteBack wb(&sink, Untriggered());
  std::vector<uint8_t> buf(kBlock, 0xab);
  const std::vector<uint64_t> offsets = RandomOffsets(1 << 20, kDiskBytes, 42);
  size_t i = 0;
  uint64_t since_flush = 0;
  for (auto _ : state) {
    const uint64_t off = sequential ? (i * kBlock) % kDiskBytes : offsets[i % offsets.size()];
    if (wb.Write(buf.data(), kBlock, off, false) != 0) {
      state.SkipWithError("Write failed");
      break;
    }
    ++i;
    since_flush += kBlock;
    if (since_flush >= flush_every) {
      state.PauseTiming();
      wb.Flush(Trigger::kClient);
      since_flush = 0;
      state.ResumeTiming();
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(i) * kBlock);
  wb.Stop(std::chrono::milliseconds(10000));
}

// One 4 KiB buffered write at a random offset (the target's figure).
void BM_Write4kRandom(benchmark::State& state) { WriteLoop(state, false); }
// One 4 KiB buffered write just after the previous one.
void BM_Write4kSequential(benchmark::State& state) { WriteLoop(state, true); }

// The floor under BM_Write4kRandom: the same 4 KiB copies into buffers that
// have been read back (as the sink reads them) and handed out again newest
// first, as the pool does, with no engine at all.  What BM_Write4kRandom
// takes beyond this is the engine's own cost; this part is the memory
// system's.
void BM_Copy4kFloor(benchmark::State& state) {
  const size_t count = (static_cast<uint64_t>(state.range(0)) << 20) / kBlock;
  const size_t size = Chunk::AllocationSize(kBlock);
  std::vector<uint8_t*> bufs(count);
  for (auto& b : bufs) {
    b = static_cast<uint8_t*>(std::malloc(size));
    if (b == nullptr) {
      state.SkipWithError("malloc failed");
      break;
    }
    std::memset(b, 0, size);
  }
  // Random order, like the pool after a write-back in offset order of
  // writes made at random offsets.
  std::shuffle(bufs.begin(), bufs.end(), std::mt19937_64(3));
  std::vector<uint8_t> src(kBlock, 0xab), scratch(size);
  size_t i = 0;
  for (auto _ : state) {
    std::memcpy(bufs[i] + size - kBlock, src.data(), kBlock);
    benchmark::DoNotOptimize(bufs[i]);
    if (++i == count) {
      state.PauseTiming();
      for (size_t j = count; j-- > 0;) {  // read back; the last read is reused first
        std::memcpy(scratch.data(), bufs[j], size);
        benchmark::DoNotOptimize(scratch.data());
      }
      i = 0;
      state.ResumeTiming();
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBlock);
  for (uint8_t* b : bufs) std::free(b);
}

// Lookup of one 4 KiB block among state.range(0) buffered, non-adjacent
// 4 KiB ranges; half of the lookups hit a range, half fall between ranges.
void BM_Lookup4k(benchmark::State& state) {
  const auto ranges = static_cast<uint64_t>(state.range(0));
  NullSink sink;
  WriteBack wb(&sink, Untriggered());
  std::vector<uint8_t> buf(kBlock, 0xcd);
  for (uint64_t r = 0; r < ranges; ++r) {
    if (wb.Write(buf.data(), kBlock, r * 2 * kBlock, false) != 0) {
      state.SkipWithError("prefill Write failed");
      return;
    }
  }
  if (wb.queued_bytes() != ranges * kBlock) {
    state.SkipWithError("prefill did not stay buffered");
    return;
  }
  const std::vector<uint64_t> offsets = RandomOffsets(1 << 20, ranges * 2 * kBlock, 7);
  size_t i = 0;
  uint64_t hits = 0;
  for (auto _ : state) {
    Overlay ov = wb.Lookup(offsets[i++ % offsets.size()], kBlock);
    hits += ov.empty() ? 0 : 1;
    benchmark::DoNotOptimize(ov);
  }
  state.counters["hit_ratio"] = i ? static_cast<double>(hits) / static_cast<double>(i) : 0.0;
  wb.Stop(std::chrono::milliseconds(10000));
}

// Takes a write and touches one byte of it: a plugin call that costs
// (almost) nothing, so that what BM_Bypass64k measures is the filter's own
// part of a write it sends straight to the plugin.
class TouchSink : public Sink {
 public:
  int Write(const void* buf, uint32_t, uint64_t, bool) override {
    benchmark::DoNotOptimize(*static_cast<const uint8_t*>(buf));
    return 0;
  }
  int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
  int Trim(uint32_t, uint64_t, bool) override { return 0; }
  int Flush() override { return 0; }
};

// One 64 KiB write that goes straight to a CPU-bound plugin (bypass-min):
// the overlap checks, the in-flight entry and the plugin's timing probe that
// sdccache adds to each such write, which fio's 64 KiB sequential writes over
// the file plugin (target 1) pay on top of the plugin's own cost.
void BM_Bypass64k(benchmark::State& state) {
  constexpr uint32_t kLarge = 64 * 1024;
  TouchSink sink;
  WriteBack wb(&sink, Untriggered());
  std::vector<uint8_t> buf(kLarge, 0xef);
  // The engine starts taking the plugin for latency-bound and buffers every
  // write until a batch's probe has timed it: flush buffered writes until then.
  for (int i = 0; i < 1000 && wb.plugin_latency_bound(); ++i) {
    if (wb.Write(buf.data(), kBlock, 0, false) != 0 || wb.Flush(Trigger::kClient) != 0) break;
  }
  if (wb.plugin_latency_bound()) {
    state.SkipWithError("the sink was never timed as CPU-bound");
    return;
  }
  const uint64_t before = wb.counters().bypass_writes.load();
  uint64_t off = 0;
  for (auto _ : state) {
    if (wb.Write(buf.data(), kLarge, off, false) != 0) {
      state.SkipWithError("Write failed");
      break;
    }
    off = (off + kLarge) % kDiskBytes;
  }
  if (wb.counters().bypass_writes.load() - before != static_cast<uint64_t>(state.iterations()))
    state.SkipWithError("some writes were buffered, not sent straight to the sink");
  wb.Stop(std::chrono::milliseconds(10000));
}

// A failed batch merged back under the writes buffered since it began
// (DirtyMap::InsertUnder), under the engine's lock: reads and writes wait
// for it.  state.range(0) older ranges (trims, as a queue of many small
// requests holds; 64 MiB holds ~500,000), state.range(1) newer ones.
void BM_MergeBack(benchmark::State& state) {
  const uint64_t n_old = static_cast<uint64_t>(state.range(0));
  const uint64_t n_new = static_cast<uint64_t>(state.range(1));
  auto trim = [](uint64_t offset) {
    DirtyRange r;
    r.offset = offset;
    r.length = 512;
    r.kind = RangeKind::kTrim;
    return r;
  };
  for (auto _ : state) {
    state.PauseTiming();
    DirtyMap older, newer;
    for (uint64_t i = 0; i < n_old; ++i) older.Insert(trim(i * 1024));
    for (uint64_t i = 0; i < n_new; ++i) newer.Insert(trim((i * 7919 % n_old) * 1024 + 256));
    state.ResumeTiming();
    newer.InsertUnder(std::move(older));
    state.PauseTiming();
    if (newer.size() != n_old + n_new) state.SkipWithError("wrong merge");
    newer.clear();
    state.ResumeTiming();
  }
}

BENCHMARK(BM_MergeBack)
    ->Args({500000, 1})
    ->Args({500000, 256})
    ->Args({500000, 1000})
    ->Iterations(20)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Write4kRandom)->Arg(64)->Arg(256);
BENCHMARK(BM_Write4kSequential)->Arg(64);
BENCHMARK(BM_Copy4kFloor)->Arg(64);
BENCHMARK(BM_Lookup4k)->Arg(100000);
BENCHMARK(BM_Bypass64k);

}  // namespace
}  // namespace sdccache

BENCHMARK_MAIN();
