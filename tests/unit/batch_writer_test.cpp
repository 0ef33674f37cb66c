// BatchWriter: how many plugin requests it keeps in flight.  A plugin whose
// requests wait (remote, delayed) gets them in parallel; one whose requests
// compute (a local page cache) gets them one at a time, as more threads
// would only contend for the same cores and locks.
#include <gtest/gtest.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "await.h"
#include "process_threads.h"
#include "batch_writer.h"
#include "chunk.h"

namespace sdccache {
namespace {

// A Sink whose zeroes, trims and flushes do nothing: these tests look at
// writes only.
class WritesOnly : public Sink {
 public:
  int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
  int Trim(uint32_t, uint64_t, bool) override { return 0; }
  int Flush() override { return 0; }
};

// Records the most requests ever inside Write() at once; each request either
// sleeps or burns CPU for `cost`.
class TimedSink : public WritesOnly {
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

// Ranges of `size` bytes, `per_run` adjacent ones a run, runs a range apart;
// with `lone_first`, a lone range ahead of them (the batch's timed probe).
std::vector<DirtyRange> RunsPlan(int runs, int per_run, uint32_t size, bool lone_first) {
  std::vector<uint8_t> payload(size, 0x3c);
  std::vector<DirtyRange> plan;
  uint64_t offset = 0;
  auto add = [&] {
    DirtyRange r;
    r.offset = offset;
    r.length = size;
    r.chunk = ChunkRef(Chunk::Create(payload.data(), payload.size(), nullptr));
    plan.push_back(std::move(r));
    offset += size;
  };
  if (lone_first) {
    add();
    offset += size;
  }
  for (int i = 0; i < runs; ++i) {
    for (int k = 0; k < per_run; ++k) add();
    offset += size;  // a gap: the next run is a separate request
  }
  return plan;
}

// 16 non-adjacent 4 KiB ranges: 16 plugin requests, none coalesced.
std::vector<DirtyRange> Plan() { return RunsPlan(16, 1, 4096, false); }

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

// A plugin that fails every request (it is down): a batch stops after a
// few failures in a row instead of trying each of its requests.
TEST(BatchWriterTest, ABatchGivesUpAfterFailuresInARow) {
  class Down : public WritesOnly {
   public:
    int Write(const void*, uint32_t, uint64_t, bool) override { return EIO; }
  } sink;
  BatchWriter writer(&sink, 1, 1 << 20);
  const std::vector<DirtyRange> plan = Plan();  // 16 requests
  std::vector<char> written;
  uint64_t calls = 0;
  EXPECT_EQ(writer.Write(plan, &written, &calls), EIO);
  EXPECT_GE(calls, 2u) << "stopped at the first failure";
  EXPECT_LT(calls, plan.size()) << "tried every request of a plugin that is down";
  EXPECT_EQ(std::count(written.begin(), written.end(), 1), 0);
}

TEST(BatchWriterTest, WaitingRequestsRunInParallel) {
  TimedSink sink(true, std::chrono::microseconds(2000));
  EXPECT_GE(ParallelBatches(&sink), kBatches - 1);
}

TEST(BatchWriterTest, ComputingRequestsRunOneAtATime) {
  TimedSink sink(false, std::chrono::microseconds(2000));
  EXPECT_LE(ParallelBatches(&sink), kBatches / 4);
}

using test::ProcessThreads;

// Writes `plan`, which must reach the sink in full.
void WriteInFull(BatchWriter* writer, const std::vector<DirtyRange>& plan) {
  std::vector<char> written;
  uint64_t calls = 0;
  EXPECT_EQ(writer->Write(plan, &written, &calls), 0);
  EXPECT_EQ(std::count(written.begin(), written.end(), 1), static_cast<long>(plan.size()));
}

// Helpers start only when a latency-bound batch wants more than are idle,
// up to threads - 1 in all: an export whose plugin is CPU-bound (or that is
// never written back) costs no helper thread.
TEST(BatchWriterTest, HelpersStartOnlyWhenALatencyBoundBatchWantsThem) {
  const size_t before = ProcessThreads();
  const std::vector<DirtyRange> plan = Plan();
  ASSERT_EQ(plan.size(), 16u);
  {
    TimedSink computing(false, std::chrono::microseconds(200));
    BatchWriter writer(&computing, 8, 1 << 20);
    EXPECT_EQ(ProcessThreads(), before) << "threads started with no batch";
    for (int b = 0; b < 3; ++b) WriteInFull(&writer, plan);
    EXPECT_EQ(computing.TakeMax(), 1);
    EXPECT_EQ(writer.helpers_started(), 0u) << "helpers started for a CPU-bound plugin";
    EXPECT_EQ(ProcessThreads(), before);
  }
  TimedSink waiting(true, std::chrono::microseconds(2000));
  BatchWriter writer(&waiting, 8, 1 << 20);
  for (int b = 0; b < 3; ++b) {
    WriteInFull(&writer, plan);
    EXPECT_EQ(writer.helpers_started(), 7u) << "after batch " << b;
    EXPECT_EQ(ProcessThreads(), before + 7) << "after batch " << b;
  }
  EXPECT_GT(waiting.TakeMax(), 1);
}

// An export left with no writer stops its helpers (WriteBack::Park); the
// next latency-bound batch starts them again and is written in full.
TEST(BatchWriterTest, StoppedHelpersAreStartedAgainByTheNextBatch) {
  const size_t before = ProcessThreads();
  const std::vector<DirtyRange> plan = Plan();
  TimedSink waiting(true, std::chrono::microseconds(2000));
  BatchWriter writer(&waiting, 8, 1 << 20);
  ASSERT_EQ(plan.size(), 16u);
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    WriteInFull(&writer, plan);
    EXPECT_EQ(writer.helpers_started(), 7u) << "round " << round;
    EXPECT_EQ(ProcessThreads(), before + 7) << "round " << round;
    writer.StopHelpers();
    EXPECT_EQ(writer.helpers_started(), 0u) << "round " << round;
    test::AwaitPoll("the helpers to end", [&] { return ProcessThreads() == before; });
  }
  EXPECT_GT(waiting.TakeMax(), 1);
}

// The CPU the calling thread is on, as an affinity mask.
cpu_set_t ThisCpu() {
  cpu_set_t one;
  CPU_ZERO(&one);
  CPU_SET(sched_getcpu(), &one);
  return one;
}

// Spins on the calling thread's CPU until destroyed, never blocking.
class CpuHogs {
 public:
  explicit CpuHogs(int n) {
    const cpu_set_t one = ThisCpu();
    for (int i = 0; i < n; ++i) {
      hogs_.emplace_back([this, one] {
        pthread_setaffinity_np(pthread_self(), sizeof one, &one);
        while (!stop_.load(std::memory_order_relaxed)) {
        }
      });
    }
  }
  ~CpuHogs() {
    stop_.store(true);
    for (auto& t : hogs_) t.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::vector<std::thread> hogs_;
};

// Pins the calling thread to the CPU it is on, and unpins it when destroyed
// (also when an assertion leaves the test early).
class PinnedToThisCpu {
 public:
  PinnedToThisCpu() {
    const cpu_set_t one = ThisCpu();
    ok_ = sched_getaffinity(0, sizeof all_, &all_) == 0 &&
          sched_setaffinity(0, sizeof one, &one) == 0;
  }
  ~PinnedToThisCpu() { sched_setaffinity(0, sizeof all_, &all_); }
  bool ok() const { return ok_; }

 private:
  cpu_set_t all_;
  bool ok_ = false;
};

// A CPU-bound request that spends most of its time runnable but off the CPU
// (two other threads spin on its CPU; a hypervisor stealing the vCPU looks
// the same to the thread's clocks) did not wait: it never blocked.  Run in
// parallel, its requests would only take more of the same CPU.
TEST(BatchWriterTest, PreemptedComputingRequestsStayCpuBound) {
  PinnedToThisCpu pinned;
  ASSERT_TRUE(pinned.ok());
  TimedSink sink(false, std::chrono::microseconds(10000));
  BatchWriter writer(&sink, 8, 1 << 20);  // its helpers share the one CPU too
  std::vector<DirtyRange> plan = Plan();
  plan.resize(1);
  CpuHogs hogs(2);
  int preempted = 0;
  for (int b = 0; b < 5; ++b) {
    std::vector<char> written;
    uint64_t calls = 0;
    const auto wall_start = std::chrono::steady_clock::now();
    ASSERT_EQ(writer.Write(plan, &written, &calls), 0);
    // The premise: the request's 10 ms of CPU took over twice that long.
    if (std::chrono::steady_clock::now() - wall_start > std::chrono::milliseconds(20))
      ++preempted;
    EXPECT_FALSE(writer.latency_bound()) << "after batch " << b;
  }
  EXPECT_GE(preempted, 3);
}

// Holds each request of `gated` bytes until `want` of them are inside
// Write() at once (or `limit` has passed); other requests sleep 2 ms.
// Records the most requests of `gated` bytes ever inside at once.
class GateSink : public WritesOnly {
 public:
  GateSink(uint32_t gated, int want, std::chrono::milliseconds limit)
      : gated_(gated), want_(want), limit_(limit) {}
  int Write(const void*, uint32_t count, uint64_t, bool) override {
    if (count != gated_) {
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      return 0;
    }
    std::unique_lock<std::mutex> l(mu_);
    max_inside_ = std::max(max_inside_, ++inside_);
    if (inside_ >= want_) {
      open_ = true;
      cv_.notify_all();
    }
    cv_.wait_until(l, std::chrono::steady_clock::now() + limit_, [&] { return open_; });
    --inside_;
    ++gated_calls_;
    return 0;
  }
  int max_inside() {
    std::lock_guard<std::mutex> l(mu_);
    return max_inside_;
  }
  int gated_calls() {
    std::lock_guard<std::mutex> l(mu_);
    return gated_calls_;
  }

 private:
  const uint32_t gated_;
  const int want_;
  const std::chrono::milliseconds limit_;
  std::mutex mu_;
  std::condition_variable cv_;
  int inside_ = 0, max_inside_ = 0, gated_calls_ = 0;
  bool open_ = false;
};

// Random 4 KiB writes coalesce into small runs (two ranges here).  Against
// a plugin whose requests wait, every one of them is in flight at once, as
// single ranges are: their bounce buffers are small.  (A cap of 8 buffers
// held much of such a batch back: 1.5x slower write-back to nbdkit's delay
// filter.)
TEST(BatchWriterTest, SmallCoalescedRequestsAllRunInParallel) {
  GateSink sink(8192, 24, std::chrono::milliseconds(5000));
  BatchWriter writer(&sink, 32, 1 << 20);
  const std::vector<DirtyRange> plan = RunsPlan(32, 2, 4096, true);
  std::vector<char> written;
  uint64_t calls = 0;
  ASSERT_EQ(writer.Write(plan, &written, &calls), 0);
  EXPECT_EQ(calls, 33u);
  EXPECT_EQ(std::count(written.begin(), written.end(), 1), 65);
  EXPECT_EQ(sink.gated_calls(), 32);
  EXPECT_GE(sink.max_inside(), 24);
}

// Bounce buffers hold at most 8 MiB: 1 MiB requests (32 ranges of 32 KiB
// each) are at most 8 in flight, however many threads there are.
TEST(BatchWriterTest, CoalescedRequestsStayWithinTheBounceBudget) {
  constexpr uint32_t kMiB = 1 << 20;
  GateSink big(kMiB, 16, std::chrono::milliseconds(200));
  BatchWriter writer(&big, 16, kMiB);
  const std::vector<DirtyRange> plan = RunsPlan(16, 32, 32768, true);
  std::vector<char> written;
  uint64_t calls = 0;
  ASSERT_EQ(writer.Write(plan, &written, &calls), 0);
  EXPECT_EQ(big.gated_calls(), 16);
  EXPECT_LE(big.max_inside(), 8);
  EXPECT_GE(big.max_inside(), 2);
}

// When idle 1 MiB buffers fill the budget, small runs still get theirs:
// idle buffers of another size are freed to make room.
TEST(BatchWriterTest, IdleLargeBounceBuffersMakeRoomForSmallOnes) {
  constexpr uint32_t kMiB = 1 << 20;
  // Both plans through one writer: the first leaves 8 MiB of idle 1 MiB
  // buffers, the second needs 8 KiB ones.
  struct TwoSizes : WritesOnly {
    GateSink big{kMiB, 8, std::chrono::milliseconds(5000)};
    GateSink small{8192, 12, std::chrono::milliseconds(5000)};
    int Write(const void* b, uint32_t n, uint64_t o, bool f) override {
      return n == kMiB ? big.Write(b, n, o, f) : small.Write(b, n, o, f);
    }
  } sink;
  BatchWriter writer(&sink, 16, kMiB);
  std::vector<char> written;
  uint64_t calls = 0;
  ASSERT_EQ(writer.Write(RunsPlan(16, 32, 32768, true), &written, &calls), 0);
  ASSERT_EQ(sink.big.gated_calls(), 16);
  ASSERT_EQ(sink.big.max_inside(), 8);  // the budget was full
  ASSERT_EQ(writer.Write(RunsPlan(16, 2, 4096, true), &written, &calls), 0);
  EXPECT_EQ(sink.small.gated_calls(), 16);
  EXPECT_GE(sink.small.max_inside(), 12);
}

// Requests below kSecond belong to the first batch: they are held until
// Open(), except the first-ever request (the first batch's timed probe),
// which sleeps 2 ms.  Requests of the second batch are held until four of
// them are inside Write() at once, or until 2 s after Open().
class TwoBatchSink : public WritesOnly {
 public:
  static constexpr uint64_t kSecond = 1 << 30;
  int Write(const void*, uint32_t, uint64_t offset, bool) override {
    std::unique_lock<std::mutex> l(mu_);
    if (!probed_) {
      probed_ = true;
      l.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      return 0;
    }
    const bool first = offset < kSecond;
    int& inside = first ? first_inside_ : second_inside_;
    ++inside;
    second_max_ = std::max(second_max_, second_inside_);
    if (second_inside_ >= 4) second_open_ = true;
    cv_.notify_all();
    if (first) {
      test::Await(cv_, l, "the first batch's release", [&] { return open_; });
    } else {
      // Counted from Open(): helpers join only once the first batch ends.
      cv_.wait_for(l, std::chrono::seconds(10), [&] { return second_open_ || open_; });
      cv_.wait_until(l, opened_at_ + std::chrono::seconds(2), [&] { return second_open_; });
    }
    --inside;
    return 0;
  }
  // Waits (up to 5 s) until `n` requests of the first (or second) batch are
  // inside Write() at once.
  bool AwaitInside(bool first, int n) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, std::chrono::seconds(5),
                        [&] { return (first ? first_inside_ : second_inside_) >= n; });
  }
  void Open() {
    std::lock_guard<std::mutex> l(mu_);
    open_ = true;
    opened_at_ = std::chrono::steady_clock::now();
    cv_.notify_all();
  }
  int second_max() {
    std::lock_guard<std::mutex> l(mu_);
    return second_max_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool probed_ = false, open_ = false, second_open_ = false;
  std::chrono::steady_clock::time_point opened_at_;
  int first_inside_ = 0, second_inside_ = 0, second_max_ = 0;
};

// A batch that starts while another holds every helper starts alone, and
// the helpers join it as they finish the other: its requests do not run one
// at a time.  (Over nbdkit's delay filter, 32 ranges took 35 ms instead of
// 1.5, and flushes waited for them.)
TEST(BatchWriterTest, HelpersJoinABatchThatStartedWithoutThem) {
  TwoBatchSink sink;
  BatchWriter writer(&sink, 4, 1 << 20);  // the caller and 3 helpers
  const std::vector<DirtyRange> first = RunsPlan(4, 1, 4096, true);  // probe + 4
  std::vector<DirtyRange> second = RunsPlan(4, 1, 4096, false);
  for (DirtyRange& r : second) r.offset += TwoBatchSink::kSecond;
  int first_err = -1;
  std::thread t([&] {
    std::vector<char> written;
    uint64_t calls = 0;
    first_err = writer.Write(first, &written, &calls);
  });
  // Every helper is in the first batch: the second batch starts alone.
  const bool held = sink.AwaitInside(true, 4);
  std::vector<char> written;
  uint64_t calls = 0;
  int second_err = -1;
  std::thread u([&] { second_err = writer.Write(second, &written, &calls); });
  const bool started = sink.AwaitInside(false, 1);
  sink.Open();
  u.join();
  t.join();
  ASSERT_TRUE(held);
  ASSERT_TRUE(started);
  EXPECT_EQ(first_err, 0);
  EXPECT_EQ(second_err, 0);
  EXPECT_EQ(calls, 4u);
  EXPECT_EQ(std::count(written.begin(), written.end(), 1), 4);
  EXPECT_GE(sink.second_max(), 4);
}

// Requests of whole batches (16 each, as Plan()) either sleep or burn CPU
// for 300 µs, batch by batch as `sleeps(batch)` says.
class PatternSink : public WritesOnly {
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
