// MemoryAccount: the byte budget behind queue-max-size (backpressure).
//
// Writers Reserve() bytes before buffering and wait while the budget is used
// up; chunks Release() their bytes when their last reference drops, which
// wakes the waiters.  A request never waits when nothing is charged, so any
// request no larger than the limit eventually fits.
//
// The account also keeps a pool of freed chunk buffers, so that the next
// write of the same size reuses memory that is already mapped: a fresh
// malloc of a few KiB costs page faults (zeroing and charging each page),
// which is most of what buffering a write would otherwise cost.  Buffers in
// use plus buffers pooled never exceed the limit, and an idle export returns
// the pool (Drain).  Only payload sizes that are multiples of 4 KiB up to
// 1 MiB are pooled (each size has its own stack, newest on top); others go back to malloc.
//
// Thread safety: all methods may be called from any thread.  Release() and
// Recycle() may be called with other engine locks held (chunks die inside
// index operations); Reserve() must be called with no engine lock held.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

namespace sdccache {

class MemoryAccount {
 public:
  explicit MemoryAccount(uint64_t limit) : limit_(limit) {}
  ~MemoryAccount() { Drain(); }
  MemoryAccount(const MemoryAccount&) = delete;
  MemoryAccount& operator=(const MemoryAccount&) = delete;

  // Blocks until `bytes` fit under the limit, then charges them.  Before each
  // wait it calls `on_wait` (with no lock held) so the caller can start a
  // write-back that will free room.  With pool_payload set, also takes a
  // pooled buffer for a chunk of that payload size in the same step
  // (*pooled, or nullptr when there is none).  While it waits it asks
  // give_up(), if set, every kGiveUpPoll (with no lock held); if that says
  // true it returns false, having charged nothing.
  bool Reserve(uint64_t bytes, const std::function<void()>& on_wait, uint64_t pool_payload = 0,
               void** pooled = nullptr, const std::function<bool()>& give_up = nullptr);
  static constexpr std::chrono::milliseconds kGiveUpPoll{100};
  void Release(uint64_t bytes);
  // Charges `bytes` at once, even past the limit (the next Reserve() waits
  // until they are released, and evicts pooled buffers as needed): for
  // what a caller learns it uses only once it holds an engine lock.
  // Allocates nothing, and never waits for room.
  void Charge(uint64_t bytes);

  // Pool of freed buffers of `bytes` (a Chunk::AllocationSize); Reserve()
  // takes from it, and frees pooled buffers when what it charges (a buffer
  // of any size, an index entry) would put in-use plus pooled bytes over
  // the limit.  Recycle() releases `bytes` like Release() and keeps or
  // frees `mem`.
  static bool Poolable(uint64_t payload) {
    return payload != 0 && payload % kPoolUnit == 0 && payload <= kPoolMax;
  }
  void Recycle(void* mem, uint64_t payload, uint64_t bytes);
  void Drain();  // frees the whole pool
  uint64_t pooled() const { return pooled_.load(std::memory_order_relaxed); }

  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  uint64_t waits() const { return waits_.load(std::memory_order_relaxed); }
  uint64_t wait_ns() const { return wait_ns_.load(std::memory_order_relaxed); }

 private:
  static constexpr uint64_t kPoolUnit = 4096;
  static constexpr uint64_t kPoolMax = 1u << 20;
  static constexpr size_t kClasses = kPoolMax / kPoolUnit + 1;
  // Pops pooled buffers until pooled bytes are at most target; returns them
  // (to free outside mu_).
  std::vector<void*> EvictLocked(uint64_t target);
  // Pops a buffer; *next is the one the next take of this size gets (to
  // Prefetch once unlocked).
  void* TakeLocked(uint64_t payload, const void** next);
  static void Prefetch(const void* next, uint64_t payload);

  const uint64_t limit_;
  std::mutex mu_;
  // Guarded by mu_; by payload / kPoolUnit.  Stacks of pointers, not lists
  // threaded through the buffers: a pop must not read a buffer that has sat
  // in the pool long enough to leave the cache.
  std::vector<void*> pool_[kClasses];
  std::atomic<uint64_t> pooled_{0};        // written under mu_
  std::condition_variable room_;
  std::atomic<uint64_t> used_{0};  // written under mu_, read anywhere
  std::atomic<uint64_t> waits_{0};
  std::atomic<uint64_t> wait_ns_{0};
};

}  // namespace sdccache
