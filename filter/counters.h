// Counters: what the engine did, as cheap atomics, and their rendering.
//
// Written with relaxed atomics from the write path and the flusher; read
// from any thread.  Gauges that need the engine lock (queued_*) are taken in
// WriteBack::Stats().
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace sdccache {

// Why a batch was written back (or a flush requested).
enum class Trigger : uint8_t {
  kThreshold,
  kAge,
  kClient,
  kFua,
  kDisconnect,
  kShutdown,
  kControl,
  kBackpressure,
  kRetry,
  kCount
};
const char* TriggerName(Trigger t);

// Upper bounds (ms) of the flush-latency histogram buckets; the last bucket
// takes everything above.
inline constexpr std::array<uint64_t, 7> kLatencyBucketsMs = {1, 4, 16, 64, 256, 1024, 4096};

struct Counters {
  std::atomic<uint64_t> batches_flushed{0};
  std::atomic<uint64_t> requests_flushed{0};
  std::atomic<uint64_t> bytes_flushed{0};
  std::atomic<uint64_t> plugin_writes{0};
  std::atomic<uint64_t> writethrough_requests{0};
  std::atomic<uint64_t> bypass_writes{0};
  std::array<std::atomic<uint64_t>, static_cast<size_t>(Trigger::kCount)> by_trigger{};
  std::atomic<uint64_t> flush_errors{0};
  std::atomic<int> last_error{0};
  std::atomic<uint64_t> read_overlay_hits{0};
  std::atomic<uint64_t> peak_queued_bytes{0};
  std::atomic<uint64_t> last_flush_us{0};
  std::atomic<uint64_t> max_flush_us{0};
  std::array<std::atomic<uint64_t>, kLatencyBucketsMs.size() + 1> flush_latency_hist{};

  void RecordBatchLatency(uint64_t us);
  void RaisePeak(uint64_t queued);
};

// Ordered key/value pairs: procfs-style text or one JSON object.
using CounterList = std::vector<std::pair<std::string, std::string>>;
std::string RenderText(const CounterList& list);
std::string RenderJson(const CounterList& list);

}  // namespace sdccache
