// Counters: trigger names, latency bookkeeping, text and JSON rendering.
#include "counters.h"

namespace sdccache {

const char* TriggerName(Trigger t) {
  switch (t) {
    case Trigger::kThreshold: return "threshold";
    case Trigger::kAge: return "age";
    case Trigger::kClient: return "client";
    case Trigger::kFua: return "fua";
    case Trigger::kDisconnect: return "disconnect";
    case Trigger::kShutdown: return "shutdown";
    case Trigger::kControl: return "control";
    case Trigger::kBackpressure: return "backpressure";
    case Trigger::kRetry: return "retry";
    case Trigger::kCount: break;
  }
  return "unknown";
}

void Counters::RecordBatchLatency(uint64_t us) {
  last_flush_us.store(us, std::memory_order_relaxed);
  uint64_t prev = max_flush_us.load(std::memory_order_relaxed);
  while (us > prev && !max_flush_us.compare_exchange_weak(prev, us, std::memory_order_relaxed)) {
  }
  size_t i = 0;
  while (i < kLatencyBucketsMs.size() && us > kLatencyBucketsMs[i] * 1000) ++i;
  flush_latency_hist[i].fetch_add(1, std::memory_order_relaxed);
}

void Counters::RaisePeak(uint64_t queued) {
  uint64_t prev = peak_queued_bytes.load(std::memory_order_relaxed);
  while (queued > prev &&
         !peak_queued_bytes.compare_exchange_weak(prev, queued, std::memory_order_relaxed)) {
  }
}

std::string RenderText(const CounterList& list) {
  std::string s;
  for (const auto& [k, v] : list) s += k + ": " + v + "\n";
  return s;
}

static bool IsNumber(const std::string& v) {
  if (v.empty()) return false;
  for (char c : v)
    if (c < '0' || c > '9') return false;
  return true;
}

std::string RenderJson(const CounterList& list) {
  std::string s = "{";
  for (size_t i = 0; i < list.size(); ++i) {
    if (i) s += ", ";
    s += '"' + list[i].first + "\": ";
    const std::string& v = list[i].second;
    if (IsNumber(v)) {
      s += v;
    } else {
      s += '"';
      for (char c : v) {
        if (c == '"' || c == '\\') s += '\\';
        if (static_cast<unsigned char>(c) < 0x20) continue;
        s += c;
      }
      s += '"';
    }
  }
  return s + "}\n";
}

}  // namespace sdccache
