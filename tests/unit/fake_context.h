// A fake nbdkit plugin context (nbdkit_next) for PluginSink and Registry
// tests: its pwrite and flush can be held until the test lets them go.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <type_traits>

#include <nbdkit-filter.h>

#include "await.h"

namespace sdccache {
namespace test {

// A plugin context whose pwrite and flush can be held until the test lets
// them go.  The ops come first, so the nbdkit_next* the sink passes back is
// the FakeContext.
struct FakeContext {
  nbdkit_next ops{};
  int multi_conn = 1;  // what can_multi_conn says
  int trim = 1;        // what can_trim says
  int zero = NBDKIT_ZERO_NATIVE;  // what can_zero says
  uint32_t min_block = 0, max_block = 0;  // what block_size says (0: none)
  std::mutex mu;
  std::condition_variable cv;  // any change below
  int pwrites = 0;             // guarded by mu
  int pwrite_error = 0;        // guarded by mu: pwrite fails with it if set
  bool hold_can_fua = false;   // guarded by mu: can_fua (PluginSink::Ask) waits while set
  bool in_can_fua = false;     // guarded by mu
  bool hold_pwrite = false;    // guarded by mu: pwrite waits while set
  bool in_pwrite = false;      // guarded by mu
  int flushes = 0;             // guarded by mu: flush calls begun
  int flushes_finished = 0;    // guarded by mu
  int pwrites_at_flush = -1;   // guarded by mu: pwrites when a flush last began
  bool hold_flush = false;     // guarded by mu: flush waits while set
  // Guarded by mu: if set, hold_flush holds only this thread's flushes.
  std::thread::id hold_flush_of;
  int flush_error = 0;         // guarded by mu: flush fails with it if set
  int64_t size = 1 << 30;      // guarded by mu: what get_size says (-1: it fails)
  bool size_known = false;     // guarded by mu: get_size has answered

  FakeContext() {
    ops.can_fua = [](nbdkit_next* n) {
      FakeContext* c = Of(n);
      std::unique_lock<std::mutex> l(c->mu);
      c->in_can_fua = true;
      c->cv.notify_all();
      test::Await(c->cv, l, "a held can_fua's release", [&] { return !c->hold_can_fua; });
      return NBDKIT_FUA_NATIVE;
    };
    ops.can_zero = [](nbdkit_next* n) { return Of(n)->zero; };
    ops.can_fast_zero = [](nbdkit_next*) { return 1; };
    ops.can_flush = [](nbdkit_next*) { return 1; };
    ops.can_trim = [](nbdkit_next* n) { return Of(n)->trim; };
    ops.can_multi_conn = [](nbdkit_next* n) { return Of(n)->multi_conn; };
    ops.block_size = [](nbdkit_next* n, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
      *minimum = Of(n)->min_block;
      *preferred = 0;
      *maximum = Of(n)->max_block;
      return 0;
    };
    // nbdkit caches the size per context; a data call on a context whose
    // size it has not asked, or past that size, fails an assertion and
    // aborts nbdkit (backend_valid_range), as pwrite does here.
    ops.get_size = [](nbdkit_next* n) -> int64_t {
      FakeContext* c = Of(n);
      std::lock_guard<std::mutex> l(c->mu);
      c->size_known = c->size != -1;
      return c->size;
    };
    ops.pwrite = [](nbdkit_next* n, const void*, uint32_t count, uint64_t offset, uint32_t,
                    int* err) {
      FakeContext* c = Of(n);
      std::unique_lock<std::mutex> l(c->mu);
      if (!c->size_known) {
        std::fprintf(stderr, "FakeContext: pwrite on a context whose size nbdkit never asked\n");
        std::abort();
      }
      if (offset + count > static_cast<uint64_t>(c->size)) {
        std::fprintf(stderr, "FakeContext: pwrite past the context's size (nbdkit asserts)\n");
        std::abort();
      }
      ++c->pwrites;
      c->in_pwrite = true;
      c->cv.notify_all();
      test::Await(c->cv, l, "a held pwrite's release", [&] { return !c->hold_pwrite; });
      c->in_pwrite = false;
      if (c->pwrite_error) {
        *err = c->pwrite_error;
        return -1;
      }
      return 0;
    };
    ops.flush = [](nbdkit_next* n, uint32_t, int* err) {
      FakeContext* c = Of(n);
      std::unique_lock<std::mutex> l(c->mu);
      ++c->flushes;
      c->pwrites_at_flush = c->pwrites;
      c->cv.notify_all();
      if (c->hold_flush_of == std::thread::id() || c->hold_flush_of == std::this_thread::get_id())
        test::Await(c->cv, l, "a held flush's release", [&] { return !c->hold_flush; });
      ++c->flushes_finished;
      c->cv.notify_all();
      return c->flush_error ? (*err = c->flush_error, -1) : 0;
    };
  }
  static FakeContext* Of(nbdkit_next* n) { return reinterpret_cast<FakeContext*>(n); }
  nbdkit_next* next() { return &ops; }

  // Sets a hold flag (or clears it, letting held calls go).
  void Hold(bool FakeContext::*flag, bool on) {
    {
      std::lock_guard<std::mutex> l(mu);
      this->*flag = on;
    }
    cv.notify_all();
  }
  // Waits until pred() holds under mu.  Gives up after 10 s by aborting
  // with a message: returning early from a test while a call is held would
  // leave its future's destructor waiting for good.
  template <typename P>
  void WaitFor(P pred) {
    std::unique_lock<std::mutex> l(mu);
    test::Await(cv, l, "a fake plugin call", pred);
  }
  int Count(int FakeContext::*counter) {
    std::lock_guard<std::mutex> l(mu);
    return this->*counter;
  }
};
static_assert(std::is_standard_layout_v<FakeContext>, "ops must convert to FakeContext*");

}  // namespace test
}  // namespace sdccache
