// Chunk allocation and the MemoryAccount byte budget.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>

#include "chunk.h"
#include "memory_account.h"

namespace sdccache {

Chunk* Chunk::Create(const void* src, size_t size, MemoryAccount* account, void* mem) {
  if (mem == nullptr) {
    mem = std::malloc(AllocationSize(size));
    if (mem == nullptr) return nullptr;
  }
  auto* c = new (mem) Chunk(size, account);
  if (size) std::memcpy(c->payload(), src, size);
  return c;
}

void Chunk::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  MemoryAccount* account = account_;
  const size_t size = size_;
  const size_t bytes = AllocationSize(size);
  this->~Chunk();
  if (account != nullptr && MemoryAccount::Poolable(size)) {
    account->Recycle(this, size, bytes);
    return;
  }
  std::free(this);
  if (account) account->Release(bytes);
}

// The next Reserve of this size will copy a payload into `next`, which has sat
// in the pool since its data was written back and is likely out of cache:
// start fetching its first 4 KiB now, so that the copy does not wait for
// memory line by line.
void MemoryAccount::Prefetch(const void* next, uint64_t payload) {
  if (next == nullptr) return;
  const auto* p = static_cast<const char*>(next);
  const size_t len = std::min<size_t>(Chunk::AllocationSize(payload), 4096 + 64);
  for (size_t off = 0; off < len; off += 64) __builtin_prefetch(p + off, 1, 3);
}

void* MemoryAccount::TakeLocked(uint64_t payload, const void** next) {
  *next = nullptr;
  if (!Poolable(payload)) return nullptr;
  std::vector<void*>& stack = pool_[payload / kPoolUnit];
  if (stack.empty()) return nullptr;
  void* b = stack.back();
  stack.pop_back();
  if (!stack.empty()) *next = stack.back();
  pooled_.fetch_sub(Chunk::AllocationSize(payload), std::memory_order_relaxed);
  return b;
}

void MemoryAccount::Recycle(void* mem, uint64_t payload, uint64_t bytes) {
  bool pooled = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    used_.fetch_sub(bytes, std::memory_order_relaxed);
    if (used_.load(std::memory_order_relaxed) + pooled_.load(std::memory_order_relaxed) + bytes <=
        limit_) {
      try {
        pool_[payload / kPoolUnit].push_back(mem);
        pooled_.fetch_add(bytes, std::memory_order_relaxed);
        pooled = true;
      } catch (const std::bad_alloc&) {  // no room to remember it: free it
      }
    }
  }
  room_.notify_all();
  if (!pooled) std::free(mem);
}

std::vector<void*> MemoryAccount::EvictLocked(uint64_t target) {
  std::vector<void*> out;
  // Largest buffers first: fewest frees for the room needed.
  for (size_t k = kClasses; k-- > 0 && pooled_.load(std::memory_order_relaxed) > target;) {
    std::vector<void*>& stack = pool_[k];
    const uint64_t bytes = Chunk::AllocationSize(k * kPoolUnit);
    while (!stack.empty() && pooled_.load(std::memory_order_relaxed) > target) {
      try {
        out.push_back(stack.back());
      } catch (const std::bad_alloc&) {  // no room to list it: free it here
        std::free(stack.back());
      }
      stack.pop_back();
      pooled_.fetch_sub(bytes, std::memory_order_relaxed);
    }
    if (stack.empty()) std::vector<void*>().swap(stack);
  }
  return out;
}

void MemoryAccount::Drain() {
  std::vector<void*> to_free;
  {
    std::lock_guard<std::mutex> lock(mu_);
    to_free = EvictLocked(0);
  }
  for (void* b : to_free) std::free(b);
}

bool MemoryAccount::Reserve(uint64_t bytes, const std::function<void()>& on_wait,
                            uint64_t pool_payload, void** pooled,
                            const std::function<bool()>& give_up) {
  using Clock = std::chrono::steady_clock;
  std::unique_lock<std::mutex> lock(mu_);
  Clock::time_point start{};
  bool waited = false;
  auto fits = [&] {
    const uint64_t used = used_.load(std::memory_order_relaxed);
    return used == 0 || used + bytes <= limit_;
  };
  bool gave_up = false;
  while (!fits()) {
    lock.unlock();
    on_wait();
    lock.lock();
    // Re-check after on_wait: the flusher may already have freed room
    // (or on_wait gave back charges).  Only a writer that sleeps waited.
    if (fits()) break;
    if (!waited) {
      waited = true;
      start = Clock::now();
      waits_.fetch_add(1, std::memory_order_relaxed);
    }
    if (!give_up) {
      room_.wait(lock);
      continue;
    }
    if (room_.wait_for(lock, kGiveUpPoll, fits)) break;
    lock.unlock();
    gave_up = give_up();
    lock.lock();
    if (gave_up) break;
  }
  const void* next = nullptr;
  void* mem = nullptr;
  std::vector<void*> evicted;
  if (!gave_up) {
    used_.fetch_add(bytes, std::memory_order_relaxed);
    mem = pool_payload ? TakeLocked(pool_payload, &next) : nullptr;
    // Whatever this charge is for (a buffer of another size, an index
    // entry), in-use plus pooled bytes stay within the limit.
    const uint64_t used = used_.load(std::memory_order_relaxed);
    if (used + pooled_.load(std::memory_order_relaxed) > limit_)
      evicted = EvictLocked(used >= limit_ ? 0 : limit_ - used);
  }
  lock.unlock();
  for (void* b : evicted) std::free(b);
  if (pooled != nullptr) *pooled = mem;
  Prefetch(next, pool_payload);
  if (waited) {
    auto spent = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start);
    wait_ns_.fetch_add(static_cast<uint64_t>(spent.count()), std::memory_order_relaxed);
  }
  return !gave_up;
}

void MemoryAccount::Charge(uint64_t bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  used_.fetch_add(bytes, std::memory_order_relaxed);
}

void MemoryAccount::Release(uint64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    used_.fetch_sub(bytes, std::memory_order_relaxed);
  }
  room_.notify_all();
}

}  // namespace sdccache
