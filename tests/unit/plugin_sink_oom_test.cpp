// PluginSink out of memory: what it allocates for a call (the list of
// contexts a flush must reach, a block of zeroes to write when the plugin
// cannot zero) fails that call with ENOMEM; nothing throws into the engine,
// whose flusher an exception would end (and nbdkit with it).  Its own
// binary: it replaces the global operator new (fail_new.h).
#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

#include "fail_new.h"
#include "fake_context.h"
#include "plugin_sink.h"

namespace sdccache {
namespace {

using test::FakeContext;

// Fails the first allocation of `call` on this thread; returns what the
// call returned (-1 if it threw).
template <typename F>
int FailingFirstAllocation(F&& call) {
  fail_next_new = true;
  int r;
  try {
    r = call();
  } catch (...) {
    r = -1;
  }
  const bool armed = fail_next_new;
  fail_next_new = false;
  EXPECT_FALSE(armed) << "the call allocated nothing: the test tests nothing";
  return r;
}

// Without multi-conn a flush must reach each context written through.
TEST(PluginSinkOomTest, AFlushWithoutMemoryFailsWithEnomemAndTheNextOneFlushes) {
  PluginGate gate;
  FakeContext a, b;
  a.multi_conn = 0;
  PluginSink sink(a.next(), &gate);
  sink.Attach(b.next());
  char buf[512] = {};
  ASSERT_EQ(sink.Write(buf, sizeof buf, 0, false), 0);
  EXPECT_EQ(FailingFirstAllocation([&] { return sink.Flush(); }), ENOMEM);
  EXPECT_EQ(a.Count(&FakeContext::flushes) + b.Count(&FakeContext::flushes), 0);
  EXPECT_EQ(sink.Flush(), 0);
  EXPECT_EQ(a.Count(&FakeContext::flushes) + b.Count(&FakeContext::flushes), 1);
}

// A plugin that cannot zero gets blocks of zeroes written.
TEST(PluginSinkOomTest, AZeroWithoutMemoryForItsBlockFailsWithEnomem) {
  PluginGate gate;
  FakeContext a;
  a.zero = NBDKIT_ZERO_NONE;
  PluginSink sink(a.next(), &gate);
  EXPECT_EQ(FailingFirstAllocation([&] { return sink.Zero(4096, 0, false, false); }), ENOMEM);
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 0);
  EXPECT_EQ(sink.Zero(4096, 0, false, false), 0);
  EXPECT_EQ(a.Count(&FakeContext::pwrites), 1);
}

}  // namespace
}  // namespace sdccache
