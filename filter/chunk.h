// Chunk: an immutable, reference-counted copy of one client write's payload.
//
// A chunk is allocated once per buffered pwrite (header and payload in one
// malloc) and shared by every DirtyRange and read snapshot that still points
// into it.  Its bytes are charged to a MemoryAccount for its whole life, so the
// queue-max-size bound limits real heap, even when newer writes have covered
// parts of it.
//
// Thread safety: the payload never changes after Create; references may be
// copied and dropped from any thread.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <utility>

namespace sdccache {

class MemoryAccount;

class Chunk {
 public:
  // Copies `size` bytes from `src`; charges the allocation to `account`
  // (which must outlive the chunk).  `mem` is a buffer from the account's
  // pool (MemoryAccount::Reserve), or nullptr to allocate one.  Returns nullptr if malloc
  // fails.
  static Chunk* Create(const void* src, size_t size, MemoryAccount* account,
                       void* mem = nullptr);

  // Heap bytes one chunk of `size` payload bytes costs.
  static size_t AllocationSize(size_t size) { return sizeof(Chunk) + size; }

  const uint8_t* data() const { return payload(); }
  size_t size() const { return size_; }

  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  void Unref();

 private:
  Chunk(size_t size, MemoryAccount* account) : size_(size), account_(account) {}
  const uint8_t* payload() const { return reinterpret_cast<const uint8_t*>(this + 1); }
  uint8_t* payload() { return reinterpret_cast<uint8_t*>(this + 1); }

  std::atomic<uint32_t> refs_{1};
  size_t size_;
  MemoryAccount* account_;
};

// Owning handle to a Chunk (like shared_ptr, one pointer wide, no control
// block allocation).
class ChunkRef {
 public:
  ChunkRef() = default;
  explicit ChunkRef(Chunk* adopt) : c_(adopt) {}
  ChunkRef(const ChunkRef& o) : c_(o.c_) {
    if (c_) c_->Ref();
  }
  ChunkRef(ChunkRef&& o) noexcept : c_(std::exchange(o.c_, nullptr)) {}
  ChunkRef& operator=(ChunkRef o) noexcept {
    std::swap(c_, o.c_);
    return *this;
  }
  ~ChunkRef() {
    if (c_) c_->Unref();
  }
  const Chunk* get() const { return c_; }
  explicit operator bool() const { return c_ != nullptr; }

 private:
  Chunk* c_ = nullptr;
};

}  // namespace sdccache
