// MemoryAccount: the byte budget behind queue-max-size (backpressure).
//
// Writers Reserve() bytes before buffering and wait while the budget is used
// up; chunks Release() their bytes when their last reference drops, which
// wakes the waiters.  A request never waits when nothing is charged, so any
// request no larger than the limit eventually fits.
//
// Thread safety: all methods may be called from any thread.  Release() may be
// called with other engine locks held (chunks die inside index operations);
// Reserve() must be called with no engine lock held.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>

namespace sdccache {

class MemoryAccount {
 public:
  explicit MemoryAccount(uint64_t limit) : limit_(limit) {}

  // Blocks until `bytes` fit under the limit, then charges them.  Before each
  // wait it calls `on_wait` (with no lock held) so the caller can start a
  // write-back that will free room.  Returns the time spent waiting.
  std::chrono::nanoseconds Reserve(uint64_t bytes, const std::function<void()>& on_wait);
  void Release(uint64_t bytes);

  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  uint64_t waits() const { return waits_.load(std::memory_order_relaxed); }
  uint64_t wait_ns() const { return wait_ns_.load(std::memory_order_relaxed); }

 private:
  const uint64_t limit_;
  std::mutex mu_;
  std::condition_variable room_;
  std::atomic<uint64_t> used_{0};  // written under mu_, read anywhere
  std::atomic<uint64_t> waits_{0};
  std::atomic<uint64_t> wait_ns_{0};
};

}  // namespace sdccache
