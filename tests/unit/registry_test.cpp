// Registry over fake plugin contexts: an export's threads stop once no
// writer is left, whichever of several leaving writers detaches last.
#include "registry.h"

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <future>
#include <stdexcept>
#include <string>
#include <thread>

#include "await.h"
#include "fake_context.h"
#include "nbdkit_stubs.h"

namespace sdccache {
namespace {

using std::chrono::milliseconds;
using std::chrono::steady_clock;
using test::FakeContext;

// Writers a (the oldest) and b leave at once, with a plugin that lacks
// multi-conn.  b's Leave takes the last-writer path (a is already
// detaching) and finishes while a's Detach still waits for a flush through
// a, so it sees a attached; a's Detach then ends as a non-last writer.  The
// export must be parked all the same: whichever Leave detaches last does.
TEST(RegistryTest, LastOfTwoLeavingWritersParksTheExport) {
  Params p;
  p.threshold = 1;
  Registry reg(p);
  FakeContext a, b;
  a.multi_conn = b.multi_conn = 0;
  ExportCache* c = reg.Get("x", a.next());
  ASSERT_EQ(reg.Get("x", b.next()), c);
  // Writes through both contexts (the first through a, which fails it, and
  // so again through b), all written back and flushed before either leaves.
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EIO;
  }
  char buf[4096] = {1};
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);
  b.WaitFor([&] { return b.pwrites == 1; });
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = 0;
  }
  test::AwaitPoll("the write to be written back",
                  [&] { return c->writeback->queued_requests() == 0; });
  ASSERT_EQ(c->writeback->Flush(Trigger::kClient), 0);
  // A flush through a, held: a's Detach waits for it (a plugin flush, so
  // b's Leave, which writes nothing, is not held up by it).
  const int flushes = a.Count(&FakeContext::flushes);
  a.Hold(&FakeContext::hold_flush, true);
  auto held = std::async(std::launch::async, [&] { return c->sink->Flush(); });
  a.WaitFor([&] { return a.flushes > flushes; });
  std::thread leave_a([&] { EXPECT_EQ(reg.Leave(c, a.next(), false), 0); });
  test::AwaitPoll("a's Detach to begin", [&] { return c->sink->detaching() == 1; });
  EXPECT_EQ(reg.Leave(c, b.next(), false), 0);
  EXPECT_EQ(c->sink->attached(), 1u) << "the interleaving this test is for did not happen";
  EXPECT_FALSE(c->writeback->parked());
  a.Hold(&FakeContext::hold_flush, false);
  EXPECT_EQ(test::Get(held, "the held flush"), 0);
  leave_a.join();
  EXPECT_EQ(c->sink->attached(), 0u);
  EXPECT_TRUE(c->writeback->parked()) << "no writer left, but the export's threads run";
  EXPECT_EQ(c->writeback->queued_requests(), 0u);
  reg.Drain();
  reg.Close();
}

uint64_t StatOf(WriteBack* wb, const std::string& key) {
  for (const auto& [k, v] : wb->Stats())
    if (k == key) return std::stoull(v);
  ADD_FAILURE() << "no counter " << key;
  return 0;
}

// Writer `a` (the only one) writes 4 KiB to export "x", then leaves while
// the plugin fails every write: the export keeps the data.
ExportCache* LeaveWithData(Registry& reg, FakeContext& a, bool wrote) {
  ExportCache* c = reg.Get("x", a.next());
  char buf[4096] = {7};
  EXPECT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EIO;
  }
  EXPECT_EQ(reg.Leave(c, a.next(), wrote), EIO);
  return c;
}

// Registry parameters for the tests whose only writer leaves with data:
// the threshold out of reach, a short shutdown-timeout.
Params LeavingParams(std::chrono::milliseconds shutdown_timeout) {
  Params p;
  p.threshold = 1000;
  p.shutdown_timeout = shutdown_timeout;
  return p;
}

void SetSize(FakeContext& ctx, int64_t size) {
  std::lock_guard<std::mutex> l(ctx.mu);
  ctx.size = size;
}

// Makes ctx's pwrites (or, with `field`, its flushes) fail with err (0: succeed).
void SetError(FakeContext& ctx, int err, int FakeContext::*field = &FakeContext::pwrite_error) {
  std::lock_guard<std::mutex> l(ctx.mu);
  ctx.*field = err;
}

// Writer `d` connects to export "x", which holds one request from
// LeaveWithData, writes it through its context, and leaves.
void NextWriterWritesIt(Registry& reg, ExportCache* c, FakeContext& d) {
  EXPECT_EQ(reg.Get("x", d.next()), c);
  test::AwaitPoll("d to write what the export held",
                  [&] { return c->writeback->queued_requests() == 0; });
  EXPECT_EQ(d.Count(&FakeContext::pwrites), 1);
  EXPECT_EQ(reg.Leave(c, d.next(), false), 0);
}

// The last writer leaves with data the plugin failed to take: the export
// is parked with it.  The next writer's context is attached before the
// flusher starts again, so the flusher's first retry writes through it
// (started first, that retry could fail with ENOTCONN, and the data then
// waited for the next, up to a second later).
TEST(RegistryTest, NextWriterWritesWhatAParkedExportHolds) {
  Registry reg(LeavingParams(std::chrono::milliseconds(50)));
  FakeContext a, b;
  ExportCache* c = LeaveWithData(reg, a, false);
  ASSERT_TRUE(c->writeback->parked());
  ASSERT_EQ(c->writeback->queued_requests(), 1u);
  const uint64_t errors = StatOf(c->writeback.get(), "flush_errors");
  b.Hold(&FakeContext::hold_can_fua, true);
  std::thread get_b([&] { EXPECT_EQ(reg.Get("x", b.next()), c); });
  b.WaitFor([&] { return b.in_can_fua; });  // Get is asking b's plugin
  EXPECT_TRUE(c->writeback->parked()) << "the flusher started before b was attached";
  b.Hold(&FakeContext::hold_can_fua, false);
  get_b.join();
  test::AwaitPoll("the flusher's retry", [&] {
    return c->writeback->queued_requests() == 0 ||
           StatOf(c->writeback.get(), "flush_errors") > errors;
  });
  EXPECT_EQ(StatOf(c->writeback.get(), "flush_errors"), errors)
      << "the retry ran before the new writer's context was attached";
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 1);
  EXPECT_EQ(reg.Leave(c, b.next(), false), 0);
  reg.Drain();
  reg.Close();
}

// The last writer leaves with data the plugin keeps failing: its Leave
// retries until shutdown-timeout, and that is one flush requested by a
// disconnecting client, whether the writer wrote (Leave flushes once before
// it knows it is the last) or not.
TEST(RegistryTest, LastWriterRetryingIsOneDisconnectFlush) {
  for (bool wrote : {true, false}) {
    Registry reg(LeavingParams(std::chrono::milliseconds(300)));  // retries 10, 20, 40... ms apart
    FakeContext a;
    ExportCache* c = LeaveWithData(reg, a, wrote);
    EXPECT_GE(StatOf(c->writeback.get(), "flush_errors"), 2u) << "not retried; wrote=" << wrote;
    EXPECT_EQ(StatOf(c->writeback.get(), "flushes_disconnect"), 1u) << "wrote=" << wrote;
    reg.Drain();
    reg.Close();
  }
}

// A filter above (nbdkit-retry-filter) reopens the connection of the last
// writer while the plugin fails: the client stays, and a new context of
// its connection comes next.  Leave makes one attempt and leaves the data
// buffered for it, instead of retrying through the old context until
// shutdown-timeout (which held the reconnect, and the client's request,
// for 30 s).  Whether the client stays is asked only after a failed
// attempt (at a real disconnect, nbdkit logs why the question's sleep
// ended).
TEST(RegistryTest, ALastWriterReopenedByAFilterAboveLeavesItsDataForTheNextContext) {
  Registry reg(LeavingParams(std::chrono::seconds(20)));
  FakeContext a, b, d;
  int asked = 0;
  auto stays = [&] {
    ++asked;
    return true;
  };
  // Nothing left to write: not asked.
  ExportCache* c = reg.Get("x", b.next());
  char buf[4096] = {7};
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);
  EXPECT_EQ(reg.Leave(c, b.next(), true, stays), 0);
  EXPECT_EQ(asked, 0);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 1);

  ASSERT_EQ(reg.Get("x", a.next()), c);
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 8192, false), 0);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EIO;
  }
  const auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(reg.Leave(c, a.next(), true, stays), EIO);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10))
      << "retried until shutdown-timeout while the client stays";
  EXPECT_EQ(asked, 1);
  EXPECT_EQ(c->writeback->queued_requests(), 1u);
  EXPECT_TRUE(c->writeback->parked());
  NextWriterWritesIt(reg, c, d);
  reg.Drain();
  reg.Close();
}

// Last disconnects with nothing newly acknowledged between them share one
// shutdown-timeout: a connection that a retry filter above reopened and
// that then ended at nbdkit's shutdown retried the same data for
// shutdown-timeout in each .finalize, and nbdkit took twice as long to exit
// (review).  New data gets the whole time again.
TEST(RegistryTest, LastDisconnectsWithNothingNewShareOneShutdownTimeout) {
  const milliseconds timeout(2000);
  Registry reg(LeavingParams(timeout));
  FakeContext a, b, d, e;
  auto start = steady_clock::now();
  ExportCache* c = LeaveWithData(reg, a, false);
  EXPECT_GE(steady_clock::now() - start, timeout);

  SetError(b, EIO);
  SetError(d, EIO);
  ASSERT_EQ(reg.Get("x", b.next()), c);
  start = steady_clock::now();
  EXPECT_EQ(reg.Leave(c, b.next(), false), EIO);
  EXPECT_LT(steady_clock::now() - start, timeout / 2)
      << "the same data retried for shutdown-timeout again";
  EXPECT_GE(b.Count(&FakeContext::pwrites), 1) << "no attempt";

  ASSERT_EQ(reg.Get("x", d.next()), c);
  char buf[4096] = {8};
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);
  start = steady_clock::now();
  EXPECT_EQ(reg.Leave(c, d.next(), true), EIO);
  EXPECT_GE(steady_clock::now() - start, timeout) << "new data, not retried for shutdown-timeout";
  NextWriterWritesIt(reg, c, e);
  reg.Drain();
  reg.Close();
}

// A connection that wrote nothing, leaving while write-back fails, is not
// told of the others' failure and does not count a flush; with its own
// context failing too it makes no attempt of its own (review: a reader's
// disconnect waited for a whole write-back attempt and logged an error).
TEST(RegistryTest, AConnectionThatWroteNothingIsNotToldOfTheOthersFailure) {
  Registry reg(LeavingParams(std::chrono::seconds(20)));
  FakeContext a, b, e;
  SetError(a, EIO);
  SetError(b, EIO);
  ExportCache* c = reg.Get("x", a.next());
  ASSERT_EQ(reg.Get("x", b.next()), c);
  char buf[4096] = {3};
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);
  EXPECT_EQ(c->writeback->Flush(Trigger::kClient), EIO);
  test::AwaitPoll("the flusher to try b too", [&] { return c->sink->Failing(b.next()); });
  const uint64_t disconnects = StatOf(c->writeback.get(), "flushes_disconnect");
  EXPECT_EQ(reg.Leave(c, b.next(), false), 0);
  EXPECT_EQ(StatOf(c->writeback.get(), "flushes_disconnect"), disconnects);
  SetError(a, 0);
  EXPECT_EQ(c->writeback->Flush(Trigger::kClient), 0);
  EXPECT_EQ(reg.Leave(c, a.next(), true), 0);
  reg.Drain();
  reg.Close();
}

// New data that only went straight to the plugin (a write-through, larger
// than queue-max-size) counts as new too (review: its failed flush got a
// single attempt at the last disconnect).
TEST(RegistryTest, AWriteThroughStartsANewShutdownTimeout) {
  const milliseconds timeout(1000);
  Params p = LeavingParams(timeout);
  p.queue_max_size = 64 << 10;
  Registry reg(p);
  FakeContext a, b, e;
  ExportCache* c = LeaveWithData(reg, a, false);  // a retried for shutdown-timeout
  SetError(b, EIO, &FakeContext::flush_error);
  ASSERT_EQ(reg.Get("x", b.next()), c);
  test::AwaitPoll("b to write what a left", [&] { return c->writeback->queued_requests() == 0; });
  std::vector<char> big(128 << 10, 9);  // over queue-max-size: written through
  ASSERT_EQ(c->writeback->Write(big.data(), static_cast<uint32_t>(big.size()), 1 << 20, false), 0);
  const auto start = steady_clock::now();
  EXPECT_EQ(reg.Leave(c, b.next(), true), EIO);
  EXPECT_GE(steady_clock::now() - start, timeout) << "the write-through's flush retried only once";
  SetError(b, 0, &FakeContext::flush_error);
  EXPECT_EQ(reg.Get("x", e.next()), c);
  EXPECT_EQ(reg.Leave(c, e.next(), false), 0);
  reg.Drain();
  reg.Close();
}

// A writer whose context cannot tell its size (the plugin's get_size
// fails) is refused before anything is written through it: nbdkit would
// abort on a data call of that context.  The export stays parked with what
// it holds, and the next writer writes it.
TEST(RegistryTest, WriterWhoseSizeIsUnknownIsRefused) {
  Registry reg(LeavingParams(std::chrono::milliseconds(50)));
  FakeContext a, b, d;
  ExportCache* c = LeaveWithData(reg, a, false);
  ASSERT_TRUE(c->writeback->parked());
  SetSize(b, -1);
  EXPECT_THROW(reg.Get("x", b.next()), std::runtime_error);
  EXPECT_TRUE(c->writeback->parked());
  EXPECT_EQ(c->writeback->queued_requests(), 1u);
  NextWriterWritesIt(reg, c, d);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 0);
  reg.Drain();
  reg.Close();
}

// The plugin's size shrank below data the export holds (the image was
// truncated while the data waited for a writer): writing it through the
// next writer's context would abort nbdkit.  The write fails with ENOSPC
// instead and the data stays; a writer whose context is large enough again
// writes it.
TEST(RegistryTest, DataPastAShrunkSizeStaysBuffered) {
  Registry reg(LeavingParams(std::chrono::milliseconds(50)));
  FakeContext a, b, d;
  ExportCache* c = LeaveWithData(reg, a, false);  // 4 KiB at offset 0
  const uint64_t errors = StatOf(c->writeback.get(), "flush_errors");
  SetSize(b, 2048);
  ASSERT_EQ(reg.Get("x", b.next()), c);
  test::AwaitPoll("the flusher's retry through b",
                  [&] { return StatOf(c->writeback.get(), "flush_errors") > errors; });
  EXPECT_EQ(c->writeback->queued_requests(), 1u);
  EXPECT_EQ(b.Count(&FakeContext::pwrites), 0);
  EXPECT_EQ(c->writeback->Flush(Trigger::kClient), ENOSPC);
  EXPECT_EQ(reg.Leave(c, b.next(), false), ENOSPC);
  NextWriterWritesIt(reg, c, d);
  reg.Drain();
  reg.Close();
}

// A writer's plugin is asked its size and capabilities before the registry's
// lock is taken: for a remote plugin each answer may be a network round
// trip, and meanwhile other connections open and close, and the stats are
// read, under that lock.
TEST(RegistryTest, AskingAWritersPluginHoldsUpNoOtherConnection) {
  Params p;
  Registry reg(p);
  FakeContext a, b, d;
  ExportCache* x = reg.Get("x", a.next());
  b.Hold(&FakeContext::hold_can_fua, true);
  std::thread get_b([&] { EXPECT_EQ(reg.Get("x", b.next()), x); });
  b.WaitFor([&] { return b.in_can_fua; });
  auto others = std::async(std::launch::async, [&] {
    reg.Stats();
    ExportCache* y = reg.Get("y", d.next());
    EXPECT_EQ(reg.Leave(y, d.next(), false), 0);
    return reg.Find("x") == x;
  });
  const bool done = others.wait_for(std::chrono::seconds(5)) == std::future_status::ready;
  b.Hold(&FakeContext::hold_can_fua, false);
  get_b.join();
  EXPECT_TRUE(done) << "other connections waited while b's plugin was asked";
  EXPECT_TRUE(test::Get(others, "others"));
  EXPECT_EQ(x->sink->attached(), 2u);
  EXPECT_EQ(reg.Leave(x, b.next(), false), 0);
  EXPECT_EQ(reg.Leave(x, a.next(), false), 0);
  reg.Drain();
  reg.Close();
}


// a (the oldest) is dead for good (remote restarted); b, the new writer's,
// fails once (a transient error).  Both were then "failing" and every
// background call went to a: the flusher never wrote through b again, b's
// Leave (a disconnect flush, left to the flusher) failed, and the data was
// left with only the dead context.  Now the context that failed longest
// ago is tried.
TEST(RegistryTest, OneTransientErrorOnTheLiveContextDoesNotStrandTheData) {
  Params p;
  p.threshold = 1000;
  p.shutdown_timeout = std::chrono::milliseconds(50);
  Registry reg(p);
  FakeContext a, b;
  ExportCache* c = reg.Get("x", a.next());
  ASSERT_EQ(reg.Get("x", b.next()), c);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = EINVAL;
    a.flush_error = EINVAL;
  }
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = EIO;  // once
  }
  char buf[4096] = {7};
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);
  EXPECT_NE(c->writeback->Flush(Trigger::kClient), 0);  // through a
  test::AwaitPoll("a write through b", [&] { return b.Count(&FakeContext::pwrites) >= 1; });
  {
    std::lock_guard<std::mutex> l(b.mu);
    b.pwrite_error = 0;  // b works from now on
  }
  // The flusher's retries (backoff 10 ms doubling) go through b.
  test::AwaitPoll("the buffered write to go through b",
                  [&] { return c->writeback->queued_requests() == 0; });
  EXPECT_EQ(reg.Leave(c, b.next(), true), 0);
  EXPECT_GE(b.Count(&FakeContext::pwrites), 2);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.pwrite_error = 0;
    a.flush_error = 0;
  }
  reg.Leave(c, a.next(), false);
  reg.Drain();
  reg.Close();
}

// With multi-conn, a context that leaves with writes no flush covered is
// flushed; if that flush fails, the counters say so at once (they changed
// only when a later client flush reported the loss).
TEST(RegistryTest, ALeavingContextsFailedFlushIsCounted) {
  Params p;
  p.threshold = 1;
  Registry reg(p);
  FakeContext a, b;
  ExportCache* c = reg.Get("x", a.next());
  ASSERT_EQ(reg.Get("x", b.next()), c);
  char buf[4096] = {3};
  ASSERT_EQ(c->writeback->Write(buf, sizeof buf, 0, false), 0);  // written back through a
  test::AwaitPoll("the write to be written back",
                  [&] { return c->writeback->queued_requests() == 0; });
  ASSERT_EQ(StatOf(c->writeback.get(), "flush_errors"), 0u);
  SetError(a, ENOSPC, &FakeContext::flush_error);
  EXPECT_EQ(reg.Leave(c, a.next(), false), ENOSPC);
  EXPECT_EQ(a.Count(&FakeContext::flushes), 1);
  EXPECT_EQ(StatOf(c->writeback.get(), "flush_errors"), 1u);
  std::string last;
  for (const auto& [k, v] : c->writeback->Stats())
    if (k == "last_error") last = v;
  EXPECT_EQ(last, std::strerror(ENOSPC));
  reg.Leave(c, b.next(), false);
  reg.Drain();
  reg.Close();
}

}  // namespace
}  // namespace sdccache
