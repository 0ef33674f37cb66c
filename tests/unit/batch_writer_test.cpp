// BatchWriter: how many plugin requests it keeps in flight.  A plugin whose
// requests wait (remote, delayed) gets them in parallel; one whose requests
// compute (a local page cache) gets them one at a time, as more threads
// would only contend for the same cores and locks.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
#include <functional>
#include <thread>
#include <vector>

#include "batch_writer.h"
#include "chunk.h"

namespace sdccache {
namespace {

// Records the most requests ever inside Write() at once; each request either
// sleeps or burns CPU for `cost`.
class TimedSink : public Sink {
 public:
  TimedSink(bool sleeps, std::chrono::microseconds cost) : sleeps_(sleeps), cost_(cost) {}
  int Write(const void*, uint32_t, uint64_t, bool) override {
    const int now = ++inside_;
    int seen = max_inside_.load();
    while (now > seen && !max_inside_.compare_exchange_weak(seen, now)) {
    }
    if (sleeps_) {
      std::this_thread::sleep_for(cost_);
    } else {
      const auto until = ThreadCpu() + cost_;
      while (ThreadCpu() < until) {
      }
    }
    --inside_;
    return 0;
  }
  int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
  int Trim(uint32_t, uint64_t, bool) override { return 0; }
  int Flush() override { return 0; }
  int TakeMax() { return max_inside_.exchange(0); }

 private:
  static std::chrono::nanoseconds ThreadCpu() {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
  }
  const bool sleeps_;
  const std::chrono::microseconds cost_;
  std::atomic<int> inside_{0}, max_inside_{0};
};

// 16 non-adjacent 4 KiB ranges: 16 plugin requests, none coalesced.
std::vector<DirtyRange> Plan() {
  std::vector<uint8_t> payload(4096, 0x5a);
  std::vector<DirtyRange> plan;
  for (uint64_t i = 0; i < 16; ++i) {
    DirtyRange r;
    r.offset = i * 8192;
    r.length = 4096;
    r.chunk = ChunkRef(Chunk::Create(payload.data(), payload.size(), nullptr));
    plan.push_back(std::move(r));
  }
  return plan;
}

constexpr int kBatches = 10;

// Over kBatches batches, how many ran with more than one request in flight.
int ParallelBatches(TimedSink* sink) {
  BatchWriter writer(sink, 8, 1 << 20);
  const std::vector<DirtyRange> plan = Plan();
  int parallel = 0;
  for (int b = 0; b < kBatches; ++b) {
    std::vector<char> written;
    uint64_t calls = 0;
    EXPECT_EQ(writer.Write(plan, &written, &calls), 0);
    EXPECT_EQ(calls, 16u);
    EXPECT_EQ(std::count(written.begin(), written.end(), 1), 16);
    if (sink->TakeMax() > 1) ++parallel;
  }
  return parallel;
}

TEST(BatchWriterTest, WaitingRequestsRunInParallel) {
  TimedSink sink(true, std::chrono::microseconds(2000));
  EXPECT_GE(ParallelBatches(&sink), kBatches - 1);
}

TEST(BatchWriterTest, ComputingRequestsRunOneAtATime) {
  TimedSink sink(false, std::chrono::microseconds(2000));
  // A request preempted on a loaded machine can look like a waiting one now
  // and then (the smoothing absorbs one such probe, not several in a row).
  EXPECT_LE(ParallelBatches(&sink), kBatches / 4);
}

// Requests of whole batches (16 each, as Plan()) either sleep or burn CPU
// for 300 µs, batch by batch as `sleeps(batch)` says.
class PatternSink : public Sink {
 public:
  explicit PatternSink(std::function<bool(uint64_t)> sleeps) : sleeps_(std::move(sleeps)) {}
  int Write(const void*, uint32_t, uint64_t, bool) override {
    constexpr auto kCost = std::chrono::microseconds(300);
    if (sleeps_(calls_++ / 16)) {
      std::this_thread::sleep_for(kCost);
    } else {
      struct timespec ts;
      auto cpu = [&] {
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
        return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
      };
      const auto until = cpu() + kCost;
      while (cpu() < until) {
      }
    }
    return 0;
  }
  int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
  int Trim(uint32_t, uint64_t, bool) override { return 0; }
  int Flush() override { return 0; }

 private:
  std::function<bool(uint64_t)> sleeps_;
  std::atomic<uint64_t> calls_{0};
};

// A local file's writes sleep now and then, in bursts (inode lock,
// page-cache throttling): that must not make it look latency-bound, which
// would give it parallel requests and no bypass.  Here two batches in four
// wait, in pairs.
TEST(BatchWriterTest, BurstsOfWaitingKeepACpuBoundPluginCpuBound) {
  PatternSink sink([](uint64_t batch) { return batch > 0 && batch % 4 >= 2; });
  BatchWriter writer(&sink, 8, 1 << 20);
  const std::vector<DirtyRange> plan = Plan();
  for (int b = 0; b < 32; ++b) {
    std::vector<char> written;
    uint64_t calls = 0;
    ASSERT_EQ(writer.Write(plan, &written, &calls), 0);
    EXPECT_FALSE(writer.latency_bound()) << "after batch " << b;
  }
}

// A CPU-bound plugin that starts to wait on most requests (a remote one
// whose network slowed down) is found latency-bound within 16 batches.
TEST(BatchWriterTest, PluginThatNowWaitsTurnsLatencyBound) {
  PatternSink sink([](uint64_t batch) { return batch >= 4; });
  BatchWriter writer(&sink, 8, 1 << 20);
  const std::vector<DirtyRange> plan = Plan();
  int turned = -1;
  for (int b = 0; b < 24 && turned < 0; ++b) {
    std::vector<char> written;
    uint64_t calls = 0;
    ASSERT_EQ(writer.Write(plan, &written, &calls), 0);
    if (b == 3) {
      EXPECT_FALSE(writer.latency_bound());
    }
    if (writer.latency_bound()) turned = b;
  }
  EXPECT_GE(turned, 4);
  EXPECT_LE(turned, 4 + 16);
}

}  // namespace
}  // namespace sdccache
