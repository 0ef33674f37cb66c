// Replaces the global operator new with one a test can make fail, for
// tests of what the code does out of memory.  Include it in one source
// file of a test binary only (it defines the replacement), and not under
// TSan, whose static runtime defines operator new too.
#pragma once

#if defined(__GNUC__) && !defined(__clang__)
// g++ sees the replaced operator delete free() what operator new returned.
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

#include <atomic>
#include <cstdlib>
#include <new>

namespace {
// Armed: the next operator new on this thread throws std::bad_alloc.
thread_local bool fail_next_new = false;
// Armed (> 0): the fail_at-th operator new made, counting from when it was
// armed, by a thread that is not exempt (the engine's threads, a client's)
// throws std::bad_alloc.
std::atomic<long> fail_at{0};
std::atomic<long> news_counted{0};
thread_local bool exempt = false;
// Armed: every operator new by a thread that is not exempt throws.
std::atomic<bool> fail_all{false};
// Armed (> 0): every operator new of at least this many bytes throws, on
// any thread (as under an address-space limit, where large ones fail first).
std::atomic<std::size_t> fail_from_size{0};
}  // namespace

void* operator new(std::size_t n) {
  if (fail_next_new) {
    fail_next_new = false;
    throw std::bad_alloc();
  }
  if (!exempt && fail_all.load()) throw std::bad_alloc();
  if (const std::size_t from = fail_from_size.load(); from > 0 && n >= from) throw std::bad_alloc();
  if (!exempt && fail_at.load() > 0 && news_counted.fetch_add(1) + 1 == fail_at.load())
    throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
// new[] too: ASan's runtime defines its own operator new[] rather than
// one that calls operator new, so bounce buffers (new uint8_t[]) were never
// failed under it.
void* operator new[](std::size_t n) { return operator new(n); }
void operator delete(void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p) noexcept {
  std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}

