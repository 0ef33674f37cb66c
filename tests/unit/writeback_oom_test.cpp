// A failed allocation while a request is buffered: the request fails
// (nbdkit's glue answers ENOMEM), and nothing acknowledged before it is
// lost.  Its own binary: it replaces the global operator new.
#if defined(__GNUC__) && !defined(__clang__)
// g++ sees the replaced operator delete free() what operator new returned.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <future>
#include <new>
#include <string>
#include <vector>

#include "fake_sink.h"
#include "writeback.h"

namespace {
// Armed: the next operator new on this thread throws std::bad_alloc.
thread_local bool fail_next_new = false;
}  // namespace

void* operator new(std::size_t n) {
  if (fail_next_new) {
    fail_next_new = false;
    throw std::bad_alloc();
  }
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

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
  EXPECT_EQ(flush.get(), 0);
  const std::vector<uint8_t> disk = sink.Disk();
  EXPECT_EQ(std::string(disk.begin(), disk.begin() + 100), a);
}

}  // namespace
}  // namespace sdccache
