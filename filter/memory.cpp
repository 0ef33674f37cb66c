// Chunk allocation and the MemoryAccount byte budget.
#include <cstdlib>
#include <cstring>
#include <new>

#include "chunk.h"
#include "memory_account.h"

namespace sdccache {

Chunk* Chunk::Create(const void* src, size_t size, MemoryAccount* account) {
  void* mem = std::malloc(AllocationSize(size));
  if (mem == nullptr) return nullptr;
  auto* c = new (mem) Chunk(size, account);
  if (size) std::memcpy(c->payload(), src, size);
  return c;
}

void Chunk::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  MemoryAccount* account = account_;
  size_t bytes = AllocationSize(size_);
  this->~Chunk();
  std::free(this);
  if (account) account->Release(bytes);
}

std::chrono::nanoseconds MemoryAccount::Reserve(uint64_t bytes,
                                                const std::function<void()>& on_wait) {
  using Clock = std::chrono::steady_clock;
  std::unique_lock<std::mutex> lock(mu_);
  Clock::time_point start{};
  bool waited = false;
  while (used_.load(std::memory_order_relaxed) != 0 &&
         used_.load(std::memory_order_relaxed) + bytes > limit_) {
    if (!waited) {
      waited = true;
      start = Clock::now();
      waits_.fetch_add(1, std::memory_order_relaxed);
    }
    lock.unlock();
    on_wait();
    lock.lock();
    // Re-check after on_wait: the flusher may already have freed room.
    if (used_.load(std::memory_order_relaxed) == 0 ||
        used_.load(std::memory_order_relaxed) + bytes <= limit_)
      break;
    room_.wait(lock);
  }
  used_.fetch_add(bytes, std::memory_order_relaxed);
  if (!waited) return std::chrono::nanoseconds(0);
  auto spent = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - start);
  wait_ns_.fetch_add(static_cast<uint64_t>(spent.count()), std::memory_order_relaxed);
  return spent;
}

void MemoryAccount::Release(uint64_t bytes) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    used_.fetch_sub(bytes, std::memory_order_relaxed);
  }
  room_.notify_all();
}

}  // namespace sdccache
