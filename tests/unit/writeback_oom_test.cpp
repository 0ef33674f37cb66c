// A failed allocation while a request is buffered: the request fails
// (nbdkit's glue answers ENOMEM), and nothing acknowledged before it is
// lost.  One while buffered data is written back: that attempt fails like a
// plugin error, is tried again, and loses nothing either; no thread dies of
// it (an exception leaving the flusher would end nbdkit).  Its own binary:
// it replaces the global operator new (fail_new.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "await.h"
#include "batch_writer.h"
#include "chunk.h"
#include "dirty_map.h"
#include "fail_new.h"
#include "fake_sink.h"
#include "writeback.h"

namespace sdccache {
namespace {

std::string ReadThrough(WriteBack& wb, FakeSink& sink, uint64_t off, uint64_t len) {
  Overlay ov = wb.Lookup(off, len);
  std::vector<uint8_t> disk = sink.Disk();
  std::string buf(disk.begin() + off, disk.begin() + off + len);
  ov.ApplyTo(reinterpret_cast<uint8_t*>(buf.data()));
  return buf;
}

TEST(WriteBackOomTest, AFailedInsertKeepsOlderAcknowledgedData) {
  FakeSink sink(1 << 20);
  std::future<int> flush;  // destroyed after wb, whose Stop() would end a hung flush
  WriteBackOptions o;
  o.threshold = 1000;
  o.max_age = std::chrono::milliseconds(0);
  o.bypass_min = 0;
  WriteBack wb(&sink, o);
  const std::string a(100, 'a');
  ASSERT_EQ(wb.Write(a.data(), 100, 0, false), 0);  // acknowledged
  const uint64_t used_before = wb.memory_bytes();
  // A write into its middle cuts [0,+100) into a head and a tail: the first
  // allocation of that insert fails.
  fail_next_new = true;
  bool threw = false;
  try {
    wb.Write("BBBBBBBBBBBBBBBBBBBB", 20, 40, false);
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  fail_next_new = false;
  ASSERT_TRUE(threw) << "no allocation failed: the test does not test anything";
  EXPECT_EQ(ReadThrough(wb, sink, 0, 100), a) << "acknowledged data lost";
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(wb.queued_bytes(), 100u);
  EXPECT_EQ(wb.memory_bytes(), used_before) << "the failed request's charges kept";
  // The failed request took no place in the order of requests: a flush
  // waits for the first one only.
  flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  ASSERT_EQ(flush.wait_for(std::chrono::seconds(10)), std::future_status::ready)
      << "a flush after the failed insert hangs";
  EXPECT_EQ(test::Get(flush, "flush"), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 100), a);
}

// Buffers, in `wb` and in `model`, writes that leave several ranges: two
// adjacent small ones (joined into one plugin write through a bounce
// buffer), one cut by a later write, a large one, a zero and a trim.
void BufferSome(WriteBack& wb, std::string* model) {
  auto put = [&](uint64_t off, const std::string& data) {
    ASSERT_EQ(wb.Write(data.data(), static_cast<uint32_t>(data.size()), off, false), 0);
    model->replace(off, data.size(), data);
  };
  put(0, std::string(4096, 'a'));
  put(4096, std::string(4096, 'b'));
  put(65536, std::string(8192, 'c'));
  put(65536 + 1000, std::string(100, 'd'));
  put(262144, std::string(200000, 'e'));
  ASSERT_EQ(wb.Zero(4096, 16384, false, false), 0);
  model->replace(16384, 4096, 4096, '\0');
  ASSERT_EQ(wb.Trim(4096, 32768, false), 0);
  model->replace(32768, 4096, 4096, '\0');
}

// Every allocation a flush makes, on whichever thread (the client's, the
// flusher, the write helpers), is failed in turn, one per round: the flush
// fails or succeeds, the next one succeeds, and the plugin then holds
// every byte acknowledged.  With `fail_at_offset`, the plugin also refuses
// the write at that offset once, so that the failed batch's ranges go back
// under the newer ones (allocations on that path are failed too).
void SweepFlushAllocations(bool plugin_fails_once) {
  exempt = true;  // this thread buffers and checks; the flush runs elsewhere
  long k = 1;
  for (;; ++k) {
    SCOPED_TRACE("allocation " + std::to_string(k) + " failed");
    ASSERT_LT(k, 5000) << "the flush path allocates without end";
    FakeSink sink(1 << 20);
    std::future<int> flush;  // destroyed after wb, whose Stop() ends a hung flush
    WriteBackOptions o;
    o.threshold = 1000;
    o.max_age = std::chrono::milliseconds(0);
    o.bypass_min = 0;
    o.retry_min = std::chrono::milliseconds(1);
    o.retry_max = std::chrono::milliseconds(1);
    WriteBack wb(&sink, o);
    std::string model(1 << 20, '\0');
    BufferSome(wb, &model);
    if (::testing::Test::HasFatalFailure()) return;
    if (plugin_fails_once) sink.FailNext(1, EIO);
    news_counted = 0;
    fail_at = k;
    flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
    const bool done = flush.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
    fail_at = 0;
    const bool reached = news_counted.load() >= k;
    ASSERT_TRUE(done) << "a flush hangs";
    const int err = test::Get(flush, "flush");
    EXPECT_TRUE(err == 0 || err == ENOMEM || err == EIO) << "flush: " << err;
    sink.FailNext(0, 0);
    flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
    ASSERT_EQ(flush.wait_for(std::chrono::seconds(10)), std::future_status::ready)
        << "the flush after it hangs";
    EXPECT_EQ(test::Get(flush, "flush"), 0) << "the flush after it";
    const std::vector<uint8_t> disk = sink.Disk();
    ASSERT_TRUE(std::equal(disk.begin(), disk.end(), model.begin()))
        << "the plugin does not hold what was acknowledged";
    EXPECT_EQ(wb.queued_bytes(), 0u);
    if (!reached) break;  // the flush made fewer than k allocations: all were failed
  }
  std::printf("%ld allocations failed in turn\n", k - 1);
  EXPECT_GT(k, 3) << "too few allocations were failed for the test to mean anything";
}

// A failed batch goes back under what was buffered since (InsertUnder):
// both maps may hold the only copy of acknowledged data, so a failed
// allocation must change neither.  Every allocation is failed in turn,
// with few newer ranges (replayed in place) and with many (merged aside).
void SweepMergeBack(uint64_t cuts) {
  const std::vector<uint8_t> payload(4096, 7);
  auto data = [&](uint64_t offset, uint64_t length) {
    DirtyRange r;
    r.offset = offset;
    r.length = length;
    r.chunk = ChunkRef(Chunk::Create(payload.data(), payload.size(), nullptr));
    return r;
  };
  auto zero = [](uint64_t offset, uint64_t length) {
    DirtyRange r;
    r.offset = offset;
    r.length = length;
    r.kind = RangeKind::kZero;
    return r;
  };
  // 600 older ranges (several index leaves); `cuts` newer ones, each
  // cutting one (a head and a tail left: leaves split), and 10 more
  // spanning several.
  auto build = [&](DirtyMap* older, DirtyMap* newer) {
    for (uint64_t i = 0; i < 600; ++i)
      older->Insert(i % 3 ? data(i * 1000, 500) : zero(i * 1000, 500));
    for (uint64_t i = 0; i < cuts; ++i) newer->Insert(data(i * 1000 + 100, 100));
    for (uint64_t i = 0; i < 10; ++i) newer->Insert(data(160000 + i * 12000 + 250, 4000));
  };
  std::string merged;
  {
    exempt = true;
    DirtyMap older, newer;
    build(&older, &newer);
    newer.InsertUnder(std::move(older));
    merged = newer.ToString();
  }
  long k = 1;
  for (;; ++k) {
    SCOPED_TRACE("allocation " + std::to_string(k) + " failed");
    ASSERT_LT(k, 1000) << "a merge allocates without end";
    exempt = true;
    DirtyMap older, newer;
    build(&older, &newer);
    const std::string older_before = older.ToString(), newer_before = newer.ToString();
    const uint64_t older_bytes = older.total_bytes(), newer_bytes = newer.total_bytes();
    bool threw = false;
    news_counted = 0;
    fail_at = k;
    exempt = false;
    try {
      newer.InsertUnder(std::move(older));
    } catch (const std::bad_alloc&) {
      threw = true;
    }
    exempt = true;
    fail_at = 0;
    const bool reached = news_counted.load() >= k;
    EXPECT_EQ(threw, reached);
    if (threw) {
      ASSERT_EQ(older.ToString(), older_before) << "the older map changed";
      ASSERT_EQ(newer.ToString(), newer_before) << "the newer map changed";
      EXPECT_EQ(older.total_bytes(), older_bytes);
      EXPECT_EQ(newer.total_bytes(), newer_bytes);
    } else {
      EXPECT_EQ(newer.ToString(), merged);
      EXPECT_TRUE(older.empty());
      break;
    }
  }
  std::printf("%ld allocations failed in turn\n", k - 1);
  EXPECT_GT(k, 4) << "too few allocations were failed for the test to mean anything";
}

TEST(WriteBackOomTest, AFailedMergeBackOfFewNewerRangesChangesNeitherMap) {
  SweepMergeBack(100);
}

TEST(WriteBackOomTest, AFailedMergeBackOfManyNewerRangesChangesNeitherMap) {
  SweepMergeBack(500);
}

// A failed batch that waits, out of memory, to be merged back (mu_ is
// dropped meanwhile) still holds its data: queued_bytes counts it.  It
// fell to 0 (queued_zero_bytes rose by as much) while nothing was
// written.  Every allocation of the flush is failed in turn.
TEST(WriteBackOomTest, QueuedBytesCountAFailedBatchWaitingToMergeBack) {
  exempt = true;  // this thread buffers and watches; the batch runs on another
  const std::string data(4096, 'a');
  long k = 1;
  for (;; ++k) {
    SCOPED_TRACE("allocation " + std::to_string(k) + " failed");
    ASSERT_LT(k, 300) << "a flush allocates without end";
    FakeSink sink(1 << 20);
    std::future<int> flush;  // destroyed after wb
    WriteBackOptions o;
    o.threshold = 1000;
    o.max_age = std::chrono::milliseconds(0);
    o.bypass_min = 0;
    o.retry_min = std::chrono::milliseconds(5000);  // no retry meanwhile
    o.retry_max = std::chrono::milliseconds(5000);
    WriteBack wb(&sink, o);
    for (int i = 0; i < 8; ++i) ASSERT_EQ(wb.Write(data.data(), 4096, i * 8192, false), 0);
    sink.Fail(EIO);  // every write fails: nothing leaves the buffer
    sink.Hold();
    news_counted = 0;
    fail_at = k;
    flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
    uint64_t lowest = UINT64_MAX;
    bool newer = false;
    while (flush.wait_for(std::chrono::microseconds(200)) != std::future_status::ready) {
      lowest = std::min(lowest, wb.queued_bytes());
      if (!newer && sink.writes_started() > 0) {
        // Writes while the batch runs: the failed batch goes back under
        // them (needing more index leaves than it keeps spare).
        for (int i = 8; i < 12; ++i) ASSERT_EQ(wb.Write(data.data(), 4096, i * 8192, false), 0);
        newer = true;
        sink.Release();
      }
    }
    sink.Release();
    fail_at = 0;
    const bool reached = news_counted.load() >= k;
    test::Get(flush, "flush");
    lowest = std::min(lowest, wb.queued_bytes());
    EXPECT_GE(lowest, 8u * 4096) << "queued_bytes fell while nothing was written";
    EXPECT_EQ(wb.queued_bytes(), (newer ? 12u : 8u) * 4096);
    sink.Fail(0);
    if (!reached) break;
  }
  EXPECT_GT(k, 4) << "too few allocations were failed for the test to mean anything";
}

// A plugin whose requests wait (1 ms): batches get helper threads.
class WaitingSink : public Sink {
 public:
  int Write(const void* buf, uint32_t count, uint64_t offset, bool) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    std::lock_guard<std::mutex> l(mu_);
    const auto* p = static_cast<const uint8_t*>(buf);
    for (uint32_t i = 0; i < count; ++i) disk_[offset + i] = p[i];
    return 0;
  }
  int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
  int Trim(uint32_t, uint64_t, bool) override { return 0; }
  int Flush() override { return 0; }
  uint8_t At(uint64_t offset) {
    std::lock_guard<std::mutex> l(mu_);
    return disk_[offset];
  }

 private:
  std::mutex mu_;
  uint8_t disk_[1 << 20] = {};
};

// `n` ranges of 4 KiB filled with `fill`, adjacent in pairs (`paired`:
// each pair is joined into one plugin write through a bounce buffer) or
// all apart.
std::vector<DirtyRange> Ranges(int n, bool paired, uint8_t fill) {
  const std::vector<uint8_t> payload(4096, fill);
  std::vector<DirtyRange> plan;
  for (int i = 0; i < n; ++i) {
    DirtyRange r;
    r.offset = paired ? (i / 2) * 3 * 4096 + (i % 2) * 4096 : i * 2 * 4096;
    r.length = 4096;
    r.chunk = ChunkRef(Chunk::Create(payload.data(), payload.size(), nullptr));
    plan.push_back(std::move(r));
  }
  return plan;
}

// `n` adjacent ranges of `size` bytes filled with `fill`, from offset 0:
// joined into runs of up to max_write, through bounce buffers.
std::vector<DirtyRange> AdjacentRanges(int n, uint32_t size, uint8_t fill) {
  const std::vector<uint8_t> payload(size, fill);
  std::vector<DirtyRange> plan;
  for (int i = 0; i < n; ++i) {
    DirtyRange r;
    r.offset = static_cast<uint64_t>(i) * size;
    r.length = size;
    r.chunk = ChunkRef(Chunk::Create(payload.data(), payload.size(), nullptr));
    plan.push_back(std::move(r));
  }
  return plan;
}

// Out of memory while it writes a batch, BatchWriter either throws before
// it has written anything, or fails the request that wanted the memory
// (ENOMEM) and goes on; no thread dies of it.  Every range it reports
// written is in the plugin.  Every allocation a batch with helper threads
// makes, on its own thread or a helper's, is failed in turn.
TEST(WriteBackOomTest, ABatchOutOfMemoryThrowsBeforeWritingOrFailsARequest) {
  exempt = true;  // warms up the writer; the batch runs on another thread
  long k = 1;
  for (;; ++k) {
    SCOPED_TRACE("allocation " + std::to_string(k) + " failed");
    ASSERT_LT(k, 1000) << "a batch allocates without end";
    WaitingSink sink;
    BatchWriter writer(&sink, 8, 1 << 20);
    // Apart, the warm-up's ranges take no bounce buffer.
    const std::vector<DirtyRange> warm = Ranges(16, false, 1);
    for (int b = 0; b < 50 && !writer.latency_bound(); ++b) {
      std::vector<char> written;
      uint64_t calls = 0;
      ASSERT_EQ(writer.Write(warm, &written, &calls), 0);
    }
    ASSERT_TRUE(writer.latency_bound()) << "no helpers: the test would test nothing";
    const std::vector<DirtyRange> plan = Ranges(32, true, 2);
    std::vector<char> written;
    uint64_t calls = 0;
    bool threw = false;
    news_counted = 0;
    fail_at = k;
    std::future<int> write = std::async(std::launch::async, [&] {
      try {
        return writer.Write(plan, &written, &calls);
      } catch (const std::bad_alloc&) {
        threw = true;
        return ENOMEM;
      }
    });
    ASSERT_EQ(write.wait_for(std::chrono::seconds(10)), std::future_status::ready)
        << "a batch hangs";
    const int err = test::Get(write, "write");
    fail_at = 0;
    const bool reached = news_counted.load() >= k;
    EXPECT_TRUE(err == 0 || err == ENOMEM) << err;
    if (threw) {
      for (const DirtyRange& r : plan)
        EXPECT_NE(sink.At(r.offset), 2) << "threw after writing [" << r.offset << ",+4096)";
    } else {
      ASSERT_EQ(written.size(), plan.size());
      for (size_t i = 0; i < plan.size(); ++i) {
        if (!written[i]) continue;
        EXPECT_EQ(sink.At(plan[i].offset), 2) << "range " << i << " said written, is not";
        EXPECT_EQ(sink.At(plan[i].end() - 1), 2) << "range " << i << " said written, is not";
      }
    }
    if (!reached) {
      EXPECT_EQ(err, 0);
      EXPECT_EQ(std::count(written.begin(), written.end(), 1), 32);
      break;
    }
  }
  std::printf("%ld allocations failed in turn\n", k - 1);
  EXPECT_GT(k, 4) << "too few allocations were failed for the test to mean anything";
}

// Coalesced runs of 1 MiB while allocations of 1 MiB fail (an address-space
// limit fails large ones first).  A bounce buffer that could not be had left
// its charge against the 8 MiB budget: one batch of eight such runs failed
// them all, and every later batch waited for room for ever, memory back or
// not (flushes and SIGTERM hung; SIGKILL lost the data).  And while the
// copy could not be had, nothing was written at all.  Now such a run is
// written range by range, and the budget is intact afterwards.
TEST(WriteBackOomTest, CoalescedRunsAreWrittenWithoutABounceBuffer) {
  exempt = true;
  FakeSink sink(8 << 20);
  BatchWriter writer(&sink, 1, 1 << 20);
  const std::vector<DirtyRange> plan = AdjacentRanges(8 * 32, 32768, 3);  // 8 runs of 1 MiB
  auto write_async = [&](std::vector<char>* written, uint64_t* calls) {
    return std::async(std::launch::async,
                      [&, written, calls] { return writer.Write(plan, written, calls); });
  };
  std::vector<char> written;
  uint64_t calls = 0;
  fail_from_size = 1 << 20;
  std::future<int> write = write_async(&written, &calls);
  const bool done = write.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  fail_from_size = 0;
  if (!done) {  // the future's destructor would wait for it
    std::fprintf(stderr, "FAIL: a batch hangs out of memory\n");
    std::_Exit(1);
  }
  EXPECT_EQ(test::Get(write, "write"), 0) << "nothing written while the copy could not be had";
  EXPECT_EQ(std::count(written.begin(), written.end(), 1), 8 * 32);
  EXPECT_EQ(calls, 8u * 32) << "range by range";
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::count(disk.begin(), disk.end(), 3), 8 << 20) << "not all written";
  // Memory back: the runs are joined again, within the whole budget.
  written.clear();
  calls = 0;
  write = write_async(&written, &calls);
  if (write.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    // Nothing can end that wait, and the future's destructor would wait
    // for it: fail the binary here, in bounded time.
    std::fprintf(stderr, "FAIL: the batch after it waits for bounce buffers that do not exist\n");
    std::_Exit(1);
  }
  EXPECT_EQ(test::Get(write, "write"), 0);
  EXPECT_EQ(calls, 8u);
}

// A bounce buffer that cannot be kept for reuse (no memory for its place
// in the idle lists) was freed but stayed charged: eight such 1 MiB ones
// held the whole budget, and every later batch waited for ever.
TEST(WriteBackOomTest, ABounceBufferThatCannotBeKeptIsUncharged) {
  exempt = true;
  // Fails the first allocation the writing thread makes after each plugin
  // write: ReleaseBounce's.
  struct FailAfterWrite : FakeSink {
    using FakeSink::FakeSink;
    int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override {
      const int err = FakeSink::Write(buf, count, offset, fua);
      if (arm) {
        news_counted = 0;
        fail_at = 1;
      }
      return err;
    }
    std::atomic<bool> arm{false};
  } sink(1 << 20);
  BatchWriter writer(&sink, 1, 1 << 20);
  const std::vector<DirtyRange> plan = AdjacentRanges(32, 32768, 4);  // one run of 1 MiB
  auto write = [&] {
    std::future<int> f = std::async(std::launch::async, [&] {
      std::vector<char> written;
      uint64_t calls = 0;
      return writer.Write(plan, &written, &calls);
    });
    if (f.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      std::fprintf(stderr, "FAIL: a batch waits for bounce buffers that do not exist\n");
      std::_Exit(1);  // the future's destructor would wait for it
    }
    return test::Get(f, "f");
  };
  sink.arm = true;
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(write(), 0) << "round " << i << ": the write succeeded, keeping its buffer did not";
    fail_at = 0;
  }
  sink.arm = false;
  EXPECT_EQ(write(), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::count(disk.begin(), disk.end(), 4), 1 << 20);
}

// While memory stays short, failed attempts back off like failed plugin
// calls: a flush that failed for it left the flusher asked to write at
// once, and it tried again without pause, thousands of times a second.
TEST(WriteBackOomTest, AttemptsOutOfMemoryBackOff) {
  exempt = true;
  FakeSink sink(1 << 20);
  std::future<int> flush;  // destroyed after wb
  WriteBackOptions o;
  o.threshold = 1000;
  o.max_age = std::chrono::milliseconds(0);
  o.retry_min = std::chrono::milliseconds(10);
  o.retry_max = std::chrono::milliseconds(1000);
  WriteBack wb(&sink, o);
  const std::string a(4096, 'a');
  ASSERT_EQ(wb.Write(a.data(), 4096, 0, false), 0);
  fail_all = true;
  flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  const bool done = flush.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  // A write (this thread's allocations do not fail) wakes the flusher.
  wb.SetThreshold(1);
  ASSERT_EQ(wb.Write(a.data(), 4096, 8192, false), 0);
  // Over 300 ms, backoff allows a handful of attempts (10, 20, 40, 80,
  // 160 ms apart); without it, the flusher makes thousands.
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(300);
  while (std::chrono::steady_clock::now() < until) std::this_thread::yield();
  const uint64_t attempts = wb.counters().flush_errors.load();
  fail_all = false;
  ASSERT_TRUE(done) << "a flush hangs";
  EXPECT_EQ(test::Get(flush, "flush"), ENOMEM);
  EXPECT_GE(attempts, 1u);
  EXPECT_LE(attempts, 20u) << "attempts out of memory do not back off";
  std::printf("%llu attempts in 300 ms\n", static_cast<unsigned long long>(attempts));
  flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  ASSERT_EQ(flush.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_EQ(test::Get(flush, "flush"), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 4096), a);
  EXPECT_EQ(std::string(disk.begin() + 8192, disk.begin() + 8192 + 4096), a);
}

TEST(WriteBackOomTest, AFailedAllocationWhileWritingBackLosesNothing) {
  SweepFlushAllocations(/*plugin_fails_once=*/false);
}

TEST(WriteBackOomTest, AFailedAllocationAfterAPluginFailureLosesNothing) {
  SweepFlushAllocations(/*plugin_fails_once=*/true);
}

}  // namespace
}  // namespace sdccache
