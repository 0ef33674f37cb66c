// PluginSink over fake plugin contexts: which context background calls use,
// and when a leaving connection's context may go.
#include <gtest/gtest.h>

#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <thread>
#include <type_traits>

#include "plugin_sink.h"

namespace sdccache {
namespace {

// A plugin context whose pwrite can be held until the test lets it go.
// The ops come first, so the nbdkit_next* the sink passes back is the
// FakeContext.
struct FakeContext {
  nbdkit_next ops{};
  int pwrites = 0;      // guarded by mu
  int flushes = 0;      // guarded by mu: flush calls begun
  int flushes_finished = 0;  // guarded by mu
  bool hold_flush = false;   // guarded by mu: flush waits while set
  int multi_conn = 1;   // what can_multi_conn says
  bool hold = false;    // guarded by mu: pwrite waits while set
  bool inside = false;  // guarded by mu: a pwrite is running
  std::mutex mu;
  std::condition_variable cv;

  FakeContext() {
    ops.can_fua = [](nbdkit_next*) { return NBDKIT_FUA_NATIVE; };
    ops.can_zero = [](nbdkit_next*) { return NBDKIT_ZERO_NATIVE; };
    ops.can_flush = [](nbdkit_next*) { return 1; };
    ops.can_trim = [](nbdkit_next*) { return 1; };
    ops.can_multi_conn = [](nbdkit_next* n) {
      return reinterpret_cast<FakeContext*>(n)->multi_conn;
    };
    ops.block_size = [](nbdkit_next*, uint32_t*, uint32_t*, uint32_t*) { return 0; };
    ops.pwrite = [](nbdkit_next* n, const void*, uint32_t, uint64_t, uint32_t, int*) {
      auto* c = reinterpret_cast<FakeContext*>(n);
      std::unique_lock<std::mutex> l(c->mu);
      ++c->pwrites;
      c->inside = true;
      c->cv.notify_all();
      c->cv.wait(l, [&] { return !c->hold; });
      c->inside = false;
      return 0;
    };
    ops.flush = [](nbdkit_next* n, uint32_t, int*) {
      auto* c = reinterpret_cast<FakeContext*>(n);
      std::unique_lock<std::mutex> l(c->mu);
      ++c->flushes;
      c->cv.notify_all();
      c->cv.wait(l, [&] { return !c->hold_flush; });
      ++c->flushes_finished;
      return 0;
    };
  }
  nbdkit_next* next() { return &ops; }
  int flushed() {
    std::lock_guard<std::mutex> l(mu);
    return flushes;
  }
  int flushes_done() {
    std::lock_guard<std::mutex> l(mu);
    return flushes_finished;
  }
};
static_assert(std::is_standard_layout_v<FakeContext>, "ops must convert to FakeContext*");

// Polls a condition with a deadline (no fixed sleeps).
template <typename P>
bool Eventually(P pred) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::yield();
  }
  return true;
}

TEST(PluginSinkTest, WritesUseTheOldestContext) {
  PluginGate gate;
  FakeContext a, b;
  PluginSink sink(a.next(), &gate);
  sink.Attach(b.next());
  char buf[512] = {};
  ASSERT_EQ(sink.Write(buf, sizeof buf, 0, false), 0);
  EXPECT_EQ(a.pwrites, 1);
  EXPECT_EQ(b.pwrites, 0);
  EXPECT_TRUE(sink.Detach(a.next(), /*unless_last=*/true));
  ASSERT_EQ(sink.Write(buf, sizeof buf, 0, false), 0);
  EXPECT_EQ(b.pwrites, 1);
  // The only context stays unless the caller says the data is written.
  EXPECT_FALSE(sink.Detach(b.next(), /*unless_last=*/true));
  EXPECT_TRUE(sink.Detach(b.next(), /*unless_last=*/false));
  EXPECT_EQ(sink.Write(buf, sizeof buf, 0, false), ENOTCONN);
}

// Without multi-conn, a plugin flush covers only the writes made through
// the same context.  A connection whose context carried writes that no
// flush through it has covered yet (it need not have written anything
// itself) flushes it as it leaves; one with nothing unflushed does not.
TEST(PluginSinkTest, ALeavingContextFlushesWhatWasWrittenThroughIt) {
  PluginGate gate;
  FakeContext a, b;
  a.multi_conn = 0;
  PluginSink sink(a.next(), &gate);
  sink.Attach(b.next());
  char buf[512] = {};
  ASSERT_EQ(sink.Write(buf, sizeof buf, 0, false), 0);  // through a
  EXPECT_TRUE(sink.Detach(a.next(), /*unless_last=*/true));
  EXPECT_EQ(a.flushed(), 1) << "a left with a write no flush through it covered";
  ASSERT_EQ(sink.Write(buf, sizeof buf, 0, false), 0);  // through b
  ASSERT_EQ(sink.Flush(), 0);
  EXPECT_EQ(b.flushed(), 1);
  FakeContext c;
  sink.Attach(c.next());
  EXPECT_TRUE(sink.Detach(b.next(), /*unless_last=*/true));
  EXPECT_EQ(b.flushed(), 1) << "b had nothing unflushed";
  EXPECT_TRUE(sink.Detach(c.next(), /*unless_last=*/false));
  EXPECT_EQ(c.flushed(), 0) << "c carried no writes";
}

// Two connections leave at once while a background write uses the first
// one's context.  The first waits for that write; meanwhile the second
// leaves.  At least one of them must be told it is the last, to write what
// is still buffered before it goes, or nobody would.
TEST(PluginSinkTest, OfTwoLeavingTogetherOneIsTheLast) {
  PluginGate gate;
  FakeContext a, b;
  PluginSink sink(a.next(), &gate);
  sink.Attach(b.next());
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.hold = true;
  }
  char buf[512] = {};
  auto write =
      std::async(std::launch::async, [&] { return sink.Write(buf, sizeof buf, 0, false); });
  {
    std::unique_lock<std::mutex> l(a.mu);
    ASSERT_TRUE(a.cv.wait_for(l, std::chrono::seconds(10), [&] { return a.inside; }));
  }
  auto leave_a =
      std::async(std::launch::async, [&] { return sink.Detach(a.next(), /*unless_last=*/true); });
  ASSERT_TRUE(Eventually([&] { return sink.detaching() == 1; }));
  const bool b_left = sink.Detach(b.next(), /*unless_last=*/true);
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.hold = false;
  }
  a.cv.notify_all();
  EXPECT_EQ(write.get(), 0);
  ASSERT_EQ(leave_a.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  const bool a_left = leave_a.get();
  EXPECT_FALSE(a_left && b_left) << "both contexts left: nothing would write the buffered data";
  // The one told it is the last writes out, then goes.
  if (!a_left) {
    EXPECT_TRUE(sink.Detach(a.next(), /*unless_last=*/false));
  }
  if (!b_left) {
    EXPECT_TRUE(sink.Detach(b.next(), /*unless_last=*/false));
  }
  EXPECT_EQ(sink.Write(buf, sizeof buf, 0, false), ENOTCONN);
}

// A client flush that runs while a context with unflushed writes leaves
// (its Detach flushing it) returns only once those writes are flushed: the
// flush covers every context that carried writes, not just one.
TEST(PluginSinkTest, AFlushWaitsForALeavingContextsWrites) {
  PluginGate gate;
  FakeContext a, b;
  a.multi_conn = 0;
  PluginSink sink(a.next(), &gate);
  sink.Attach(b.next());
  char buf[512] = {};
  ASSERT_EQ(sink.Write(buf, sizeof buf, 0, false), 0);  // through a, not flushed
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.hold_flush = true;
  }
  auto leave_a =
      std::async(std::launch::async, [&] { return sink.Detach(a.next(), /*unless_last=*/true); });
  {
    std::unique_lock<std::mutex> l(a.mu);  // a's Detach is flushing it
    ASSERT_TRUE(a.cv.wait_for(l, std::chrono::seconds(10), [&] { return a.flushes > 0; }));
  }
  auto flush = std::async(std::launch::async, [&] { return sink.Flush(); });
  // The flush must not finish while a's writes are unflushed.
  EXPECT_EQ(flush.wait_for(std::chrono::milliseconds(100)), std::future_status::timeout)
      << "a flush returned before the writes made through a leaving context were flushed";
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.hold_flush = false;
  }
  a.cv.notify_all();
  EXPECT_EQ(flush.get(), 0);
  EXPECT_TRUE(leave_a.get());
  EXPECT_GE(a.flushes_done(), 1);
}

}  // namespace
}  // namespace sdccache
