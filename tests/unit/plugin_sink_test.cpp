// PluginSink over fake plugin contexts: which context background calls use,
// when a leaving connection's context may go, and which contexts a flush
// must reach when the plugin lacks multi-conn.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>

#include "await.h"
#include "fake_context.h"
#include "plugin_sink.h"

namespace sdccache {
namespace {

using test::FakeContext;

// Two connections' contexts, a (the oldest) and b, in one sink.
class PluginSinkTest : public ::testing::Test {
 public:
  void Open(bool multi_conn) {
    a.multi_conn = multi_conn;  // the first context speaks for the export
    sink = std::make_unique<PluginSink>(a.next(), &gate);
    sink->Attach(b.next());
  }
  int Write() { return sink->Write(buf, sizeof buf, 0, false); }
  static void SetFlushError(FakeContext& ctx, int err) {
    std::lock_guard<std::mutex> l(ctx.mu);
    ctx.flush_error = err;
  }
  // A write by c's own client: through c while c works (PluginSink::CallerScope).
  int WriteAs(FakeContext& c) {
    PluginSink::CallerScope own(c.next());
    return Write();
  }
  std::future<int> WriteAsync() {
    return std::async(std::launch::async, [this] { return Write(); });
  }
  std::future<bool> DetachAsync(FakeContext* c) {
    return std::async(std::launch::async,
                      [this, c] { return sink->Detach(c->next(), /*unless_last=*/true); });
  }
  // Polls sink->detaching() (a count, not an event).
  void AwaitDetaching(size_t n) {
    test::AwaitPoll("Detach calls to begin", [&] { return sink->detaching() == n; });
  }

  PluginGate gate;
  FakeContext a, b, c;  // c: attached by the tests that want a third
  std::unique_ptr<PluginSink> sink;
  char buf[512] = {};
};

// A context that saw the export smaller than where the buffered data ends
// cannot write all of it: it does not count as one that stays, so the
// context leaving is told it is the last and writes the data first.  (It
// left, and the data was stuck: every write-back failed with ENOSPC.)
TEST_F(PluginSinkTest, AContextThatSawTheExportSmallerDoesNotStayForItsData) {
  b.size = 1 << 20;  // b opened before the image grew
  Open(/*multi_conn=*/true);
  EXPECT_FALSE(sink->Detach(a.next(), /*unless_last=*/true, nullptr, /*buffered_end=*/2 << 20));
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true, nullptr, /*buffered_end=*/1 << 20));
}

TEST_F(PluginSinkTest, WritesUseTheOldestContext) {
  Open(/*multi_conn=*/true);
  ASSERT_EQ(Write(), 0);
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 1);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 0);
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true));
  ASSERT_EQ(Write(), 0);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 1);
  // The only context stays unless the caller says the data is written.
  EXPECT_FALSE(sink->Detach(b.next(), /*unless_last=*/true));
  EXPECT_TRUE(sink->Detach(b.next(), /*unless_last=*/false));
  EXPECT_EQ(Write(), ENOTCONN);
}

// A context whose plugin says it cannot do what the first one could (here
// trim) is refused: a background trim through it would make nbdkit abort.
// One that can do more is taken.
TEST_F(PluginSinkTest, AContextThatCannotDoWhatTheFirstCouldIsRefused) {
  Open(/*multi_conn=*/true);
  FakeContext weak, strong;
  weak.trim = 0;
  EXPECT_THROW(sink->Attach(weak.next()), std::runtime_error);
  EXPECT_EQ(sink->attached(), 2u);
  FakeContext not_multi;
  not_multi.multi_conn = 0;
  EXPECT_THROW(sink->Attach(not_multi.next()), std::runtime_error);
  sink->Attach(strong.next());
  EXPECT_EQ(sink->attached(), 3u);
  EXPECT_TRUE(sink->Detach(strong.next(), /*unless_last=*/true));
}

// Without multi-conn, a plugin flush covers only the writes made through
// the same context.  A connection whose context carried writes that no
// flush through it has covered yet (it need not have written anything
// itself) flushes it as it leaves; one with nothing unflushed does not.
TEST_F(PluginSinkTest, ALeavingContextFlushesWhatWasWrittenThroughIt) {
  Open(/*multi_conn=*/false);
  ASSERT_EQ(Write(), 0);  // through a
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true));
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1) << "a left with a write no flush covered";
  ASSERT_EQ(Write(), 0);  // through b
  ASSERT_EQ(sink->Flush(), 0);
  EXPECT_EQ(b.Count(&FakeContext::flushes), 1);
  FakeContext c;
  sink->Attach(c.next());
  EXPECT_TRUE(sink->Detach(b.next(), /*unless_last=*/true));
  EXPECT_EQ(b.Count(&FakeContext::flushes), 1) << "b had nothing unflushed";
  EXPECT_TRUE(sink->Detach(c.next(), /*unless_last=*/false));
  EXPECT_EQ(c.Count(&FakeContext::flushes), 0) << "c carried no writes";
}

// With multi-conn too, a context that carried writes no flush has covered
// yet flushes as it leaves: nbdkit's multi-conn filter (emulate mode)
// forgets a closed connection's writes, and a later flush through another
// context then reached no plugin connection (review).  A flush through any
// context covers every context's writes finished before it.
TEST_F(PluginSinkTest, WithMultiConnALeavingContextFlushesWritesNoFlushCoveredYet) {
  Open(/*multi_conn=*/true);
  ASSERT_EQ(Write(), 0);  // through a (the flusher's, say, of b's data)
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true));
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1) << "a left with a write no flush covered";
  sink->Attach(c.next());
  ASSERT_EQ(WriteAs(c), 0);     // through c
  ASSERT_EQ(sink->Flush(), 0);  // through b, the oldest: covers c's write
  EXPECT_EQ(b.Count(&FakeContext::flushes), 1);
  EXPECT_TRUE(sink->Detach(c.next(), /*unless_last=*/true));
  EXPECT_EQ(c.Count(&FakeContext::flushes), 0) << "c's write was covered by b's flush";
  EXPECT_TRUE(sink->Detach(b.next(), /*unless_last=*/false));
  EXPECT_EQ(b.Count(&FakeContext::flushes), 1) << "b carried no writes";
}

// With multi-conn, a leaving context whose flush fails reports the loss to
// the next Flush, which a flush through another context would not cover
// under nbdkit's multi-conn filter (review: b's flush succeeded with no
// plugin flush after the write ever succeeding).  A write made with FUA,
// or one that failed, needs no flush as its context leaves (review: a
// client that writes only with FUA and flushes cost a plugin flush per
// disconnect).
TEST_F(PluginSinkTest, WithMultiConnALeavingContextsFailedFlushIsReported) {
  Open(/*multi_conn=*/true);
  ASSERT_EQ(Write(), 0);  // through a
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.flush_error = EIO;
  }
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true));
  EXPECT_EQ(sink->Flush(), EIO) << "the writes a's failed flush left uncovered";
  EXPECT_EQ(sink->Flush(), 0);

  // A loss a client request was failed for (WriteBack::TellLoss) is not
  // reported again.
  sink->Attach(c.next());
  ASSERT_EQ(WriteAs(c), 0);
  SetFlushError(c, EIO);
  EXPECT_TRUE(sink->Detach(c.next(), /*unless_last=*/true));
  ASSERT_EQ(sink->losses(), 2u);
  sink->LossesTold(2);
  EXPECT_EQ(sink->Flush(), 0) << "a loss told of was reported again";
  SetFlushError(c, 0);

  sink->Attach(c.next());
  ASSERT_EQ(sink->Write(buf, sizeof buf, 0, /*fua=*/true), 0);  // through b, with FUA
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = EIO;
  }
  EXPECT_EQ(Write(), EIO);  // through b, failed
  const int flushes = b.Count(&FakeContext::flushes);
  EXPECT_TRUE(sink->Detach(b.next(), /*unless_last=*/true));
  EXPECT_EQ(b.Count(&FakeContext::flushes), flushes) << "b carried no write that needs a flush";
  EXPECT_TRUE(sink->Detach(c.next(), /*unless_last=*/false));
}

// The context that may still write what is buffered: it has not failed,
// and every other one has (Registry::Leave then makes one more attempt
// before it goes).
TEST_F(PluginSinkTest, OnlyOneNotFailingIsTheContextLeftThatWorks) {
  Open(/*multi_conn=*/true);
  EXPECT_FALSE(sink->OnlyOneNotFailing(b.next(), 0)) << "a has not failed";
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EIO;
  }
  EXPECT_EQ(Write(), EIO);  // through a, the oldest
  EXPECT_TRUE(sink->OnlyOneNotFailing(b.next(), 0));
  EXPECT_FALSE(sink->OnlyOneNotFailing(a.next(), 0)) << "a failed";
  EXPECT_FALSE(sink->OnlyOneNotFailing(b.next(), 2u << 30)) << "b is too small for that";
  sink->Attach(c.next());
  EXPECT_FALSE(sink->OnlyOneNotFailing(b.next(), 0)) << "c has not failed either";
  EXPECT_TRUE(sink->Detach(c.next(), /*unless_last=*/true));
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true));
  EXPECT_FALSE(sink->OnlyOneNotFailing(b.next(), 0)) << "no other context";
}

// A maximum block size that is no multiple of the minimum (nbdkit 1.32's
// blocksize-policy filter allows one): pieces of a larger request, each
// starting where the one before ended, stay aligned (review: the second
// piece of a 12 KiB write under minimum 4096, maximum 6144 was refused,
// and the acknowledged write was lost).
TEST(PluginSinkAskTest, AMaximumThatIsNoMultipleOfTheMinimumIsRoundedDown) {
  PluginGate gate;
  FakeContext ctx;
  ctx.min_block = 4096;
  ctx.max_block = 6144;
  EXPECT_EQ(PluginSink::Ask(ctx.next(), &gate).max_write, 4096u);
  ctx.max_block = 3 * 4096;
  EXPECT_EQ(PluginSink::Ask(ctx.next(), &gate).max_write, 3u * 4096);
  ctx.min_block = 0;
  ctx.max_block = 6144;
  EXPECT_EQ(PluginSink::Ask(ctx.next(), &gate).max_write, 6144u);
}

// Without multi-conn, a flush reaches every context that carried writes
// since its last flush: here both, a background write having gone through
// a and a client's own (a write-through, say) through b.
TEST_F(PluginSinkTest, AFlushReachesEveryContextWithUnflushedWrites) {
  Open(/*multi_conn=*/false);
  ASSERT_EQ(Write(), 0);  // background: through a
  ASSERT_EQ(WriteAs(b), 0);
  ASSERT_EQ(a.Count(&FakeContext::pwrites), 1);
  ASSERT_EQ(b.Count(&FakeContext::pwrites), 1);
  ASSERT_EQ(sink->Flush(), 0);
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1) << "a's write was not flushed";
  EXPECT_EQ(b.Count(&FakeContext::flushes), 1) << "b's write was not flushed";
}

// A plugin flush never runs beside a write (nbdkit's multi-conn filter
// takes a connection as clean once a flush ends, even if a write through it
// ended after the flush began, and skips it at the next flush).  A write
// that comes while a flush runs waits for it, and the next flush covers it.
TEST_F(PluginSinkTest, AWriteWaitsForAFlushThatRuns) {
  Open(/*multi_conn=*/false);
  ASSERT_EQ(Write(), 0);  // through a
  ASSERT_EQ(WriteAs(b), 0);
  b.Hold(&FakeContext::hold_flush, true);
  auto flush = std::async(std::launch::async, [this] { return sink->Flush(); });
  b.WaitFor([&] { return b.flushes == 1; });  // b's flush has begun
  auto write = std::async(std::launch::async, [this] { return WriteAs(b); });
  test::AwaitPoll("the write to wait for its turn", [&] { return gate.waiting() == 1; });
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 1) << "a write ran beside a flush";
  b.Hold(&FakeContext::hold_flush, false);
  ASSERT_EQ(test::Get(flush, "the first flush"), 0);
  ASSERT_EQ(test::Get(write, "the write"), 0);
  ASSERT_EQ(sink->Flush(), 0);
  EXPECT_EQ(b.Count(&FakeContext::flushes), 2) << "b's last write was taken as flushed";
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1);
}

// The turns are shared by every export (one PluginGate): nbdkit's
// multi-conn filter groups every export's connections, so one export's
// flush cleans the others' too (review).
TEST_F(PluginSinkTest, AFlushOfOneExportWaitsForAnotherExportsWrite) {
  Open(/*multi_conn=*/true);
  FakeContext x;
  PluginSink other(x.next(), &gate);
  a.Hold(&FakeContext::hold_pwrite, true);
  auto write = WriteAsync();
  a.WaitFor([&] { return a.in_pwrite; });
  auto flush = std::async(std::launch::async, [&] { return other.Flush(); });
  test::AwaitPoll("the other export's flush to wait for its turn",
                  [&] { return gate.waiting() == 1; });
  EXPECT_EQ(x.Count(&FakeContext::flushes), 0) << "a flush ran beside another export's write";
  a.Hold(&FakeContext::hold_pwrite, false);
  EXPECT_EQ(test::Get(write, "the write"), 0);
  EXPECT_EQ(test::Get(flush, "the flush"), 0);
  EXPECT_EQ(x.Count(&FakeContext::flushes), 1);
}

// A flush waits for the writes in flight, and keeps new writes out while it
// waits (steady write-back would put it off for ever); a FUA write, which
// a layer below may emulate with a flush, waits for both.
TEST_F(PluginSinkTest, AFlushWaitsForTheWritesInFlightAndGoesBeforeNewOnes) {
  Open(/*multi_conn=*/true);
  a.Hold(&FakeContext::hold_pwrite, true);
  auto first = WriteAsync();
  a.WaitFor([&] { return a.in_pwrite; });
  auto flush = std::async(std::launch::async, [this] { return sink->Flush(); });
  test::AwaitPoll("the flush to wait for its turn", [&] { return gate.waiting() == 1; });
  EXPECT_EQ(a.Count(&FakeContext::flushes), 0) << "a flush ran beside a write";
  auto later = WriteAsync();
  test::AwaitPoll("the later write to wait", [&] { return gate.waiting() == 2; });
  a.Hold(&FakeContext::hold_pwrite, false);
  EXPECT_EQ(test::Get(first, "the first write"), 0);
  EXPECT_EQ(test::Get(flush, "the flush"), 0);
  EXPECT_EQ(test::Get(later, "the later write"), 0);
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1);
  EXPECT_EQ(a.Count(&FakeContext::pwrites_at_flush), 1)
      << "the flush did not go before the write that came after it";

  a.Hold(&FakeContext::hold_pwrite, true);
  auto held = WriteAsync();
  a.WaitFor([&] { return a.in_pwrite; });
  auto fua =
      std::async(std::launch::async, [this] { return sink->Write(buf, sizeof buf, 0, true); });
  test::AwaitPoll("the FUA write to wait for its turn", [&] { return gate.waiting() == 1; });
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 3) << "a FUA write ran beside a write";
  a.Hold(&FakeContext::hold_pwrite, false);
  EXPECT_EQ(test::Get(held, "the held write"), 0);
  EXPECT_EQ(test::Get(fua, "the FUA write"), 0);
}

// Two connections leave at once while a background write uses the first
// one's context.  The first waits for that write; meanwhile the second
// leaves.  At least one of them must be told it is the last, to write what
// is still buffered before it goes, or nobody would.
TEST_F(PluginSinkTest, OfTwoLeavingTogetherOneIsTheLast) {
  Open(/*multi_conn=*/true);
  a.Hold(&FakeContext::hold_pwrite, true);
  auto write = WriteAsync();
  a.WaitFor([&] { return a.in_pwrite; });
  auto leave_a = DetachAsync(&a);
  AwaitDetaching(1);
  const bool b_left = sink->Detach(b.next(), /*unless_last=*/true);
  a.Hold(&FakeContext::hold_pwrite, false);
  EXPECT_EQ(test::Get(write, "write"), 0);
  const bool a_left = test::Get(leave_a, "a's Detach to return");
  EXPECT_FALSE(a_left && b_left) << "both contexts left: nothing would write the buffered data";
  // The one told it is the last writes out, then goes.
  if (!a_left) {
    EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/false));
  }
  if (!b_left) {
    EXPECT_TRUE(sink->Detach(b.next(), /*unless_last=*/false));
  }
  EXPECT_EQ(Write(), ENOTCONN);
}

// A flush that runs while a context with unflushed writes leaves (its
// Detach flushing it) returns only once those writes are flushed: the
// flush covers every context that carried writes, not just one.
TEST_F(PluginSinkTest, AFlushWaitsForALeavingContextsWrites) {
  Open(/*multi_conn=*/false);
  ASSERT_EQ(Write(), 0);  // through a, not flushed
  a.Hold(&FakeContext::hold_flush, true);
  auto leave_a = DetachAsync(&a);
  a.WaitFor([&] { return a.flushes > 0; });  // Detach is flushing a
  auto flush = std::async(std::launch::async, [&] { return sink->Flush(); });
  // Can only show that it has not finished yet: 100 ms without an answer.
  EXPECT_EQ(flush.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout)
      << "a flush returned before the writes made through a leaving context were flushed";
  a.Hold(&FakeContext::hold_flush, false);
  EXPECT_EQ(test::Get(flush, "flush"), 0);
  EXPECT_TRUE(test::Get(leave_a, "leave_a"));
  EXPECT_GE(a.Count(&FakeContext::flushes_finished), 1);
}

// The last connection leaves (after its FlushUntil, say, while the flusher
// still retries).  Once its context is leaving, no write may go to it: its
// Detach may be flushing it for the last time, and a write after that
// flush would leave with it, never flushed.  The write fails (ENOTCONN)
// and stays buffered instead.
TEST_F(PluginSinkTest, NoWriteGoesToALeavingContext) {
  Open(/*multi_conn=*/false);
  ASSERT_TRUE(sink->Detach(b.next(), /*unless_last=*/true));  // b carried nothing
  ASSERT_EQ(Write(), 0);                                      // through a
  a.Hold(&FakeContext::hold_flush, true);
  auto leave_a = std::async(std::launch::async,
                            [this] { return sink->Detach(a.next(), /*unless_last=*/false); });
  a.WaitFor([&] { return a.flushes > 0; });  // Detach is flushing a
  auto write = WriteAsync();  // waits for the flush to end (no write runs beside one)
  test::AwaitPoll("the write to wait for its turn", [&] { return gate.waiting() == 1; });
  a.Hold(&FakeContext::hold_flush, false);
  EXPECT_EQ(test::Get(write, "the write"), ENOTCONN) << "a write went to a leaving context";
  EXPECT_TRUE(test::Get(leave_a, "leave_a"));
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 1);
}

// A leaving context's flush fails: it must go anyway (nbdkit frees it), but
// its writes were never flushed, so the next Flush must fail too, for the
// engine to keep the data and write it again through another context; with
// the plugin's error (it was EIO, which the plugin never returned).
TEST_F(PluginSinkTest, AFailedLeavingFlushFailsTheNextFlush) {
  Open(/*multi_conn=*/false);
  ASSERT_EQ(Write(), 0);  // through a
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.flush_error = ENOSPC;
  }
  EXPECT_EQ(sink->losses(), 0u);
  int detach_err = 0;
  EXPECT_TRUE(sink->Detach(a.next(), /*unless_last=*/true, &detach_err));
  EXPECT_EQ(detach_err, ENOSPC);
  EXPECT_EQ(sink->loss_error(), ENOSPC);
  EXPECT_EQ(sink->Flush(), ENOSPC) << "Flush reported writes made through a as flushed";
  EXPECT_EQ(sink->Flush(), 0) << "the loss is reported once";
  // ... but stays counted, for a batch that wrote through a before its
  // flush (the first Flush above could be another's).
  EXPECT_EQ(sink->losses(), 1u);
}

// A context that fails for good (the nbd plugin's, once the server it
// talks to has restarted) while another, opened since, works: the
// flusher's writes went to the oldest, dead one, so nothing was written
// until every old connection closed, and then it was lost.
TEST_F(PluginSinkTest, BackgroundWritesLeaveAContextWhoseLastCallFailed) {
  Open(/*multi_conn=*/true);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EINVAL;
  }
  EXPECT_EQ(Write(), EINVAL);  // through a, the oldest
  EXPECT_EQ(Write(), 0) << "written through the failing context again";
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 1);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 1);
  // With multi-conn, a client's thread leaves its own connection too once
  // a call through it failed and another has worked since (b, just now;
  // OwnLeftForLocked): it kept writing through its own dead
  // context, failing its FUA writes and its batches (everyone's data).
  EXPECT_EQ(WriteAs(a), 0) << "a's client wrote through its failing context again";
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 1);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 2);
  // A context that works again is used again once the others fail (the
  // one that failed longest ago), and then by its own client too.
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = 0;
  }
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = EIO;
  }
  EXPECT_EQ(Write(), EIO);  // through b, not failing until now
  EXPECT_EQ(Write(), 0);    // through a, which failed longest ago
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 2);
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = 0;
  }
  EXPECT_EQ(WriteAs(a), 0);
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 3) << "a's client left its recovered context";
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 3);
}

// Without multi-conn, a flush must reach every context written through.
// One whose flush fails (for good, say) had every later flush fail with
// it.  Its unflushed writes now count as lost: that flush fails (the
// engine writes them again, elsewhere), and the next ones need not reach
// it.
TEST_F(PluginSinkTest, AContextWhoseFlushFailsNoLongerFailsEveryFlush) {
  Open(/*multi_conn=*/false);
  ASSERT_EQ(Write(), 0);  // through a
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.flush_error = EINVAL;
    a.pwrite_error = EINVAL;
  }
  EXPECT_NE(sink->Flush(), 0);
  EXPECT_EQ(sink->losses(), 1u) << "a's unflushed write not counted as lost";
  EXPECT_EQ(Write(), 0) << "written again through the failing context";  // through b
  EXPECT_EQ(sink->Flush(), 0) << "every flush fails while a is attached";
  EXPECT_EQ(b.Count(&FakeContext::flushes), 1);
}

// The same, with the failing context's own client writing: its thread
// wrote through its own context again (CallerScope), so that context was
// unflushed again at every Flush, and every other client's next flush or
// FUA failed on it (47 of 50 flushes of a healthy client, with the nbd
// plugin after the remote restarted).  Once a flush through it has
// failed, its own client's writes go elsewhere too.
TEST_F(PluginSinkTest, AContextWhoseFlushFailedIsLeftByItsOwnClient) {
  Open(/*multi_conn=*/false);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.flush_error = EINVAL;
    a.pwrite_error = EINVAL;
  }
  EXPECT_EQ(WriteAs(a), EINVAL);  // its own, dead, context
  EXPECT_NE(sink->Flush(), 0);
  ASSERT_EQ(Write(), 0);  // background, through b: b is known to work
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(WriteAs(a), 0) << "a's client wrote through its dead context again";
    EXPECT_EQ(sink->Flush(), 0) << "a flush failed on a's context, " << i;
  }
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 1);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 4);
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1);
  // Background calls still prefer b; a context that works again is used by
  // its own client once a call through it succeeds (here: the only one).
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.flush_error = 0;
    a.pwrite_error = 0;
  }
  ASSERT_TRUE(sink->Detach(b.next(), /*unless_last=*/false));
  EXPECT_EQ(WriteAs(a), 0);
  EXPECT_EQ(sink->Flush(), 0);
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 2);
}

// While no other context has had a call succeed since a client's own
// context failed (an outage: every context failing, or the others never
// used), the client stays on its own.  With nbdkit's retry filter below,
// a failed write through another client's context made the retry filter
// reopen that context from this thread, and nbdkit 1.32 aborted (losing
// what was buffered); it can reopen the client's own.  Once another
// context is known to work, the client leaves its own.
void StaysOnItsFailingContextUntilAnotherWorks(PluginSinkTest* t, bool multi_conn) {
  t->Open(multi_conn);
  {
    std::lock_guard<std::mutex> l(t->a.mu);
    t->a.flush_error = EIO;
    t->a.pwrite_error = EIO;
  }
  EXPECT_EQ(t->WriteAs(t->a), EIO);
  if (!multi_conn) {
    EXPECT_NE(t->sink->Flush(), 0);  // a's writes counted lost
  }
  EXPECT_EQ(t->WriteAs(t->a), EIO) << "left its own context while no other was known to work";
  EXPECT_EQ(t->a.Count(&FakeContext::pwrites), 2);
  EXPECT_EQ(t->b.Count(&FakeContext::pwrites), 0);
  ASSERT_EQ(t->Write(), 0);  // background, through b (a is failing): b works
  EXPECT_EQ(t->WriteAs(t->a), 0) << "stayed on its failing context once another worked";
  EXPECT_EQ(t->a.Count(&FakeContext::pwrites), 2);
  EXPECT_EQ(t->b.Count(&FakeContext::pwrites), 2);
}

TEST_F(PluginSinkTest, AClientStaysOnItsFailingContextUntilAnotherWorks) {
  StaysOnItsFailingContextUntilAnotherWorks(this, /*multi_conn=*/true);
}

TEST_F(PluginSinkTest, AClientStaysOnItsFailingContextUntilAnotherWorksNoMultiConn) {
  StaysOnItsFailingContextUntilAnotherWorks(this, /*multi_conn=*/false);
}

// A client that leaves its failing context goes to the one known to work
// (the most recent success since its own failed), not to the oldest that
// merely has not failed: that may be one never used, opened before a
// remote restart, whose failure under a retry filter below would make it
// reopen another client's context from this thread (nbdkit aborts).  And
// a context that worked but fails now is no reason to leave.
TEST_F(PluginSinkTest, AClientLeavesItsFailingContextForOneKnownToWork) {
  Open(/*multi_conn=*/true);
  sink->Attach(c.next());  // contexts: a, b (never used), c
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EIO;
  }
  EXPECT_EQ(WriteAs(a), EIO);
  ASSERT_EQ(WriteAs(c), 0);  // c's client: c works
  EXPECT_EQ(WriteAs(a), 0);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 0) << "left for a context never used";
  EXPECT_EQ(c.Count(&FakeContext::pwrites), 2);
  // c fails now: a's client stays on its own (no other is known to work).
  {
    std::lock_guard<std::mutex> l(c.mu);
    c.pwrite_error = EIO;
  }
  EXPECT_EQ(WriteAs(c), EIO);
  EXPECT_EQ(WriteAs(a), EIO);
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 2) << "left its own for one failing now";
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 0);
}

// A context that works but had one transient failure was never tried again
// by background calls while an older one failed for good: both were
// "failing", and PickLocked took the oldest, the dead one, every time
// (nothing else reset b's flag).  Now the one that failed longest ago.
TEST_F(PluginSinkTest, ATransientFailureOnTheWorkingContextDoesNotStrandTheFlusher) {
  Open(/*multi_conn=*/true);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EINVAL;  // a: dead for good (remote restarted)
  }
  EXPECT_EQ(Write(), EINVAL);  // through a: a failing
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = EIO;  // one transient failure on b
  }
  EXPECT_EQ(Write(), EIO);  // through b: b failing too
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = 0;  // b works again
  }
  int ok = 0;
  for (int i = 0; i < 10; ++i) ok += Write() == 0;
  EXPECT_GT(ok, 0)
      << "10 background writes all went to the dead context a; b (working) never retried";
  EXPECT_GT(b.Count(&FakeContext::pwrites), 1);
}

}  // namespace
}  // namespace sdccache
