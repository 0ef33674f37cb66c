// memory_bytes against the real heap (mallinfo2 deltas) at 1, 1000 and
// 100000 queued requests.
#include <gtest/gtest.h>
#include <malloc.h>

#include <chrono>
#include <cmath>
#include <string>
#include <vector>

#include "chunk.h"
#include "fake_sink.h"
#include "memory_account.h"
#include "writeback.h"

namespace sdccache {
namespace {

size_t HeapInUse() {
  struct mallinfo2 mi = mallinfo2();
  return mi.uordblks + mi.hblkhd;
}

class MemoryTest : public ::testing::TestWithParam<int> {};

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SDC_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SDC_SANITIZED 1
#endif
#endif

TEST_P(MemoryTest, MemoryBytesTracksRealHeapWithinTenPercent) {
#ifdef SDC_SANITIZED
  GTEST_SKIP() << "sanitizer allocators do not report through mallinfo2";
#endif
  const int n = GetParam();
  // Discards everything: only the buffering is measured.
  struct NullSink : Sink {
    int Write(const void*, uint32_t, uint64_t, bool) override { return 0; }
    int Zero(uint32_t, uint64_t, bool, bool) override { return 0; }
    int Trim(uint32_t, uint64_t, bool) override { return 0; }
    int Flush() override { return 0; }
  } sink;
  WriteBackOptions o;
  o.threshold = 1048576;
  o.queue_max_bytes = 1ull << 34;
  o.max_age = std::chrono::milliseconds(0);
  WriteBack wb(&sink, o);
  std::string block(4096, 'm');
  const size_t before = HeapInUse();
  const uint64_t counted_before = wb.memory_bytes();
  for (int i = 0; i < n; ++i)
    ASSERT_EQ(wb.Write(block.data(), 4096, static_cast<uint64_t>(i) * 8192, false), 0);
  const double real = static_cast<double>(HeapInUse() - before);
  const double counted = static_cast<double>(wb.memory_bytes() - counted_before);
  std::printf("%d requests: memory_bytes=%.0f heap=%.0f ratio=%.3f\n", n, counted, real,
              counted / real);
  EXPECT_EQ(wb.queued_requests(), static_cast<uint64_t>(n));
  EXPECT_LE(std::fabs(counted - real), 0.10 * real);
}

INSTANTIATE_TEST_SUITE_P(QueuedRequests, MemoryTest, ::testing::Values(1, 1000, 100000));

// A chunk charged to `account`, as WriteBack::Write makes it.
Chunk* NewChunk(MemoryAccount* account, size_t size) {
  std::string payload(size, 'p');
  void* pooled = nullptr;
  account->Reserve(
      Chunk::AllocationSize(size), [] {}, size, &pooled);
  return Chunk::Create(payload.data(), size, account, pooled);
}

TEST(ChunkPoolTest, FreedBufferIsReusedForTheSameSize) {
  MemoryAccount account(1 << 20);
  Chunk* a = NewChunk(&account, 4096);
  const void* where = a;
  a->Unref();
  EXPECT_EQ(account.used(), 0u);
  EXPECT_EQ(account.pooled(), Chunk::AllocationSize(4096));
  Chunk* b = NewChunk(&account, 4096);
  EXPECT_EQ(static_cast<const void*>(b), where);
  EXPECT_EQ(account.pooled(), 0u);
  EXPECT_EQ(b->data()[4095], 'p');
  b->Unref();
  account.Drain();
  EXPECT_EQ(account.pooled(), 0u);
}

TEST(ChunkPoolTest, OddSizesAreNotPooled) {
  MemoryAccount account(1 << 20);
  NewChunk(&account, 4097)->Unref();
  NewChunk(&account, 512)->Unref();
  NewChunk(&account, (1 << 20) + 4096)->Unref();
  EXPECT_EQ(account.pooled(), 0u);
  EXPECT_EQ(account.used(), 0u);
}

TEST(ChunkPoolTest, InUsePlusPooledNeverExceedsTheLimit) {
  const uint64_t limit = 256 * 1024;
  MemoryAccount account(limit);
  std::vector<Chunk*> live;
  // Fill with 8 KiB chunks, free them all (pooled), then fill with 4 KiB
  // chunks: every pool miss must evict 8 KiB buffers to stay in bounds.
  for (int round = 0; round < 3; ++round) {
    const size_t size = round == 1 ? 4096 : 8192;
    while (account.used() + Chunk::AllocationSize(size) <= limit) {
      live.push_back(NewChunk(&account, size));
      ASSERT_LE(account.used() + account.pooled(), limit);
    }
    for (Chunk* c : live) {
      c->Unref();
      ASSERT_LE(account.used() + account.pooled(), limit);
    }
    live.clear();
    EXPECT_GT(account.pooled(), limit / 2) << "round " << round;
  }
  account.Drain();
  EXPECT_EQ(account.pooled(), 0u);
}

}  // namespace
}  // namespace sdccache
