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
  int flushes = 0;      // guarded by mu
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
      std::lock_guard<std::mutex> l(c->mu);
      ++c->flushes;
      return 0;
    };
  }
  nbdkit_next* next() { return &ops; }
  int flushed() {
    std::lock_guard<std::mutex> l(mu);
    return flushes;
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
// leaves.  The first is then the last one: it must be told so, to write
// what is still buffered before it goes, or nobody would.
TEST(PluginSinkTest, OfTwoLeavingTogetherTheLaterIsTheLast) {
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
  EXPECT_TRUE(sink.Detach(b.next(), /*unless_last=*/true));  // a is still there
  {
    std::lock_guard<std::mutex> l(a.mu);
    a.hold = false;
  }
  a.cv.notify_all();
  EXPECT_EQ(write.get(), 0);
  ASSERT_EQ(leave_a.wait_for(std::chrono::seconds(10)), std::future_status::ready);
  EXPECT_FALSE(leave_a.get()) << "both contexts left: nothing would write the buffered data";
  EXPECT_TRUE(sink.Detach(a.next(), /*unless_last=*/false));
}

}  // namespace
}  // namespace sdccache
