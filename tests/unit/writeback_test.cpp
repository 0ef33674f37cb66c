// WriteBack against FakeSink: triggers, epochs, errors, backpressure.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <future>
#include <string>
#include <thread>

#include "await.h"
#include "process_threads.h"
#include "fake_sink.h"
#include "writeback.h"

namespace sdccache {
namespace {

using std::chrono::milliseconds;

constexpr size_t kDisk = 1 << 20;

WriteBackOptions Opts(uint32_t threshold, uint64_t queue_max = 64 << 20) {
  WriteBackOptions o;
  o.threshold = threshold;
  o.queue_max_bytes = queue_max;
  o.max_age = milliseconds(0);
  o.retry_min = milliseconds(1);
  o.retry_max = milliseconds(5);
  return o;
}

// Opts with every write buffered: none goes straight to the plugin for
// being large (WriteBypass), only for finding no room.
WriteBackOptions BufferedOpts(uint32_t threshold, uint64_t queue_max = 64 << 20) {
  WriteBackOptions o = Opts(threshold, queue_max);
  o.bypass_min = 0;
  return o;
}

void AwaitEmptyQueue(WriteBack& wb) {
  test::AwaitPoll("the queue to empty", [&] { return wb.queued_requests() == 0; });
}

// A counter from Stats(), by name.
uint64_t StatOf(WriteBack& wb, const std::string& key) {
  for (const auto& [k, v] : wb.Stats())
    if (k == key) return std::stoull(v);
  ADD_FAILURE() << "no counter " << key;
  return 0;
}

std::string ReadThrough(WriteBack& wb, FakeSink& sink, uint64_t off, uint64_t len) {
  Overlay ov = wb.Lookup(off, len);  // before the plugin read, as the glue does
  std::vector<uint8_t> disk = sink.Disk();
  std::string buf(disk.begin() + off, disk.begin() + off + len);
  ov.ApplyTo(reinterpret_cast<uint8_t*>(buf.data()));
  return buf;
}

TEST(WriteBackTest, ReadsSeeBufferedWritesBeforeTheyAreWritten) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("hello", 5, 100, false), 0);
  ASSERT_EQ(wb.Write("J", 1, 101, false), 0);
  EXPECT_EQ(ReadThrough(wb, sink, 99, 7), std::string("\0hJllo\0", 7));
  EXPECT_EQ(sink.writes(), 0u);
  EXPECT_EQ(wb.queued_requests(), 2u);
  EXPECT_EQ(wb.queued_bytes(), 5u);
}

TEST(WriteBackTest, DeepQueueWritesReadBackAndLandIntact) {
  // Thousands of buffered writes (pooled buffers, a many-leaf index): what
  // reads see and what reaches the plugin must be the same bytes.
  constexpr size_t kBlocks = 3 * 1024, kBlock = 4096;  // 12 MiB
  FakeSink sink(kBlocks * kBlock);
  WriteBack wb(&sink, Opts(1u << 30));
  std::string block(kBlock, 0);
  auto fill = [&](size_t b) {  // block number b in every 8 bytes
    for (size_t i = 0; i < kBlock; i += sizeof b) std::memcpy(&block[i], &b, sizeof b);
  };
  for (size_t b = 0; b < kBlocks; ++b) {
    fill(b);
    ASSERT_EQ(wb.Write(block.data(), kBlock, b * kBlock, false), 0);
  }
  ASSERT_EQ(wb.queued_bytes(), kBlocks * kBlock);
  ASSERT_EQ(sink.writes(), 0u);
  for (size_t b : {size_t{0}, size_t{1000}, size_t{2047}, size_t{2048}, kBlocks - 1}) {
    fill(b);
    EXPECT_EQ(ReadThrough(wb, sink, b * kBlock, kBlock), block) << "block " << b;
  }
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  for (size_t b = 0; b < kBlocks; ++b) {
    fill(b);
    ASSERT_EQ(std::memcmp(disk.data() + b * kBlock, block.data(), kBlock), 0) << "block " << b;
  }
}

TEST(WriteBackTest, ThresholdStartsABatchWithoutFlush) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(3));
  std::string block(4096, 'x');
  for (int i = 0; i < 2; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 8192, false), 0);
  EXPECT_EQ(wb.queued_requests(), 2u);
  ASSERT_EQ(wb.Write(block.data(), 4096, 2 * 8192, false), 0);
  // The batch runs in the background; wait for its effect, not for time.
  sink.AwaitWritesStarted(3);
  AwaitEmptyQueue(wb);
  EXPECT_EQ(sink.writes(), 3u);
  EXPECT_EQ(sink.flushes(), 0u);
  EXPECT_EQ(wb.counters().batches_flushed.load(), 1u);
}

// A threshold batch starts `gather` after the threshold is reached, so that
// requests still arriving (a sequential stream's next writes) join it and
// coalesce; a client flush does not wait for that window.
TEST(WriteBackTest, ThresholdBatchGathersLateRequests) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(4);
  o.gather = std::chrono::milliseconds(300);
  WriteBack wb(&sink, o);
  std::string block(4096, 'g');
  for (int i = 0; i < 4; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 4096, false), 0);
  // Threshold reached: nothing is written for a good part of the window...
  EXPECT_FALSE(sink.WritesStartWithin(1, std::chrono::milliseconds(100)));
  // ...so a request arriving meanwhile joins the batch.
  ASSERT_EQ(wb.Write(block.data(), 4096, 4 * 4096, false), 0);
  sink.AwaitWrites(1);
  AwaitEmptyQueue(wb);
  EXPECT_EQ(sink.writes(), 1u);
  EXPECT_EQ(sink.max_write(), 5u * 4096);
  EXPECT_EQ(wb.counters().batches_flushed.load(), 1u);
}

TEST(WriteBackTest, FlushDoesNotWaitForTheGatherWindow) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(2);
  o.gather = std::chrono::hours(1);
  WriteBack wb(&sink, o);
  ASSERT_EQ(wb.Write("a", 1, 0, false), 0);
  ASSERT_EQ(wb.Write("b", 1, 1, false), 0);  // threshold reached, batch an hour away
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);  // bounded by the test's own timeout
  EXPECT_EQ(sink.Disk()[1], 'b');
}

TEST(WriteBackTest, BatchLeavesOverlayOnlyWhenWritten) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1));
  sink.Hold();
  ASSERT_EQ(wb.Write("old", 3, 0, false), 0);
  sink.AwaitWritesStarted(1);  // batch is in flight, held in the plugin
  EXPECT_EQ(wb.DebugString(), " | [0,+3)D");
  EXPECT_EQ(ReadThrough(wb, sink, 0, 3), "old");
  // Newer writes go to the next batch and win over the one in flight.
  ASSERT_EQ(wb.Write("N", 1, 1, false), 0);
  EXPECT_EQ(ReadThrough(wb, sink, 0, 3), "oNd");
  sink.Release();
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.DebugString(), " | ");
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 3), "oNd");
  EXPECT_GE(sink.flushes(), 1u);
}

TEST(WriteBackTest, FailedBatchMergesBackUnderNewerWrites) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1));
  sink.Fail(EIO);
  sink.Hold();
  ASSERT_EQ(wb.Write("AAAA", 4, 0, false), 0);
  sink.AwaitWritesStarted(1);
  ASSERT_EQ(wb.Write("BB", 2, 2, false), 0);  // newer, overlaps the failing batch
  sink.Release();
  // The flush reports the plugin's errno while the plugin fails...
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  EXPECT_EQ(ReadThrough(wb, sink, 0, 4), "AABB");
  EXPECT_GE(wb.counters().flush_errors.load(), 1u);
  EXPECT_GE(wb.counters().by_trigger[static_cast<size_t>(Trigger::kRetry)].load(), 1u);
  // ...and succeeds once it recovers, with the newer data on top.
  sink.Fail(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 4), "AABB");
  EXPECT_EQ(wb.queued_requests(), 0u);
}

TEST(WriteBackTest, FailedBatchRetiresTheRangesItWrote) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = o.retry_max = std::chrono::seconds(60);  // only Flush() retries
  o.write_threads = 1;  // requests in order: "low" is written before "high" fails
  WriteBack wb(&sink, o);
  sink.FailFrom(65536, EIO);
  ASSERT_EQ(wb.Write("low", 3, 0, false), 0);
  ASSERT_EQ(wb.Write("high", 4, 65536, false), 0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  // "low" reached the plugin and left the overlay; "high" is kept.
  EXPECT_EQ(wb.DebugString(), "[65536,+4)D | ");
  EXPECT_EQ(sink.Disk()[0], 'l');
  sink.FailFrom(0, 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.Disk()[65536], 'h');
}

// A range the plugin refuses for good (past a size that shrank, or not
// aligned as a filter below demands) fails every batch it is in.  It must
// not hold back the ranges after it, nor (without multi-conn, where a
// batch's writes are kept until a flush covers them) the ones it was
// written with: those are written, flushed and retired, and only the
// refused range stays buffered.
TEST(WriteBackTest, ARangeThePluginRefusesHoldsBackNoOther) {
  for (bool flush_before_release : {false, true}) {
    SCOPED_TRACE(flush_before_release ? "without multi-conn" : "multi-conn");
    FakeSink sink(kDisk);
    WriteBackOptions o = Opts(1000);
    o.retry_min = o.retry_max = std::chrono::seconds(60);  // only Flush() retries
    o.write_threads = 1;  // requests in offset order: the refused one first
    o.flush_before_release = flush_before_release;
    WriteBack wb(&sink, o);
    sink.FailAt(0, EINVAL);
    ASSERT_EQ(wb.Write("bad", 3, 0, false), 0);
    constexpr int kGood = 20;  // more than BatchWriter's failures in a row
    for (int i = 1; i <= kGood; ++i) ASSERT_EQ(wb.Write("good", 4, i * 8192, false), 0);
    EXPECT_EQ(wb.Flush(Trigger::kClient), EINVAL);
    EXPECT_EQ(wb.queued_requests(), 1u) << "ranges other than the refused one stayed buffered";
    EXPECT_EQ(StatOf(wb, "requests_flushed"), static_cast<uint64_t>(kGood));
    std::vector<uint8_t> disk = sink.Disk();
    for (int i = 1; i <= kGood; ++i)
      EXPECT_EQ(std::string(disk.begin() + i * 8192, disk.begin() + i * 8192 + 4), "good") << i;
    EXPECT_EQ(wb.Flush(Trigger::kClient), EINVAL) << "the refused range is still unwritten";
    EXPECT_EQ(ReadThrough(wb, sink, 0, 3), "bad");
    sink.FailAt(0, 0);
    ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
    EXPECT_EQ(sink.Disk()[0], 'b');
  }
}

// A batch that wrote nothing retires nothing, and counts no request as
// flushed, though overlapping requests were merged into fewer ranges: what
// stays queued (and what exit would report lost) is every request.
TEST(WriteBackTest, WhollyFailedBatchCountsNoRequestFlushed) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = o.retry_max = std::chrono::seconds(60);  // only Flush() retries
  WriteBack wb(&sink, o);
  sink.Fail(EIO);
  for (int i = 0; i < 10; ++i) ASSERT_EQ(wb.Write("same", 4, 0, false), 0);
  ASSERT_EQ(wb.Write("other", 5, 8192, false), 0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  EXPECT_EQ(StatOf(wb, "requests_flushed"), 0u) << "nothing reached the plugin";
  EXPECT_EQ(wb.queued_requests(), 11u);
  sink.Fail(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// One request split by later ones into several ranges: retiring all but
// one of them must not count more requests than the batch had (the count
// wrapped below zero, and requests_flushed went past the requests made).
TEST(WriteBackTest, PartlyFailedBatchOfSplitRequestsCountsNoMoreThanItHad) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = o.retry_max = std::chrono::seconds(60);  // only Flush() retries
  WriteBack wb(&sink, o);
  sink.FailAt(0, EINVAL);
  ASSERT_EQ(wb.Write("bad", 3, 0, false), 0);
  const std::string d(20480, 'D');
  ASSERT_EQ(wb.Write(d.data(), d.size(), 8192, false), 0);
  ASSERT_EQ(wb.Zero(4096, 12288, false, false), 0);  // splits the write
  ASSERT_EQ(wb.Zero(4096, 20480, false, false), 0);  // and again: 6 ranges of 4 requests
  EXPECT_EQ(wb.Flush(Trigger::kClient), EINVAL);
  EXPECT_EQ(wb.queued_requests(), 1u) << "only \"bad\" is left";
  EXPECT_EQ(StatOf(wb, "requests_flushed"), 3u);
  sink.FailAt(0, 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(StatOf(wb, "requests_flushed"), 4u);
}

// Without multi-conn, ranges a partly failed batch wrote leave the buffer
// only once a plugin flush has covered them: before that, another
// connection reading through its own context may not see them.
TEST(WriteBackTest, PartlyFailedBatchRetiresOnlyAfterAFlush) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = o.retry_max = std::chrono::seconds(60);  // only Flush() retries
  o.flush_before_release = true;
  WriteBack wb(&sink, o);
  sink.FailAt(0, EIO);
  sink.FailFlush(EIO);
  ASSERT_EQ(wb.Write("bad", 3, 0, false), 0);
  for (int i = 1; i <= 5; ++i) ASSERT_EQ(wb.Write("good", 4, i * 8192, false), 0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  EXPECT_EQ(wb.queued_requests(), 6u) << "ranges retired though no flush covered them";
  sink.FailFlush(0);
  const uint64_t flushes = sink.flushes();
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);  // "bad" still fails
  EXPECT_GT(sink.flushes(), flushes) << "retired without a plugin flush";
  EXPECT_EQ(wb.queued_requests(), 1u);
  sink.FailAt(0, 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

TEST(WriteBackTest, FailedPluginFlushIsReported) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
  sink.FailFlush(ENOSPC);
  EXPECT_EQ(wb.Flush(Trigger::kClient), ENOSPC);
  EXPECT_EQ(wb.Write("y", 1, 1, true), ENOSPC);  // FUA reports it too
  sink.FailFlush(0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
}

// Without multi-conn (flush_before_release), a batch leaves memory only
// once a flush covered its writes.  If a context that carried them leaves
// before the batch's flush, its last flush failing, and another flush (a
// client's flush job) is the one told of the loss, the batch's own flush
// succeeds: the batch must still count it as failed, keep its data and
// write it again.
TEST(WriteBackTest, BatchWhoseWritesWereLostBeforeItsFlushIsWrittenAgain) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.flush_before_release = true;
  WriteBack wb(&sink, o);
  ASSERT_EQ(wb.Write("abc", 3, 0, false), 0);
  sink.HoldFlush();
  auto flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  sink.AwaitFlushesStarted(1);  // the batch is written; its flush waits
  ASSERT_EQ(sink.writes(), 1u);
  sink.Lose(ENOSPC);
  sink.ReleaseFlush();
  // With the plugin's error that lost them, not one it never returned.
  EXPECT_EQ(test::Get(flush, "flush"), ENOSPC) << "a flush reported lost writes as flushed";
  EXPECT_EQ(ReadThrough(wb, sink, 0, 3), "abc");
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.writes(), 2u) << "the batch was not written again";
  EXPECT_EQ(wb.queued_bytes(), 0u);
}

// A write larger than the queue goes straight to the Sink and is kept
// nowhere.  Without multi-conn (flush_before_release) it may go through
// another connection's context, which could leave before a flush covered
// it, and which the writer's own reads do not use: it is flushed before it
// is acknowledged, and fails if its writes were lost meanwhile.
TEST(WriteBackTest, WriteThroughWithoutMultiConnIsFlushedBeforeItReturns) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000, 8192);
  o.flush_before_release = true;
  WriteBack wb(&sink, o);
  std::string big(16384, 'W');
  ASSERT_EQ(wb.Write(big.data(), 16384, 0, false), 0);
  ASSERT_EQ(wb.counters().writethrough_requests.load(), 1u);
  ASSERT_EQ(sink.flushes(), 1u) << "acknowledged a write-through no flush covered";
  // Its context leaves, the last flush failing, between its write and its
  // flush; another flush is told.
  sink.HoldFlush();
  auto write =
      std::async(std::launch::async, [&] { return wb.Write(big.data(), 16384, 16384, false); });
  sink.AwaitFlushesStarted(2);
  sink.Lose(ENOSPC);
  sink.ReleaseFlush();
  EXPECT_EQ(test::Get(write, "write"), ENOSPC)
      << "acknowledged a write-through whose write was lost (or with an error the plugin never "
         "returned)";
}

// A plugin that keeps failing: the flusher waits for each retry, even when
// the age and threshold times of what it holds are long past, instead of
// spinning until then.
TEST(WriteBackTest, FlusherSleepsWhileBackingOff) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1);
  o.max_age = milliseconds(1);
  o.retry_min = o.retry_max = milliseconds(400);
  WriteBack wb(&sink, o);
  sink.Fail(EIO);
  ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
  test::AwaitPoll("a failed batch", [&] { return wb.counters().flush_errors.load() > 0; });
  ASSERT_GE(wb.counters().flush_errors.load(), 1u);
  // The measured window: the process's CPU time over 300 ms of the 400 ms
  // backoff.  Waiting for the retry costs next to nothing; spinning, most
  // of a core.
  auto cpu = [] {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return std::chrono::seconds(ts.tv_sec) + std::chrono::nanoseconds(ts.tv_nsec);
  };
  const auto cpu_before = cpu();
  std::this_thread::sleep_for(milliseconds(300));
  const auto used = std::chrono::duration_cast<milliseconds>(cpu() - cpu_before);
  EXPECT_LT(used.count(), 100) << "the flusher spun while backing off";
  sink.Fail(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// A disconnect's flush retried until its limit (FlushUntil) is one flush
// requested by a disconnecting client, however often it is tried.
TEST(WriteBackTest, FlushRetriedUntilItsLimitIsCountedOnce) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));  // retries 1-5 ms apart
  sink.Fail(EIO);
  ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
  EXPECT_EQ(wb.FlushUntil(milliseconds(100), Trigger::kDisconnect), EIO);
  EXPECT_GE(wb.counters().flush_errors.load(), 3u) << "the flush was not retried";
  EXPECT_EQ(wb.counters().by_trigger[static_cast<size_t>(Trigger::kDisconnect)].load(), 1u);
  sink.Fail(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// FlushUntil(limit) for a disconnect, which fails with EIO: how long it took.
milliseconds FailingFlushUntil(WriteBack& wb, milliseconds limit) {
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(wb.FlushUntil(limit, Trigger::kDisconnect), EIO);
  return std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start);
}

// FlushUntil retries at the backoff's pace: each failed attempt signals
// waiters, which woke FlushUntil, whose next WaitFor kicked the flusher
// past the backoff, so attempts came in bursts (42 in 2 ms, over nbdkit).
TEST(WriteBackTest, FlushUntilRetriesAtTheBackoffsPace) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = milliseconds(20);
  o.retry_max = milliseconds(80);
  WriteBack wb(&sink, o);
  ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
  sink.Fail(EIO);
  const milliseconds spent = FailingFlushUntil(wb, milliseconds(600));
  // 20, 40, 80, 80, ... ms apart: at most 10 attempts in the 600 ms (and
  // any time spent past them), each one failed write.
  const uint64_t allowed = 4 + static_cast<uint64_t>(spent.count() / 80);
  EXPECT_GE(wb.counters().flush_errors.load(), 3u) << "the flush was not retried";
  EXPECT_LE(wb.counters().flush_errors.load(), allowed) << "attempts came faster than the backoff";
  EXPECT_LT(spent, milliseconds(600 + 80 + 200)) << "waited past its limit";
  sink.Fail(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);

  // The same when the plugin's flush fails.
  const uint64_t before = wb.counters().flush_errors.load();
  ASSERT_EQ(wb.Write("y", 1, 0, false), 0);
  sink.FailFlush(EIO);
  const milliseconds ms = FailingFlushUntil(wb, milliseconds(600));
  EXPECT_GE(wb.counters().flush_errors.load() - before, 3u) << "the flush was not retried";
  EXPECT_LE(wb.counters().flush_errors.load() - before, 4 + static_cast<uint64_t>(ms.count() / 80))
      << "plugin flushes came faster than the backoff";
  sink.FailFlush(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// FlushUntil returns at its limit: a retry the flusher started just as
// FlushUntil woke for it made it wait for the one after, a whole backoff
// past the limit (a plugin whose failing writes take a while: 3 of 18).
TEST(WriteBackTest, FlushUntilEndsAtItsLimit) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = milliseconds(150);
  o.retry_max = milliseconds(500);
  WriteBack wb(&sink, o);
  sink.SetWriteTime(milliseconds(30));
  sink.Fail(EIO);
  for (int i = 0; i < 6; ++i) {
    ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
    // The limit, and the write under way then: not another backoff.
    EXPECT_LT(FailingFlushUntil(wb, milliseconds(700)).count(), 700 + 30 + 120) << "round " << i;
  }
  sink.Fail(0);
  sink.SetWriteTime(milliseconds(0));
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// Buffered (here: with the bypass turned off), a FUA write is written and
// flushed before it returns.
TEST(WriteBackTest, FuaIsDurableBeforeReturn) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1000));
  ASSERT_EQ(wb.Write("f", 1, 10, true), 0);
  EXPECT_EQ(sink.Disk()[10], 'f');
  EXPECT_GE(sink.flushes(), 1u);
  EXPECT_EQ(wb.counters().by_trigger[static_cast<size_t>(Trigger::kFua)].load(), 1u);
}

// A FUA write with nothing acknowledged before it left to write back or
// flush goes to the plugin with FUA: one plugin call, as with no filter
// (buffered, it was copied, written and then flushed), of any size and
// to a plugin of any speed, since the client waits for it anyway.  The
// one after it too: the first made everything durable.
TEST(WriteBackTest, AFuaWriteWithNothingBeforeItToFlushGoesStraightToThePlugin) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_TRUE(wb.plugin_latency_bound());  // as before any probe
  ASSERT_EQ(wb.Write("a", 1, 0, true), 0);
  ASSERT_EQ(wb.Write("b", 1, 1, true), 0);
  EXPECT_EQ(sink.fua_writes(), 2u);
  EXPECT_EQ(sink.flushes(), 0u);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 2u);
  EXPECT_EQ(sink.Disk()[1], 'b');
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.flushes(), 0u) << "a flush with everything durable flushed the plugin";

  // Older data buffered: the FUA write is buffered, and flushed with it.
  ASSERT_EQ(wb.Write("c", 1, 2, false), 0);
  ASSERT_EQ(wb.Write("d", 1, 3, true), 0);
  EXPECT_EQ(sink.fua_writes(), 2u) << "went to the plugin before the older write";
  EXPECT_EQ(sink.flushes(), 1u);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(sink.Disk()[2], 'c');

  // Older data written back (threshold 1) but not flushed: the same.
  FakeSink unflushed(kDisk);
  WriteBack early(&unflushed, Opts(1));
  ASSERT_EQ(early.Write("e", 1, 4, false), 0);
  AwaitEmptyQueue(early);
  ASSERT_EQ(unflushed.flushes(), 0u);
  ASSERT_EQ(early.Write("f", 1, 5, true), 0);
  EXPECT_EQ(unflushed.fua_writes(), 0u) << "the older write was left unflushed";
  EXPECT_EQ(unflushed.flushes(), 1u);

  // A second FUA write while one is at the plugin: buffered, so that FUA
  // writes that come together share one plugin flush.
  FakeSink held(kDisk);
  WriteBack together(&held, Opts(1000));
  held.HoldAt(0);
  auto first = std::async(std::launch::async, [&] { return together.Write("g", 1, 0, true); });
  held.AwaitHeldAt(0);
  ASSERT_EQ(together.Write("h", 1, 8, true), 0);
  held.ReleaseAt();
  EXPECT_EQ(test::Get(first, "the first FUA write"), 0);
  EXPECT_EQ(held.fua_writes(), 1u);
  EXPECT_GE(held.flushes(), 1u);
  EXPECT_EQ(held.Disk()[8], 'h');
}

// FUA zeroes and trims (qemu's cache=writethrough sends write-zeroes with
// FUA) go straight to the plugin on the same terms as FUA writes.
TEST(WriteBackTest, AFuaZeroOrTrimWithNothingBeforeItToFlushGoesStraightToThePlugin) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("abcd", 4, 0, false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  ASSERT_EQ(sink.flushes(), 1u);
  ASSERT_EQ(wb.Zero(2, 0, false, true), 0);
  ASSERT_EQ(wb.Trim(1, 2, true), 0);
  EXPECT_EQ(sink.fua_zeroes_and_trims(), 2u);
  EXPECT_EQ(sink.flushes(), 1u) << "a FUA zero or trim was buffered, then flushed";
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 2u);
  EXPECT_EQ(wb.counters().plugin_writes.load(), 3u);  // the write-back, the zero, the trim
  const std::vector<uint8_t> want{0, 0, 0, 'd'};
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::vector<uint8_t>(disk.begin(), disk.begin() + 4), want);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.flushes(), 1u) << "a flush with everything durable flushed the plugin";

  // Older data buffered: the FUA zero is buffered, and flushed with it.
  ASSERT_EQ(wb.Write("e", 1, 5, false), 0);
  ASSERT_EQ(wb.Zero(1, 6, false, true), 0);
  EXPECT_EQ(sink.fua_zeroes_and_trims(), 2u) << "went to the plugin before the older write";
  EXPECT_EQ(sink.flushes(), 2u);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(sink.Disk()[5], 'e');

  // bypass-min=0: every request is buffered.
  FakeSink buffered(kDisk);
  WriteBack off(&buffered, BufferedOpts(1000));
  ASSERT_EQ(off.Zero(1, 0, false, true), 0);
  EXPECT_EQ(buffered.fua_zeroes_and_trims(), 0u);
  EXPECT_EQ(buffered.flushes(), 1u);

  // A zero the plugin fails is buffered, retried and flushed: it is not lost.
  FakeSink failing(kDisk);
  WriteBack retried(&failing, Opts(1000));
  ASSERT_EQ(retried.Write("x", 1, 9, false), 0);
  ASSERT_EQ(retried.Flush(Trigger::kClient), 0);
  failing.FailNext(1, EIO);
  ASSERT_EQ(retried.Zero(1, 9, false, true), 0);
  EXPECT_EQ(failing.injected(), 1u);
  EXPECT_EQ(failing.Disk()[9], 0);
  EXPECT_EQ(failing.flushes(), 2u);
  EXPECT_EQ(retried.counters().bypass_writes.load(), 0u);
  EXPECT_EQ(retried.queued_requests(), 0u);
}

// With multi-conn, writes a Sink reports lost cannot be written again (their
// batches are released once written): a loss that another flush was told
// of (the flusher's own retry, say) fails the next client flush or FUA
// request once, whatever the Sink's flush says (review: under nbdkit's
// multi-conn filter a client's flush then succeeded over a write its
// plugin connection never flushed).  Without multi-conn the engine writes
// such batches again, and says nothing.
TEST(WriteBackTest, ALossAnotherFlushWasToldOfFailsTheNextClientFlushOnce) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("a", 1, 0, false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  sink.Lose(ENOSPC);
  EXPECT_EQ(wb.Flush(Trigger::kControl), 0) << "the control socket's flush is no client's";
  EXPECT_EQ(wb.Flush(Trigger::kClient), ENOSPC);
  EXPECT_EQ(sink.losses_told(), 1u) << "the Sink would report the loss to the next flush too";
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
  sink.Lose(EIO);
  EXPECT_EQ(wb.Write("b", 1, 1, true), EIO) << "a FUA write's reply covers what came before";
  EXPECT_EQ(wb.Zero(1, 2, false, true), 0);

  FakeSink other(kDisk);
  WriteBackOptions o = Opts(1000);
  o.flush_before_release = true;
  WriteBack coherent(&other, o);
  other.Lose(ENOSPC);
  EXPECT_EQ(coherent.Flush(Trigger::kClient), 0);
}

TEST(WriteBackTest, FlushDoesNotWaitForLaterWrites) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("a", 1, 0, false), 0);
  sink.Hold();
  auto flushed = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  sink.AwaitWritesStarted(1);
  // Written while the flush is in flight: belongs to the next epoch.
  ASSERT_EQ(wb.Write("b", 1, 1, false), 0);
  sink.Release();
  EXPECT_EQ(test::Get(flushed, "flushed"), 0);
  EXPECT_EQ(sink.Disk()[0], 'a');
  EXPECT_EQ(wb.queued_requests(), 1u);  // "b" is still buffered
}

// Two client flushes: the first waits in a held plugin flush (covering
// "a"); "b" is written after that plugin flush started, then the second
// client flush is sent.  Futures are members after wb, so they are waited
// for before wb goes away.
struct TwoFlushes {
  FakeSink sink{kDisk};
  WriteBack wb{&sink, Opts(1000)};
  std::future<int> first, second;
  TwoFlushes() {
    EXPECT_EQ(wb.Write("a", 1, 0, false), 0);
    sink.HoldFlush();
    first = std::async(std::launch::async, [this] { return wb.Flush(Trigger::kClient); });
    sink.AwaitFlushesStarted(1);
    EXPECT_EQ(wb.Write("b", 1, 1, false), 0);
    second = std::async(std::launch::async, [this] { return wb.Flush(Trigger::kClient); });
  }
};

// A client flush waits for its batch and one plugin flush; the next batch
// is written while that plugin flush is still running, and the next plugin
// flush starts when it ends (one at a time: group commit).
TEST(WriteBackTest, NextBatchRunsWhileAPluginFlushIsInFlight) {
  TwoFlushes t;
  t.sink.AwaitWrites(2);  // "b" reached the plugin during the first flush
  EXPECT_EQ(t.sink.Disk()[1], 'b');
  EXPECT_EQ(t.first.wait_for(milliseconds(0)), std::future_status::timeout);
  EXPECT_EQ(t.second.wait_for(milliseconds(0)), std::future_status::timeout);
  t.sink.ReleaseFlushes(1);
  EXPECT_EQ(test::Get(t.first, "t.first"), 0);
  t.sink.AwaitFlushesStarted(2);  // the second waiter's own plugin flush
  EXPECT_EQ(t.second.wait_for(milliseconds(0)), std::future_status::timeout);
  t.sink.ReleaseFlush();
  EXPECT_EQ(test::Get(t.second, "t.second"), 0);
  EXPECT_EQ(t.sink.flushes(), 2u);
}

// A plugin flush that started before the second batch was written does not
// satisfy a flush waiting for that batch: when the later plugin flush fails,
// only the later waiter fails.
TEST(WriteBackTest, FlushThatStartedEarlierDoesNotCoverLaterWrites) {
  TwoFlushes t;
  FakeSink& sink = t.sink;
  WriteBack& wb = t.wb;
  sink.AwaitWrites(2);
  sink.ReleaseFlushes(1);  // the first plugin flush succeeds
  EXPECT_EQ(test::Get(t.first, "t.first"), 0);
  sink.AwaitFlushesStarted(2);
  EXPECT_EQ(t.second.wait_for(milliseconds(50)), std::future_status::timeout);
  sink.FailFlush(EIO);
  sink.ReleaseFlushes(1);  // the second fails
  EXPECT_EQ(test::Get(t.second, "t.second"), EIO);
  sink.FailFlush(0);
  sink.ReleaseFlush();
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.Disk()[1], 'b');
}

// Lets held writes go when a test ends early.
struct ReleaseAtOnExit {
  FakeSink& sink;
  ~ReleaseAtOnExit() { sink.ReleaseAt(); }
};

// A client flush whose batch ("a" at offset 0) is held in the plugin; a
// test then buffers more and sends a second flush.  Members go in reverse
// order: the guard lets the held write go before the futures wait for it.
struct HeldBatch {
  FakeSink sink{kDisk};
  WriteBack wb{&sink, Opts(1000)};
  std::future<int> first, second;
  ReleaseAtOnExit release{sink};
  HeldBatch() {
    EXPECT_EQ(wb.Write("a", 1, 0, false), 0);
    sink.HoldAt(0);
    first = std::async(std::launch::async, [this] { return wb.Flush(Trigger::kClient); });
    sink.AwaitWritesStarted(1);
  }
  void FlushAgain() {
    second = std::async(std::launch::async, [this] { return wb.Flush(Trigger::kClient); });
  }
};

// A flush whose requests share no byte with the batch in the plugin writes
// them at once, beside it, instead of queueing behind it; neither flush
// returns before everything it covers is written.
TEST(WriteBackTest, DisjointBatchRunsBesideAHeldOne) {
  HeldBatch t;
  FakeSink& sink = t.sink;
  ASSERT_EQ(t.wb.Write("b", 1, 4096, false), 0);
  t.FlushAgain();
  ASSERT_TRUE(sink.WritesStartWithin(2, std::chrono::seconds(10)));
  sink.AwaitWrites(1);
  EXPECT_EQ(sink.Disk()[4096], 'b');
  EXPECT_EQ(sink.Disk()[0], 0);
  EXPECT_EQ(t.first.wait_for(milliseconds(0)), std::future_status::timeout);
  EXPECT_EQ(t.second.wait_for(milliseconds(0)), std::future_status::timeout);
  EXPECT_EQ(ReadThrough(t.wb, sink, 0, 1), "a");
  sink.ReleaseAt();
  EXPECT_EQ(test::Get(t.first, "t.first"), 0);
  EXPECT_EQ(test::Get(t.second, "t.second"), 0);
  EXPECT_EQ(sink.Disk()[0], 'a');
  EXPECT_EQ(t.wb.queued_requests(), 0u);
}

// A batch that shares a byte with the one in the plugin waits for it: the
// plugin never has two writes of one byte in flight, so the newer lands last.
TEST(WriteBackTest, OverlappingBatchWaitsForTheOneInFlight) {
  HeldBatch t;
  FakeSink& sink = t.sink;
  ASSERT_EQ(t.wb.Write("bc", 2, 0, false), 0);
  t.FlushAgain();
  EXPECT_FALSE(sink.WritesStartWithin(2, milliseconds(200)));
  EXPECT_EQ(ReadThrough(t.wb, sink, 0, 2), "bc");
  sink.ReleaseAt();
  EXPECT_EQ(test::Get(t.first, "t.first"), 0);
  EXPECT_EQ(test::Get(t.second, "t.second"), 0);
  EXPECT_EQ(ReadThrough(t.wb, sink, 0, 2), "bc");
  EXPECT_EQ(sink.Disk()[0], 'b');
}

// The older of two batches in flight fails after the newer one was written:
// its data goes back under newer writes, its flush fails, and the next
// flush writes it.
TEST(WriteBackTest, OlderBatchFailingBesideANewerOneIsKept) {
  HeldBatch t;
  FakeSink& sink = t.sink;
  WriteBack& wb = t.wb;
  ASSERT_EQ(wb.Write("b", 1, 4096, false), 0);
  t.FlushAgain();
  ASSERT_TRUE(sink.WritesStartWithin(2, std::chrono::seconds(10)));
  sink.AwaitWrites(1);  // "b" is in the plugin
  sink.FailFrom(0, EIO);
  sink.ReleaseAt();     // "a" fails
  EXPECT_EQ(test::Get(t.first, "t.first"), EIO);
  EXPECT_EQ(test::Get(t.second, "t.second"), EIO);
  EXPECT_EQ(ReadThrough(wb, sink, 0, 1), "a");
  ASSERT_EQ(wb.Write("c", 1, 1, false), 0);  // newer, beside the kept "a"
  sink.FailFrom(0, 0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.Disk()[0], 'a');
  EXPECT_EQ(sink.Disk()[1], 'c');
  EXPECT_EQ(sink.Disk()[4096], 'b');
  EXPECT_EQ(wb.queued_requests(), 0u);
}

TEST(WriteBackTest, ZeroAndTrimReachThePluginInOrder) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  std::string ones(100, '1');
  ASSERT_EQ(wb.Write(ones.data(), 100, 0, false), 0);
  ASSERT_EQ(wb.Zero(10, 20, false, false), 0);
  ASSERT_EQ(wb.Write("w", 1, 25, false), 0);
  ASSERT_EQ(wb.Trim(10, 50, false), 0);
  ASSERT_EQ(wb.Write("v", 1, 55, false), 0);
  std::string want = ones;
  for (int i = 20; i < 30; ++i) want[i] = '\0';
  want[25] = 'w';
  for (int i = 50; i < 60; ++i) want[i] = '\0';
  want[55] = 'v';
  EXPECT_EQ(ReadThrough(wb, sink, 0, 100), want);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 100), want);
}

TEST(WriteBackTest, BackpressureWakesWriters) {
  FakeSink sink(kDisk);
  const uint64_t limit = 3 * WriteBack::WriteCharge(4096);
  WriteBack wb(&sink, Opts(1000, limit));
  wb.Pause();  // no threshold or half-queue batch: only a waiting writer starts one
  std::string block(4096, 'p');
  sink.Hold();
  for (int i = 0; i < 3; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 4096, false), 0);
  std::atomic<bool> done{false};
  std::thread writer([&] {
    EXPECT_EQ(wb.Write(block.data(), 4096, 3 * 4096, false), 0);
    done = true;
  });
  // The 4th write cannot fit: it starts a batch (below threshold) and
  // waits for room, which the held batch cannot make yet.
  sink.AwaitWritesStarted(1);
  test::AwaitPoll("the 4th writer to wait for room", [&] { return StatOf(wb, "backpressure_waits") > 0; });
  EXPECT_EQ(StatOf(wb, "backpressure_waits"), 1u) << "the 4th writer did not wait for room";
  EXPECT_FALSE(done.load());
  EXPECT_LE(wb.queued_bytes(), limit);
  sink.Release();
  writer.join();
  EXPECT_TRUE(done.load());
  EXPECT_GE(wb.counters().by_trigger[static_cast<size_t>(Trigger::kBackpressure)].load(), 1u);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 4 * 4096), std::string(4 * 4096, 'p'));
}

// Writes taking more than half the bound: one is buffered, and while the
// queue has no room for the next, that one goes straight to the plugin
// (nothing older overlaps it), whatever the plugin's speed.  Buffered,
// each waited for room until the one before it had been written back: a
// slow plugin saw them one at a time.  Here, with b1 held in the plugin
// (sent straight, or buffered if a's write-back ended first), b2 and b3
// complete.
TEST(WriteBackTest, WritesOverHalfTheQueueDoNotWaitForEachOther) {
  constexpr uint64_t kQueue = 1 << 20, kSize = 600 << 10;
  FakeSink sink(4 << 20);
  WriteBack wb(&sink, BufferedOpts(1000, kQueue));
  auto data = [](char c) { return std::string(kSize, c); };
  const std::string a = data('a'), b1 = data('1'), b2 = data('2'), b3 = data('3');
  ASSERT_EQ(wb.Write(a.data(), kSize, 0, false), 0);  // buffered
  sink.HoldAt(1 << 20);
  std::future<int> first = std::async(std::launch::async, [&] {
    return wb.Write(b1.data(), kSize, 1 << 20, false);  // held in the plugin
  });
  sink.AwaitWritesStarted(2);  // a's write-back, and b1's write
  auto bounded = [&](const std::string& d, uint64_t off) {
    std::future<int> w =
        std::async(std::launch::async, [&, off] { return wb.Write(d.data(), kSize, off, false); });
    if (w.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
      sink.ReleaseAt();  // the old way: it waited for room until b1 was written
      ADD_FAILURE() << "a write over half the queue waited for the one before it";
    }
    return test::Get(w, "w");
  };
  EXPECT_EQ(bounded(b2, 2 << 20), 0);
  EXPECT_EQ(bounded(b3, 3 << 20), 0);
  sink.ReleaseAt();
  EXPECT_EQ(test::Get(first, "first"), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  for (const auto& [off, d] : {std::pair<uint64_t, const std::string*>{0, &a},
                               {1 << 20, &b1},
                               {2 << 20, &b2},
                               {3 << 20, &b3}})
    EXPECT_TRUE(std::equal(d->begin(), d->end(), disk.begin() + off)) << "at " << off;
  EXPECT_GE(StatOf(wb, "bypass_writes"), 1u);
}

// Block status takes at most max_ranges buffered ranges per map (active and
// each batch in flight), cutting the length where the snapshot ends: it
// took every range in the request, O(N) per request, and qemu walks an
// image with REQ_ONE requests for the rest of it (qemu-img map of 10,000
// buffered ranges: 30 s, against 0.9 s without the filter).
TEST(WriteBackTest, LookupExtentsTakesAtMostMaxRanges) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1048576, kDisk));
  const std::string x(4096, 'x');
  constexpr uint64_t kGap = 65536, kRanges = kDisk / kGap;  // 16
  for (uint64_t i = 0; i < kRanges; ++i) ASSERT_EQ(wb.Write(x.data(), 4096, i * kGap, false), 0);
  uint64_t len = kDisk;
  EXPECT_EQ(wb.LookupExtents(0, &len, 1).pieces().size(), 1u);
  EXPECT_EQ(len, kGap) << "cut where the second range starts";
  len = kDisk - 100;
  EXPECT_EQ(wb.LookupExtents(100, &len, 1).pieces().size(), 1u);
  EXPECT_EQ(len, kGap - 100) << "from inside the first range";
  len = kDisk - 8192;
  EXPECT_EQ(wb.LookupExtents(8192, &len, 1).pieces().size(), 1u);
  EXPECT_EQ(len, 2 * kGap - 8192) << "from a gap: the next range is the first";
  len = kDisk;
  EXPECT_EQ(wb.LookupExtents(0, &len, 10).pieces().size(), 10u);
  EXPECT_EQ(len, 10 * kGap);
  len = 3 * kGap;
  EXPECT_EQ(wb.LookupExtents(0, &len, 10).pieces().size(), 3u);
  EXPECT_EQ(len, 3 * kGap) << "fewer than max_ranges: not cut";
  // A batch in flight (the plugin held) and newer ranges between its own:
  // at most max_ranges of each map, cut at the nearer of the two cuts.
  sink.Hold();
  std::future<int> flush =
      std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  sink.AwaitWritesStarted(1);
  for (uint64_t i = 0; i < kRanges; ++i)  // EXPECT: the held flush must be released
    EXPECT_EQ(wb.Write(x.data(), 4096, i * kGap + kGap / 2, false), 0);
  len = kDisk;
  EXPECT_EQ(wb.LookupExtents(0, &len, 1).pieces().size(), 2u);  // [0,+4K) and [32K,+4K)
  EXPECT_EQ(len, kGap) << "cut at the batch's second range";
  len = kDisk - kGap;
  EXPECT_EQ(wb.LookupExtents(kGap, &len, 1).pieces().size(), 2u);  // [64K,+4K) and [96K,+4K)
  EXPECT_EQ(len, kGap) << "cut at the batch's next range";
  len = kDisk - kGap / 2;
  EXPECT_EQ(wb.LookupExtents(kGap / 2, &len, 2).pieces().size(), 4u);
  EXPECT_EQ(len, 2 * kGap) << "cut at the newer map's third range (the batch's is later)";
  sink.Release();
  EXPECT_EQ(test::Get(flush, "flush"), 0);
}

// Zeroes and trims carry no data, but each adds an index entry: they are
// bounded by queue_max_bytes too (200,000 one-byte zeroes held 19 MB of
// index under a 64 KiB bound, and no writer ever waited).
TEST(WriteBackTest, ZeroesAndTrimsAreBoundedByTheQueue) {
  FakeSink sink(kDisk);
  constexpr uint64_t kLimit = 64 * 1024;
  WriteBack wb(&sink, Opts(1048576, kLimit));
  test::Watchdog watchdog("20,000 zeroes and trims through a 64 KiB queue");
  // The plugin held at first: the queue fills with index charges alone and
  // the writer must wait for room.  (Unheld, a flusher that kept up let it
  // through without a wait now and then: CI run 86.)
  sink.Hold();
  std::atomic<uint64_t> done{0};
  uint64_t peak = 0;
  std::future<void> writer = std::async(std::launch::async, [&] {
    for (uint64_t i = 0; i < 20000; ++i) {
      if (i % 2 == 0)
        ASSERT_EQ(wb.Zero(1, i * 4, false, false), 0);
      else
        ASSERT_EQ(wb.Trim(1, i * 4, false), 0);
      if (i % 64 == 0) peak = std::max(peak, wb.memory_bytes());
      done.store(i + 1);
    }
  });
  test::AwaitPoll("a zero or trim to wait for room",
                  [&] { return StatOf(wb, "backpressure_waits") > 0; });
  EXPECT_LT(done.load(), 20000u) << "all buffered while the plugin took none";
  EXPECT_LE(wb.memory_bytes(), 2 * kLimit) << "index entries unbounded while the plugin is held";
  sink.Release();
  test::Get(writer, "writer");
  EXPECT_LE(peak, 2 * kLimit) << "index entries unbounded";
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(StatOf(wb, "requests_flushed"), 20000u);
  EXPECT_EQ(wb.memory_bytes(), 0u) << "charges not given back";
}

// A range the plugin refuses for good keeps its own requests' charges, not
// those of every request that shared a batch with it: else the queue
// would fill with charges and writers wait for ever.
TEST(WriteBackTest, ARangeRefusedForGoodDoesNotUseUpTheQueue) {
  FakeSink sink(kDisk);
  constexpr uint64_t kLimit = 64 * 1024;
  WriteBackOptions o = Opts(64, kLimit);
  o.retry_min = o.retry_max = milliseconds(1);
  WriteBack wb(&sink, o);
  sink.FailAt(0, EINVAL);
  ASSERT_EQ(wb.Write("bad", 3, 0, false), 0);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EINVAL);
  const uint64_t alone = wb.memory_bytes();  // the range and its index
  {
    test::Watchdog watchdog("5,000 zeroes beside a range refused for good");
    for (uint64_t i = 0; i < 5000; ++i) {
      if (i % 3 == 0)  // over it again: merged into it
        ASSERT_EQ(wb.Write("bad", 3, 0, false), 0);
      else
        ASSERT_EQ(wb.Zero(4096, (1 + i % 100) * 8192, false, false), 0);
    }
  }
  EXPECT_EQ(wb.Flush(Trigger::kClient), EINVAL);
  // Up to 3 spare index leaves (about 3.5 KiB each) and vector capacity
  // may stay, depending on how many ranges piled up before the flusher
  // caught up (the man page's index overhead); charges kept for the 5,000
  // requests would be 128 bytes each.
  EXPECT_LE(wb.memory_bytes(), alone + 16384) << "charges of merged or written requests kept";
  sink.FailAt(0, 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.memory_bytes(), 0u);
}

// Buffers in use plus pooled stay within queue-max-size whatever is
// charged: writes of sizes that are never pooled (not 4 KiB multiples) fill
// the queue beside a full pool, which only a pool miss of a poolable size
// used to shrink (1.5 MiB held under a 1 MiB bound).
TEST(WriteBackTest, PooledAndInUseBytesStayWithinTheBound) {
  constexpr uint64_t kLimit = 1 << 20;
  FakeSink sink(4 << 20);
  WriteBack wb(&sink, BufferedOpts(1 << 20, kLimit));
  wb.Pause();  // no threshold or half-queue batch
  const std::string big(256 * 1024, 'a');
  for (uint64_t i = 0; i < 3; ++i)
    ASSERT_EQ(wb.Write(big.data(), big.size(), i * big.size(), false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  ASSERT_GT(StatOf(wb, "pooled_bytes"), 700u * 1024) << "the written buffers were not pooled";
  const std::string small(1000, 'b');
  for (uint64_t i = 0; i < 700; ++i)
    ASSERT_EQ(wb.Write(small.data(), small.size(), (1 << 20) + i * 4096, false), 0);
  const uint64_t mem = StatOf(wb, "memory_bytes"), pool = StatOf(wb, "pooled_bytes");
  EXPECT_LE(mem + pool, kLimit + 128 * 1024)  // the index of 700 ranges is far less
      << "memory_bytes=" << mem << " pooled_bytes=" << pool;
  wb.Resume();
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// The pool goes back to the system once the export has been idle for a
// while, also when the last buffer reaches it late: here a read held it
// while its data were written back, after the flusher had found the pool
// empty and gone to sleep.
TEST(WriteBackTest, APoolFilledLateIsReleasedWhenIdle) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1000));
  const std::string block(64 * 1024, 'x');
  ASSERT_EQ(wb.Write(block.data(), block.size(), 0, false), 0);
  {
    Overlay ov = wb.Lookup(0, block.size());  // a read in progress
    ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
    ASSERT_EQ(wb.queued_requests(), 0u);
    // The flusher goes to sleep with nothing pooled: the state the read's
    // end used to leave unseen.
    test::AwaitPoll("the flusher to wait while the read holds its buffer",
                    [&] { return wb.waits_on_held_buffers() > 0; });
    ASSERT_EQ(StatOf(wb, "pooled_bytes"), 0u);
  }  // the read ends: its buffer goes to the pool
  ASSERT_GT(StatOf(wb, "pooled_bytes"), 0u);
  test::AwaitPoll("the pool of an idle export to be released",
                  [&] { return StatOf(wb, "pooled_bytes") == 0; });
}

// A request that splits a buffered range adds two index entries, not one:
// both are charged against the bound.  Only its own was, so small writes
// scattered over a buffered zero range grew the index unaccounted for,
// and memory_bytes passed queue-max-size by 441 KiB with a 4 MiB queue.
TEST(WriteBackTest, EntriesASplitAddsAreChargedAgainstTheBound) {
  constexpr uint64_t kLimit = 4 << 20, kSpan = 32 << 20;
  FakeSink sink(kSpan);
  WriteBack wb(&sink, BufferedOpts(1 << 20, kLimit));
  ASSERT_EQ(wb.Zero(kSpan, 0, false, false), 0);
  const std::string piece(512, 'p');
  uint64_t worst = 0;
  for (uint64_t i = 0; i < kSpan / 2048; ++i) {  // each splits the zero range
    ASSERT_EQ(wb.Write(piece.data(), piece.size(), i * 2048, false), 0);
    worst = std::max(worst, wb.memory_bytes());
  }
  ASSERT_GT(StatOf(wb, "backpressure_waits"), 0u) << "the bound was never reached";
  // The spare index nodes the man page allows: a few tens of KiB.
  EXPECT_LE(worst, kLimit + 32 * 1024)
      << "memory_bytes passed queue-max-size by " << (worst > kLimit ? worst - kLimit : 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.memory_bytes(), 0u);
}

// A request over several buffered ranges leaves fewer entries, and gives
// their charges back: a writer waiting for room is woken.  (Counting the
// entries it added wrapped around there, and took the charges back with
// no wakeup: the writer slept on, with room free.)
TEST(WriteBackTest, ARequestThatMergesRangesWakesAWriterWaitingForRoom) {
  constexpr uint64_t kLimit = 64 << 10;
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1 << 20, kLimit));
  ASSERT_EQ(wb.Zero(512 << 10, 0, false, false), 0);
  sink.Hold();
  auto flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  test::AwaitPoll("the zero's batch at the sink", [&] { return sink.zeroes_started() > 0; });
  // Small zeroes inside the range being written: no batch can start for
  // them while it runs, so nothing frees room but the merge below.
  for (uint64_t n = 0; n * 128 + 384 + WriteBack::WriteCharge(4096) / 2 <= kLimit; ++n)
    ASSERT_EQ(wb.Zero(512, n * 1024, false, false), 0);
  const std::string block(4096, 'a');
  auto writer = std::async(std::launch::async,
                           [&] { return wb.Write(block.data(), 4096, kDisk - 8192, false); });
  test::AwaitPoll("the writer to wait for room",
                  [&] { return StatOf(wb, "backpressure_waits") > 0; });
  ASSERT_EQ(wb.Zero(512 << 10, 0, false, false), 0);  // one entry for all of them
  EXPECT_EQ(writer.wait_for(std::chrono::seconds(10)), std::future_status::ready)
      << "the writer was not woken, with room free";
  sink.Release();
  EXPECT_EQ(test::Get(writer, "the write"), 0);
  EXPECT_EQ(test::Get(flush, "the flush"), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
}

// The buffers adjacent ranges are copied into to be written back as one
// are kept for reuse, and handed back with the pool: when the last writer
// leaves (ReleaseIdleMemory after Park) and after 2 s idle.  They were kept
// until nbdkit exited, up to 8 MiB for every export name ever written.
TEST(WriteBackTest, CoalescingBuffersAreReleasedWithThePool) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1000));
  const std::string block(4096, 'c');
  auto write_run = [&] {
    const uint64_t before = sink.writes();
    for (uint64_t i = 0; i < 64; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 4096, false), 0);
    ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
    ASSERT_LT(sink.writes() - before, 64u) << "nothing was coalesced";
    ASSERT_GT(StatOf(wb, "coalescing_bytes"), 0u);
  };
  write_run();
  wb.ReleaseIdleMemory();
  EXPECT_EQ(StatOf(wb, "coalescing_bytes"), 0u) << "kept when the export was left";
  write_run();
  test::AwaitPoll("the coalescing buffers of an idle export to be released",
                  [&] { return StatOf(wb, "coalescing_bytes") == 0; });
}

// Overwrites of a working set that fits add no index entry, so they keep
// no index charge: no writer waits for room, and nothing is written back
// before the flush (each overwrite used to keep 128 bytes until the queue
// looked full, and then a backpressure batch wrote the working set).
TEST(WriteBackTest, OverwritesThatFitNeitherWaitNorStartABatch) {
  constexpr uint64_t kLimit = 1 << 20;
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1 << 20, kLimit));
  const std::string block(4096, 'w');
  for (int round = 0; round < 200; ++round)  // 256 KiB, under half the queue
    for (uint64_t i = 0; i < 64; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 4096, false), 0);
  EXPECT_EQ(StatOf(wb, "backpressure_waits"), 0u);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(StatOf(wb, "batches_flushed"), 1u) << "written back before the flush";
  EXPECT_EQ(StatOf(wb, "flushes_backpressure"), 0u);
}

// A client's flush runs the batch on its own thread.  If the client goes
// meanwhile, nbdkit aborts the waits of that thread's plugin calls (the
// delay filter's sleep fails with ESHUTDOWN): that is no plugin failure, so
// no flush errors are recorded (other clients' flushes would fail for
// them), and the flusher writes the batch instead.
namespace {
thread_local bool client_gone = false;  // this thread's client has gone

class SleepingSink : public FakeSink {  // a plugin below that sleeps
 public:
  using FakeSink::FakeSink;
  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override {
    if (client_gone) {
      ++aborted;
      return ESHUTDOWN;
    }
    return FakeSink::Write(buf, count, offset, fua);
  }
  std::atomic<int> aborted{0};  // calls made on a gone client's thread
};
}  // namespace

TEST(WriteBackTest, AClientGoneDuringItsFlushFailsNoOtherFlush) {
  SleepingSink sink(kDisk);
  WriteBackOptions o = BufferedOpts(1000);
  o.writer_gone = [] { return client_gone; };
  WriteBack wb(&sink, o);
  std::thread gone_client([&] {
    ASSERT_EQ(wb.Write("data", 4, 4096, false), 0);
    client_gone = true;  // it goes while its flush runs here
    EXPECT_EQ(wb.Flush(Trigger::kClient), 0) << "the flusher did not take over";
  });
  gone_client.join();
  EXPECT_EQ(StatOf(wb, "flush_errors"), 0u);
  EXPECT_EQ(ReadThrough(wb, sink, 4096, 4), "data");
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(sink.Disk()[4096], 'd');
  EXPECT_EQ(sink.aborted.load(), 1) << "tried again on the gone client's thread";
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);  // another client's
}

// A writer waiting for room that the plugin, failing, never makes gives up
// once writer_gone says so (nbdkit shutting down, the client gone), with
// ESHUTDOWN and nothing buffered: nbdkit's exit waited for it for ever.
TEST(WriteBackTest, AWriterWaitingForRoomGivesUpWhenGone) {
  FakeSink sink(kDisk);
  std::atomic<bool> gone{false};
  WriteBackOptions o = Opts(1000, 2 * WriteBack::WriteCharge(4096));
  o.writer_gone = [&] { return gone.load(); };
  WriteBack wb(&sink, o);
  sink.Fail(EIO);
  const std::string block(4096, 'g');
  test::Watchdog watchdog("writers waiting for room to give up");  // else they never return
  ASSERT_EQ(wb.Write(block.data(), 4096, 0, false), 0);
  ASSERT_EQ(wb.Write(block.data(), 4096, 4096, false), 0);
  auto write =
      std::async(std::launch::async, [&] { return wb.Write(block.data(), 4096, 8192, false); });
  auto zero = std::async(std::launch::async, [&] { return wb.Zero(4096, 12288, false, false); });
  test::AwaitPoll("both to wait for room", [&] { return StatOf(wb, "backpressure_waits") >= 2; });
  EXPECT_EQ(write.wait_for(milliseconds(300)), std::future_status::timeout)
      << "gave up while writer_gone said no";
  gone = true;
  ASSERT_EQ(write.wait_for(test::kPatience), std::future_status::ready);
  ASSERT_EQ(zero.wait_for(test::kPatience), std::future_status::ready);
  EXPECT_EQ(test::Get(write, "write"), ESHUTDOWN);
  EXPECT_EQ(test::Get(zero, "zero"), ESHUTDOWN);
  EXPECT_EQ(wb.queued_requests(), 2u) << "a request that gave up was buffered";
  sink.Fail(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.Disk()[8192], 0) << "the write that gave up reached the plugin";
}

// Half of queue_max_bytes in buffered data starts a batch whatever the
// request count, so writers do not reach the bound before write-back begins.
TEST(WriteBackTest, HalfTheQueueStartsABatchBelowThreshold) {
  FakeSink sink(kDisk);
  const uint64_t limit = 8 * WriteBack::WriteCharge(4096);  // half: over 4 blocks of data
  WriteBack wb(&sink, Opts(1000, limit));
  std::string block(4096, 'h');
  for (int i = 0; i < 4; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 8192, false), 0);
  EXPECT_FALSE(sink.WritesStartWithin(1, milliseconds(200)));  // under half: stays buffered
  ASSERT_EQ(wb.Write(block.data(), 4096, 4 * 8192, false), 0);  // 20 KiB: half reached
  ASSERT_TRUE(sink.WritesStartWithin(5, std::chrono::seconds(10)));
  AwaitEmptyQueue(wb);
  EXPECT_EQ(wb.counters().by_trigger[static_cast<size_t>(Trigger::kThreshold)].load(), 1u);
  EXPECT_EQ(wb.counters().by_trigger[static_cast<size_t>(Trigger::kBackpressure)].load(), 0u);
  EXPECT_EQ(sink.flushes(), 0u);
}

TEST(WriteBackTest, WriteLargerThanQueueIsWrittenThroughInOrder) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000, 8192));
  std::string small(100, 's'), big(16384, 'B');
  ASSERT_EQ(wb.Write(small.data(), 100, 16000, false), 0);  // older, overlaps big
  ASSERT_EQ(wb.Write(big.data(), 16384, 0, false), 0);
  EXPECT_EQ(wb.queued_requests(), 0u);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 16384), big);
  EXPECT_EQ(wb.counters().writethrough_requests.load(), 1u);
}

// The bound counts each chunk's header: a write that fits with it is
// buffered, one that does not (a write of exactly the bound, say) is written
// through, since buffered it could only wait for an empty queue and then
// hold more than the bound.
TEST(WriteBackTest, WriteThatFitsOnlyWithoutItsHeaderIsWrittenThrough) {
  FakeSink sink(kDisk);
  constexpr uint64_t kBound = 8192;
  WriteBack wb(&sink, Opts(1000, kBound));
  std::string fits(kBound - WriteBack::WriteCharge(0), 'f'), whole(kBound, 'w');
  wb.Pause();  // else the half-queue trigger may write `fits` back at once
  ASSERT_EQ(wb.Write(fits.data(), fits.size(), 0, false), 0);
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(wb.counters().writethrough_requests.load(), 0u);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  wb.Resume();
  ASSERT_EQ(wb.Write(whole.data(), kBound, 16384, false), 0);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(wb.counters().writethrough_requests.load(), 1u);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin() + 16384, disk.begin() + 16384 + kBound), whole);
}

// Runs one-byte batches until the engine has timed FakeSink's requests as
// CPU-bound (on a loaded machine one can look like waiting now and then).
void TimeAsCpuBound(WriteBack& wb) {
  for (int i = 0; i < 100 && wb.plugin_latency_bound(); ++i) {
    ASSERT_EQ(wb.Write("t", 1, kDisk - 1, false), 0);
    ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  }
  ASSERT_FALSE(wb.plugin_latency_bound()) << "FakeSink never timed as CPU-bound";
}

constexpr uint32_t kLarge = 64 * 1024;  // WriteBackOptions::bypass_min

// A FUA reply means that everything acknowledged before the request is
// written and flushed, and a FUA request reports a failure to write it, as
// a flush does.  A FUA write that went straight to the plugin (bypass, or
// written through) made only itself durable, and a bypass one reported no
// earlier failure.
TEST(WriteBackTest, AFuaWriteNotBufferedStillCoversWhatCameBeforeIt) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  TimeAsCpuBound(wb);
  const std::string big(kLarge, 'F');
  ASSERT_EQ(wb.Write("a", 1, 0, false), 0);  // buffered
  uint64_t flushes = sink.flushes();
  ASSERT_EQ(wb.Write(big.data(), kLarge, 2 * kLarge, /*fua=*/true), 0);
  EXPECT_EQ(wb.queued_requests(), 0u) << "the older write is still buffered";
  EXPECT_GT(sink.flushes(), flushes) << "nothing flushed the older write";
  EXPECT_EQ(sink.Disk()[0], 'a');
  sink.FailAt(0, EIO);
  ASSERT_EQ(wb.Write("b", 1, 0, false), 0);
  EXPECT_EQ(wb.Write(big.data(), kLarge, 2 * kLarge, /*fua=*/true), EIO)
      << "the FUA write did not report that the older write failed";
  sink.FailAt(0, 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);

  // Written through (larger than the queue): the older data reaches the
  // plugin first, and is flushed with it.
  FakeSink small_sink(kDisk);
  WriteBack through(&small_sink, Opts(1000, 4 * WriteBack::WriteCharge(4096)));
  ASSERT_EQ(through.Write("c", 1, 0, false), 0);
  flushes = small_sink.flushes();
  ASSERT_EQ(through.Write(big.data(), kLarge, 2 * kLarge, /*fua=*/true), 0);
  EXPECT_EQ(through.counters().writethrough_requests.load(), 1u);
  EXPECT_GT(small_sink.flushes(), flushes) << "nothing flushed the older write";
  EXPECT_EQ(small_sink.Disk()[0], 'c');

  // With flush_before_release (a plugin that is not multi-conn), a
  // write-through is flushed as it is written, and so was the older data:
  // one plugin flush for it, not two.
  FakeSink per_context(kDisk);
  WriteBackOptions fbr = Opts(1000, 4 * WriteBack::WriteCharge(4096));
  fbr.flush_before_release = true;
  WriteBack separate(&per_context, fbr);
  ASSERT_EQ(separate.Write("d", 1, 0, false), 0);
  ASSERT_EQ(separate.Flush(Trigger::kClient), 0);
  flushes = per_context.flushes();
  ASSERT_EQ(separate.Write(big.data(), kLarge, 2 * kLarge, /*fua=*/true), 0);
  EXPECT_EQ(per_context.flushes(), flushes + 1);
}

// A FUA write's time includes the plugin's flush: it is not a probe of how
// the plugin's writes go, and a CPU-bound plugin whose flushes are slow
// stays CPU-bound however many FUA writes go straight to it.
TEST(WriteBackTest, FuaWritesAreNotTimedAsProbes) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  TimeAsCpuBound(wb);
  sink.SetWriteTime(milliseconds(1));  // a write that sleeps, as in a sync
  const std::string big(kLarge, 'p');
  for (int i = 0; i < 20 * 32; ++i) ASSERT_EQ(wb.Write(big.data(), kLarge, 0, true), 0);
  EXPECT_EQ(sink.fua_writes(), 640u);
  EXPECT_FALSE(wb.plugin_latency_bound()) << "FUA writes were timed as the plugin's writes";
}

// Buffering a large write for a CPU-bound plugin only adds a copy: it goes
// to the plugin before Write returns.  A smaller one is buffered.
TEST(WriteBackTest, LargeWriteGoesStraightToACpuBoundPlugin) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  TimeAsCpuBound(wb);
  const uint64_t before = sink.writes();
  std::string big(kLarge, 'D'), smaller(kLarge - 1, 's');
  ASSERT_EQ(wb.Write(big.data(), kLarge, 2 * kLarge, false), 0);
  EXPECT_EQ(sink.writes(), before + 1);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 1u);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin() + 2 * kLarge, disk.begin() + 3 * kLarge), big);
  // The next client flush still flushes the plugin, with nothing buffered:
  // the bypass write may be in the plugin's cache only.
  const uint64_t flushes = sink.flushes();
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.flushes(), flushes + 1);
  ASSERT_EQ(wb.Write(smaller.data(), kLarge - 1, 4 * kLarge, false), 0);
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(sink.writes(), before + 1);
}

// Until the plugin has been timed (and while paused) large writes are
// buffered like any other.
TEST(WriteBackTest, LargeWriteIsBufferedUntilThePluginIsKnownCpuBound) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_TRUE(wb.plugin_latency_bound());
  std::string big(kLarge, 'D');
  ASSERT_EQ(wb.Write(big.data(), kLarge, 0, false), 0);
  EXPECT_EQ(wb.queued_requests(), 1u);
  TimeAsCpuBound(wb);
  wb.Pause();
  ASSERT_EQ(wb.Write(big.data(), kLarge, 2 * kLarge, false), 0);
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 0u);
  wb.Resume();
}

// A large write over buffered bytes is buffered too: sent at once, it
// would be overwritten by the older buffered data when that is written.
TEST(WriteBackTest, LargeWriteOverBufferedDataIsBuffered) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  TimeAsCpuBound(wb);
  std::string old(4096, 'o'), big(kLarge, 'N');
  ASSERT_EQ(wb.Write(old.data(), 4096, kLarge + 100, false), 0);
  ASSERT_EQ(wb.Write(big.data(), kLarge, kLarge, false), 0);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 0u);
  EXPECT_EQ(wb.queued_requests(), 2u);
  EXPECT_EQ(ReadThrough(wb, sink, kLarge, kLarge), big);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin() + kLarge, disk.begin() + 2 * kLarge), big);
}

// A FakeSink whose writes sleep for a while once `slow` is set, as a plugin
// behind a network or nbdkit's delay filter does.
class SlowingSink : public FakeSink {
 public:
  using FakeSink::FakeSink;
  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override {
    if (slow.load()) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    return FakeSink::Write(buf, count, offset, fua);
  }
  std::atomic<bool> slow{false};
};

// Large writes that went straight to a CPU-bound plugin are timed now and
// then; once the plugin turns slow, the engine takes it for latency-bound
// and buffers large writes again (to write them back many at a time).
TEST(WriteBackTest, BypassWritesNoticeAPluginTurningSlow) {
  SlowingSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000000, 1 << 30));
  TimeAsCpuBound(wb);
  sink.slow = true;
  std::string big(kLarge, 'S');
  // 12 of the last 16 probes must have waited; a probe every 32 writes at
  // most is about 400 writes of 1 ms.
  const uint64_t slots = kDisk / kLarge;
  uint64_t n = 0;
  for (; n < 2000 && !wb.plugin_latency_bound(); ++n) {
    ASSERT_EQ(wb.Write(big.data(), kLarge, (n % slots) * kLarge, false), 0);
    ASSERT_EQ(wb.queued_requests(), 0u) << "large write " << n << " was buffered";
  }
  ASSERT_TRUE(wb.plugin_latency_bound())
      << n << " large writes to a slow plugin, none timed as such";
  EXPECT_EQ(wb.counters().bypass_writes.load(), n);
  ASSERT_EQ(wb.Write(big.data(), kLarge, 0, false), 0);
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), n);
}

// Starts a bypass write of `data` (kLarge bytes) at kLarge, which the sink
// holds until ReleaseAt(); returns once the write is in the sink.
std::future<int> StartHeldBypassWrite(WriteBack& wb, FakeSink& sink, const std::string& data) {
  const uint64_t started = sink.writes_started();
  sink.HoldAt(kLarge);
  auto write = std::async(std::launch::async,
                          [&wb, &data] { return wb.Write(data.data(), kLarge, kLarge, false); });
  sink.AwaitWritesStarted(started + 1);
  return write;
}

// While a bypass write is in the plugin, a newer write of the same bytes
// waits for it (else its batch could reach the plugin first and be
// overwritten); a write elsewhere does not.
TEST(WriteBackTest, WriteOverABypassWriteInFlightWaitsForIt) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1));  // every buffered write is a batch at once
  TimeAsCpuBound(wb);
  ReleaseAtOnExit release{sink};
  const std::string big(kLarge, 'A');
  auto bypass = StartHeldBypassWrite(wb, sink, big);
  auto newer = std::async(std::launch::async, [&] { return wb.Write("B", 1, kLarge + 10, false); });
  ASSERT_EQ(wb.Write("C", 1, 0, false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);  // "C" only: the held write is not acknowledged
  EXPECT_EQ(sink.Disk()[0], 'C');
  EXPECT_EQ(newer.wait_for(milliseconds(100)), std::future_status::timeout);
  sink.ReleaseAt();
  EXPECT_EQ(test::Get(bypass, "bypass"), 0);
  EXPECT_EQ(test::Get(newer, "newer"), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(disk[kLarge], 'A');
  EXPECT_EQ(disk[kLarge + 10], 'B');
  EXPECT_EQ(wb.counters().bypass_writes.load(), 1u);
}

// Two bypass writes in flight; the later one ends first.  Its end clears
// its own bytes only: a write over them goes ahead, while a write over the
// earlier one, still in the plugin, waits for it.
TEST(WriteBackTest, EachBypassWriteClearsOnlyItsOwnBytes) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1));  // every buffered write is a batch at once
  TimeAsCpuBound(wb);
  ReleaseAtOnExit release{sink};
  const std::string first(kLarge, 'A'), second(kLarge, 'B');
  auto held = StartHeldBypassWrite(wb, sink, first);
  ASSERT_EQ(wb.Write(second.data(), kLarge, 3 * kLarge, false), 0);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 1u);  // the second; the first is held
  auto over_second = std::async(std::launch::async, [&] { return wb.Write("b", 1, 3 * kLarge + 10, false); });
  EXPECT_EQ(over_second.wait_for(std::chrono::seconds(5)), std::future_status::ready);
  auto over_first = std::async(std::launch::async, [&] { return wb.Write("a", 1, kLarge + 10, false); });
  EXPECT_EQ(over_first.wait_for(milliseconds(100)), std::future_status::timeout);
  sink.ReleaseAt();
  EXPECT_EQ(test::Get(held, "held"), 0);
  EXPECT_EQ(test::Get(over_first, "over_first"), 0);
  EXPECT_EQ(test::Get(over_second, "over_second"), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(disk[kLarge], 'A');
  EXPECT_EQ(disk[kLarge + 10], 'a');
  EXPECT_EQ(disk[3 * kLarge], 'B');
  EXPECT_EQ(disk[3 * kLarge + 10], 'b');
  EXPECT_EQ(wb.counters().bypass_writes.load(), 2u);
}

// A bypass write the plugin fails is buffered and retried like any other
// write: the client sees success, and the data arrives.
TEST(WriteBackTest, FailedBypassWriteIsBufferedInstead) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  TimeAsCpuBound(wb);
  sink.FailNext(1, EIO);
  std::string big(kLarge, 'F');
  ASSERT_EQ(wb.Write(big.data(), kLarge, 0, false), 0);
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 0u);
  EXPECT_EQ(ReadThrough(wb, sink, 0, kLarge), big);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + kLarge), big);
}

TEST(WriteBackTest, CoalescesAdjacentWritesUpToTheCap) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.max_plugin_write = 64 * 1024;
  WriteBack wb(&sink, o);
  std::string block(4096, 'c');
  for (int i = 0; i < 64; ++i) ASSERT_EQ(wb.Write(block.data(), 4096, i * 4096, false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.writes(), 4u);  // 256 KiB in 64 KiB plugin writes
  EXPECT_EQ(sink.max_write(), 64u * 1024);
}

TEST(WriteBackTest, StopWritesEverythingOrReportsIt) {
  FakeSink sink(kDisk);
  {
    WriteBack wb(&sink, Opts(1000));
    ASSERT_EQ(wb.Write("s", 1, 7, false), 0);
    Leftover left = wb.Stop(milliseconds(1000));
    EXPECT_EQ(left.bytes, 0u);
  }
  EXPECT_EQ(sink.Disk()[7], 's');
  FakeSink broken(kDisk);
  broken.Fail(EIO);
  WriteBack wb(&broken, Opts(1000));
  ASSERT_EQ(wb.Write("lost", 4, 4096, false), 0);
  Leftover left = wb.Stop(milliseconds(50));
  EXPECT_EQ(left.bytes, 4u);
  EXPECT_EQ(left.requests, 1u);
  EXPECT_EQ(left.error, EIO);
  EXPECT_EQ(left.ranges, "[4096,+4)");
}

using test::ProcessThreads;

// An export whose last writer has left runs no thread (Registry::Leave
// parks it); reads, flushes and counters go on, and Unpark() brings the
// threads back for the next writer.
TEST(WriteBackTest, ParkedExportRunsNoThreadUntilUnparked) {
  FakeSink sink(kDisk);
  const size_t before = ProcessThreads();
  WriteBack wb(&sink, Opts(1000));
  const size_t running = ProcessThreads();
  EXPECT_GT(running, before);
  ASSERT_EQ(wb.Write("abc", 3, 0, false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  ASSERT_TRUE(wb.Park());
  EXPECT_TRUE(wb.parked());
  test::AwaitPoll("the parked export's threads to end", [&] { return ProcessThreads() == before; });
  EXPECT_EQ(ReadThrough(wb, sink, 0, 3), "abc");
  EXPECT_EQ(wb.Flush(Trigger::kControl), 0);
  EXPECT_EQ(StatOf(wb, "batches_flushed"), 1u);
  for (int round = 0; round < 2; ++round) {
    wb.Unpark();
    EXPECT_FALSE(wb.parked());
    EXPECT_EQ(ProcessThreads(), running) << "round " << round;
    // A threshold batch needs the flusher: nothing else writes it.
    wb.SetThreshold(1);
    ASSERT_EQ(wb.Write("def", 3, 100 + round, false), 0);
    sink.AwaitWrites(2 + round);
    AwaitEmptyQueue(wb);
    ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
    ASSERT_TRUE(wb.Park()) << "round " << round;
    test::AwaitPoll("the threads to end again", [&] { return ProcessThreads() == before; });
  }
  EXPECT_EQ(ReadThrough(wb, sink, 100, 4), "ddef");
  EXPECT_EQ(StatOf(wb, "batches_flushed"), 3u);
  EXPECT_EQ(wb.Stop(milliseconds(0)).bytes, 0u);
}

// A batch in the plugin when Park() is called ends first, and no new one
// starts meanwhile: Park() stops the flusher at once, then waits for the
// batch before it stops anything the batch may use (BatchWriter's helpers).
TEST(WriteBackTest, ParkWaitsForTheBatchInThePlugin) {
  HeldBatch t;
  std::promise<void> go;
  auto park = std::async(std::launch::async, [&] {
    go.get_future().wait();
    return t.wb.Park();
  });
  const size_t threads = ProcessThreads();
  go.set_value();
  test::AwaitPoll("Park to stop the flusher", [&] { return ProcessThreads() == threads - 1; });
  EXPECT_EQ(park.wait_for(milliseconds(0)), std::future_status::timeout)
      << "parked with a batch in the plugin";
  EXPECT_FALSE(t.wb.parked());
  t.sink.ReleaseAt();
  EXPECT_TRUE(test::Get(park, "park"));
  EXPECT_TRUE(t.wb.parked());
  // Its batch was written, but the plugin flush it then needs cannot start
  // on a parked export (in nbdkit: no writer, so no context to flush).
  EXPECT_EQ(test::Get(t.first, "t.first"), ENOTCONN);
  EXPECT_EQ(t.sink.Disk()[0], 'a');
}

// The plugin failed the last write-back: the data stays buffered while the
// export is parked (nothing could write it: no writer means no context),
// a flush fails at once without starting a thread, and the flusher that
// Unpark() starts writes it without being asked.
TEST(WriteBackTest, UnwrittenDataWaitsParkedForTheNextWriter) {
  FakeSink sink(kDisk);
  const size_t before = ProcessThreads();
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
  sink.Fail(EIO);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  ASSERT_TRUE(wb.Park());
  test::AwaitPoll("the parked export's threads to end", [&] { return ProcessThreads() == before; });
  EXPECT_EQ(wb.queued_requests(), 1u);
  EXPECT_EQ(ReadThrough(wb, sink, 0, 1), "x");
  sink.Fail(0);
  EXPECT_EQ(wb.Flush(Trigger::kControl), ENOTCONN);
  EXPECT_EQ(ProcessThreads(), before) << "a flush of the parked export started threads";
  EXPECT_EQ(sink.Disk()[0], 0) << "written while parked";
  // Retrying cannot help before Unpark(): FlushUntil gives up at once
  // instead of spinning until its limit.
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(wb.FlushUntil(std::chrono::seconds(20), Trigger::kShutdown), ENOTCONN);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(10));
  wb.Unpark();
  AwaitEmptyQueue(wb);  // the flusher's retry: no client flush
  EXPECT_EQ(sink.Disk()[0], 'x');
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
}

// The same without a flush while parked (which kicked the flusher): the
// next writer's flusher waited for what was left of the last backoff (up to
// 1 s in nbdkit; an hour here) before writing the data.
TEST(WriteBackTest, TheNextWriterWritesLeftDataAtOnce) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = o.retry_max = std::chrono::hours(1);
  WriteBack wb(&sink, o);
  ASSERT_EQ(wb.Write("x", 1, 0, false), 0);
  sink.Fail(EIO);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  ASSERT_TRUE(wb.Park());
  sink.Fail(0);
  wb.Unpark();
  AwaitEmptyQueue(wb);
  EXPECT_EQ(sink.Disk()[0], 'x');
}

// nbdkit quitting fails every wait in a layer below (the delay filter) with
// ESHUTDOWN, for good: the last connection's FlushUntil retried for the
// whole shutdown-timeout (30 s by default; an hour here) before the data
// was logged as lost anyway.  Once an attempt off a client's thread failed
// so while writer_gone says nbdkit is going, it gives up when retries at
// the longest backoff retire nothing (3 x retry_max).  An ESHUTDOWN
// the plugin returns while nbdkit is not quitting (a remote server's) is
// retried as before.
TEST(WriteBackTest, QuittingEndsTheLastConnectionsRetriesAtOnce) {
  for (const bool quitting : {false, true}) {
    SCOPED_TRACE(quitting ? "quitting" : "a remote's ESHUTDOWN");
    FakeSink sink(kDisk);
    WriteBackOptions o = Opts(1000);
    o.writer_gone = [quitting] { return quitting; };
    WriteBack wb(&sink, o);
    ASSERT_EQ(wb.Write("q", 1, 0, false), 0);
    sink.Fail(ESHUTDOWN);
    const auto limit = quitting ? std::chrono::milliseconds(std::chrono::hours(1))
                                : std::chrono::milliseconds(300);
    auto done =
        std::async(std::launch::async, [&] { return wb.FlushUntil(limit, Trigger::kDisconnect); });
    if (done.wait_for(test::kPatience) != std::future_status::ready) {
      ADD_FAILURE() << "still retrying after " << test::kPatience.count() << " s";
      sink.Fail(0);  // lets it end
    }
    EXPECT_EQ(test::Get(done, "done"), ESHUTDOWN);
    if (!quitting) {
      EXPECT_GT(StatOf(wb, "flush_errors"), 1u) << "a remote's ESHUTDOWN was not retried";
    }
    EXPECT_EQ(wb.queued_requests(), 1u);
    sink.Fail(0);
    EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
  }
}

// ... but a layer that waits only when its budget is spent (the rate
// filter) still writes some between retries while nbdkit quits: the
// retries went on (all 192 writes of a reviewer's run reached the image),
// and stopping at the first ESHUTDOWN lost 113 of them.  Here a write
// succeeds only 30 ms after the last one that did (a budget of one write
// per 30 ms), so most attempts retire nothing, and the retries come every
// 10-50 ms.
namespace {
class PacedSink : public FakeSink {
 public:
  using FakeSink::FakeSink;
  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override {
    {
      std::lock_guard<std::mutex> l(mu);
      const auto now = std::chrono::steady_clock::now();
      if (now - last < std::chrono::milliseconds(30)) return ESHUTDOWN;  // would have to wait
      last = now;
    }
    return FakeSink::Write(buf, count, offset, fua);
  }
  std::mutex mu;
  std::chrono::steady_clock::time_point last{};
};
}  // namespace

TEST(WriteBackTest, QuittingRetriesGoOnWhileTheyMakeProgress) {
  PacedSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.retry_min = std::chrono::milliseconds(10);
  o.retry_max = std::chrono::milliseconds(50);
  o.write_threads = 1;
  o.writer_gone = [] { return true; };
  WriteBack wb(&sink, o);
  for (int i = 0; i < 6; ++i) ASSERT_EQ(wb.Write("r", 1, i * 8192, false), 0);
  auto done = std::async(std::launch::async, [&] {
    return wb.FlushUntil(std::chrono::hours(1), Trigger::kDisconnect);
  });
  if (done.wait_for(test::kPatience) != std::future_status::ready) {
    ADD_FAILURE() << "still retrying after " << test::kPatience.count() << " s";
  }
  EXPECT_EQ(test::Get(done, "done"), 0) << "gave up while retries still wrote";
  for (int i = 0; i < 6; ++i) EXPECT_EQ(sink.Disk()[i * 8192], 'r') << i;
}

TEST(WriteBackTest, NoContextDoesNotHideThePluginError) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  ASSERT_EQ(wb.Write("e", 1, 0, false), 0);
  sink.Fail(ENOSPC);
  EXPECT_EQ(wb.Flush(Trigger::kClient), ENOSPC);
  sink.Fail(ENOTCONN);  // the last connection has gone: nothing to write with
  EXPECT_EQ(wb.Flush(Trigger::kClient), ENOSPC);
  Leftover left = wb.Stop(milliseconds(0));
  EXPECT_EQ(left.error, ENOSPC);
  EXPECT_EQ(left.bytes, 1u);
}

TEST(WriteBackTest, AgeTriggerWritesOldData) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000);
  o.max_age = milliseconds(20);
  WriteBack wb(&sink, o);
  ASSERT_EQ(wb.Write("a", 1, 0, false), 0);
  sink.AwaitWritesStarted(1);
  AwaitEmptyQueue(wb);
  EXPECT_EQ(sink.Disk()[0], 'a');
  EXPECT_EQ(wb.counters().by_trigger[static_cast<size_t>(Trigger::kAge)].load(), 1u);
}

TEST(WriteBackTest, PauseHoldsBackThresholdBatches) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1));
  wb.Pause();
  ASSERT_EQ(wb.Write("p", 1, 0, false), 0);
  ASSERT_EQ(wb.Write("q", 1, 1, false), 0);
  EXPECT_EQ(wb.queued_requests(), 2u);  // paused: no batch was due
  wb.Resume();
  sink.AwaitWritesStarted(1);
  AwaitEmptyQueue(wb);
  EXPECT_EQ(sink.Disk()[1], 'q');
}

}  // namespace
}  // namespace sdccache

namespace sdccache {
namespace {

// Several client threads at once (run under TSan by scripts/test): each
// owns a region, so its own model is exact whatever the others do.
TEST(WriteBackConcurrencyTest, ClientsReadTheirOwnWritesWhileTheFlusherRuns) {
  constexpr int kThreads = 4;
  constexpr uint64_t kRegion = 16384;
  FakeSink sink(kThreads * kRegion);
  WriteBackOptions o = Opts(8, 24 * 1024);  // small queue: backpressure too
  o.max_plugin_write = 4096;
  WriteBack wb(&sink, o);
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::vector<uint8_t> model(kRegion, 0), buf(kRegion);
      uint64_t seed = 0x9e3779b97f4a7c15ull * static_cast<uint64_t>(t + 1);
      auto next = [&seed] { return seed = seed * 6364136223846793005ull + 1442695040888963407ull; };
      const uint64_t base = static_cast<uint64_t>(t) * kRegion;
      for (int i = 0; i < 3000; ++i) {
        const uint64_t off = (next() >> 20) % kRegion;
        const uint64_t len = 1 + (next() >> 20) % std::min<uint64_t>(kRegion - off, 5000);
        switch ((next() >> 33) % 5) {
          case 0:
          case 1:
            for (uint64_t k = 0; k < len; ++k) buf[k] = static_cast<uint8_t>(i + k + t);
            if (wb.Write(buf.data(), static_cast<uint32_t>(len), base + off, false)) ++failures;
            std::copy(buf.begin(), buf.begin() + static_cast<long>(len), model.begin() + static_cast<long>(off));
            break;
          case 2: {
            Overlay ov = wb.Lookup(base + off, len);
            sink.Read(buf.data(), len, base + off);
            ov.ApplyTo(buf.data());
            if (!std::equal(buf.begin(), buf.begin() + static_cast<long>(len), model.begin() + static_cast<long>(off)))
              ++failures;
            break;
          }
          case 3:
            if (wb.Zero(static_cast<uint32_t>(len), base + off, false, false)) ++failures;
            std::fill(model.begin() + static_cast<long>(off), model.begin() + static_cast<long>(off + len), 0);
            break;
          case 4:
            if (wb.Flush(Trigger::kClient)) ++failures;
            break;
        }
      }
      if (wb.Flush(Trigger::kClient)) ++failures;
      sink.Read(buf.data(), kRegion, base);
      if (buf != model) ++failures;
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(failures.load(), 0);
}

// A failed bypass write was made and failed like a batch's: plugin_writes,
// flush_errors and last_error count it (they did not).  The write is
// buffered instead, and the batch writes it.
TEST(WriteBackTest, AFailedBypassWriteIsCountedLikeABatchWrite) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000));
  TimeAsCpuBound(wb);
  const uint64_t calls_before = StatOf(wb, "plugin_writes");
  const uint64_t started_before = sink.writes_started();
  sink.FailNext(1, EIO);
  std::string big(kLarge, 'F');
  ASSERT_EQ(wb.Write(big.data(), kLarge, 0, false), 0);  // bypass fails, buffered
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  const uint64_t calls = sink.writes_started() - started_before;
  EXPECT_EQ(calls, 2u);  // the failed bypass write, then the batch's
  EXPECT_EQ(StatOf(wb, "plugin_writes") - calls_before, calls);
  EXPECT_EQ(wb.counters().flush_errors.load(), 1u);
  EXPECT_EQ(wb.counters().last_error.load(), EIO);
}

// A write over half the queue that finds no room, and that the plugin
// fails as a bypass write, is buffered: it was sent straight to the plugin
// a second time at once (two failed calls, flush_errors 2, for one write).
TEST(WriteBackTest, AFailedBypassWriteIsNotSentAgainForFindingNoRoom) {
  constexpr uint64_t kQueue = 256 << 10, kSize = 160 << 10;
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000, kQueue);
  o.bypass_min = 128 << 10;
  WriteBack wb(&sink, o);
  TimeAsCpuBound(wb);
  const std::string small(100 << 10, 's'), big(kSize, 'B');
  ASSERT_EQ(wb.Write(small.data(), small.size(), 0, false), 0);  // below bypass-min: buffered
  ASSERT_EQ(wb.queued_requests(), 1u);
  const uint64_t started_before = sink.writes_started();
  sink.FailNext(1, EIO);
  // Over half the queue, no room beside the 100 KiB: its bypass write
  // fails (and a second one would have worked).
  std::future<int> w =
      std::async(std::launch::async, [&] { return wb.Write(big.data(), kSize, 512 << 10, false); });
  EXPECT_EQ(test::Get(w, "the write over half the queue"), 0);
  EXPECT_EQ(wb.counters().flush_errors.load(), 1u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 0u);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_TRUE(std::equal(big.begin(), big.end(), disk.begin() + (512 << 10)));
  EXPECT_GE(sink.writes_started() - started_before, 2u);
}

// Without multi-conn, the ranges a failing batch did write are retired
// only once a flush has covered them: if that flush fails too, they stay
// buffered and are written again with the rest (retired anyway, another
// connection's context might never see them, and a later flush would not
// reach the context that carried them).
TEST(WriteBackTest, WrittenRangesOfAFailedBatchStayUntilAFlushCoversThem) {
  FakeSink sink(kDisk);
  WriteBackOptions o = BufferedOpts(1000);
  o.flush_before_release = true;
  WriteBack wb(&sink, o);
  const std::string good(4096, 'g'), bad(4096, 'b');
  ASSERT_EQ(wb.Write(good.data(), good.size(), 0, false), 0);
  ASSERT_EQ(wb.Write(bad.data(), bad.size(), 65536, false), 0);
  sink.FailAt(65536, EIO);
  sink.FailFlush(EIO);
  EXPECT_EQ(wb.Flush(Trigger::kClient), EIO);
  ASSERT_GE(sink.writes(), 1u) << "the good range was not written: the test tests nothing";
  EXPECT_EQ(wb.queued_requests(), 2u) << "a range written but never flushed was retired";
  sink.FailAt(65536, 0);
  sink.FailFlush(0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.queued_requests(), 0u);
  EXPECT_EQ(ReadThrough(wb, sink, 0, 4096), good);
  EXPECT_EQ(ReadThrough(wb, sink, 65536, 4096), bad);
}

// A plugin flush covers only what was written before it started: a write
// buffered while the batch before the flush was at the plugin is not
// covered, and the next client flush writes and flushes it (a flush that
// claimed everything buffered when it started answered that next flush at
// once, with the write never sent).
TEST(WriteBackTest, APluginFlushCoversOnlyWhatWasWrittenBeforeIt) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1000));
  const std::string x(4096, 'x'), y(4096, 'y');
  ASSERT_EQ(wb.Write(x.data(), x.size(), 0, false), 0);
  sink.Hold();
  auto first = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  sink.AwaitWritesStarted(1);  // its batch is at the plugin
  ASSERT_EQ(wb.Write(y.data(), y.size(), 65536, false), 0);
  sink.Release();
  ASSERT_EQ(test::Get(first, "the first flush"), 0);
  const uint64_t flushes = sink.flushes();
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  std::string on_disk(y.size(), '\0');
  sink.Read(on_disk.data(), on_disk.size(), 65536);
  EXPECT_EQ(on_disk, y) << "a flush answered without the write buffered before it";
  EXPECT_GT(sink.flushes(), flushes) << "a flush answered without a plugin flush after the write";
}

// A write-through in flight is alone on its bytes, as a bypass write is: a
// newer write to them waits until it has landed.  Otherwise that write was
// acknowledged and written back while the write-through was still at the
// plugin, which could land over it: a read after both were acknowledged
// returned the newer write (buffered), and once its batch had retired the
// write-through (review A).
TEST(WriteBackTest, ANewerWriteOverAWriteThroughInFlightWaitsForIt) {
  constexpr uint64_t kLimit = 64 * 1024, kFar = kDisk / 2;
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1000, kLimit));
  const std::string through(2 * kLimit, 'W'), newer(512, 'N'), far(512, 'M');
  sink.HoldAt(0);
  sink.HoldAt(kFar, /*keep_others=*/true);
  auto w = std::async(std::launch::async,
                      [&] { return wb.Write(through.data(), through.size(), 0, false); });
  sink.AwaitHeldAt(0);  // the write-through is at the plugin
  auto n = std::async(std::launch::async,
                      [&] { return wb.Write(newer.data(), newer.size(), 4096, false); });
  // The newer write is buffered (without the wait) or waits.
  test::AwaitPoll("the newer write to be buffered or to wait", [&] {
    return n.wait_for(std::chrono::seconds(0)) == std::future_status::ready ||
           wb.overlap_waits() > 0;
  });
  ASSERT_EQ(wb.Write(far.data(), far.size(), kFar, false), 0);
  // A batch runs and stays in flight at kFar.  Without the wait, the newer
  // write was in it, and landed (offset order) before the batch got there.
  auto flush = std::async(std::launch::async, [&] { return wb.Flush(Trigger::kClient); });
  sink.AwaitHeldAt(kFar);
  sink.ReleaseAt(0);  // the write-through lands
  ASSERT_EQ(test::Get(w, "the write-through"), 0);
  ASSERT_EQ(test::Get(n, "the newer write"), 0);
  const std::string acknowledged = ReadThrough(wb, sink, 4096, 512);  // both are
  sink.ReleaseAt(kFar);
  ASSERT_EQ(test::Get(flush, "the flush"), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(ReadThrough(wb, sink, 4096, 512), acknowledged)
      << "a read changed with no write in between";
  EXPECT_EQ(acknowledged, newer);
  EXPECT_EQ(wb.counters().writethrough_requests.load(), 1u);
}

// A client that ignores the plugin's maximum block size the filter
// advertises: no write of more reaches the plugin in one call, which the
// plugin would fail (a bypass failure counted as a plugin error).
TEST(WriteBackTest, WritesOverThePluginsMaximumReachItInPieces) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000, 256 << 10);
  o.max_request = o.max_plugin_write = 64 << 10;
  WriteBack wb(&sink, o);
  const std::string fua(128 << 10, 'F'), through(512 << 10, 'T');
  // A FUA write with nothing before it: buffered, not sent straight.
  ASSERT_EQ(wb.Write(fua.data(), 128 << 10, 0, true), 0);
  // One over queue-max-size: written through, in pieces.
  ASSERT_EQ(wb.Write(through.data(), 512 << 10, 256 << 10, false), 0);
  ASSERT_EQ(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(sink.max_write(), 64u << 10);
  EXPECT_EQ(sink.fua_writes(), 0u);
  EXPECT_EQ(wb.counters().bypass_writes.load(), 0u);
  EXPECT_EQ(wb.counters().flush_errors.load(), 0u);
  EXPECT_EQ(StatOf(wb, "plugin_writes"), 2u + 8u);
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + (128 << 10)), fua);
  EXPECT_EQ(std::string(disk.begin() + (256 << 10), disk.begin() + (768 << 10)), through);
}

// The same for a write-through, whose failure the client gets.
TEST(WriteBackTest, AFailedWriteThroughIsCounted) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, Opts(1000, 8192));
  sink.FailNext(1, EIO);
  std::string big(16384, 'B');
  EXPECT_EQ(wb.Write(big.data(), 16384, 0, false), EIO);
  EXPECT_EQ(StatOf(wb, "plugin_writes"), 1u);
  EXPECT_EQ(wb.counters().flush_errors.load(), 1u);
  EXPECT_EQ(wb.counters().last_error.load(), EIO);
}

// ... unless nbdkit aborted it (ESHUTDOWN) because its client has gone:
// that is no plugin failure (see AClientGoneDuringItsFlushFailsNoOtherFlush).
TEST(WriteBackTest, AWriteThroughAbortedForAGoneClientIsNoError) {
  FakeSink sink(kDisk);
  WriteBackOptions o = Opts(1000, 8192);
  o.writer_gone = [] { return true; };
  WriteBack wb(&sink, o);
  sink.FailNext(1, ESHUTDOWN);
  std::string big(16384, 'B');
  EXPECT_EQ(wb.Write(big.data(), 16384, 0, false), ESHUTDOWN);
  EXPECT_EQ(StatOf(wb, "plugin_writes"), 1u);
  EXPECT_EQ(wb.counters().flush_errors.load(), 0u);
  EXPECT_EQ(wb.counters().last_error.load(), 0);
}

// last_error "is ENOTCONN only if the plugin never failed before" (man
// page): a plugin failure of a write-through counts as failing before.
TEST(WriteBackTest, LastErrorKeepsAWriteThroughsPluginErrorOverENOTCONN) {
  FakeSink sink(kDisk);
  WriteBack wb(&sink, BufferedOpts(1000, 8192));
  sink.FailNext(1, EIO);
  std::string big(16384, 'B');
  ASSERT_EQ(wb.Write(big.data(), 16384, 0, false), EIO);  // the plugin failed
  ASSERT_EQ(wb.counters().last_error.load(), EIO);
  ASSERT_EQ(wb.Write(big.data(), 100, 0, false), 0);  // buffered
  sink.FailNext(1, ENOTCONN);                         // as when no plugin context was there
  EXPECT_NE(wb.Flush(Trigger::kClient), 0);
  EXPECT_EQ(wb.counters().last_error.load(), EIO)
      << "last_error says ENOTCONN, the plugin having failed before";
  EXPECT_EQ(wb.Flush(Trigger::kClient), 0);
}

}  // namespace
}  // namespace sdccache
