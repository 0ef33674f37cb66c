// Bounded waits for the unit tests.  A wait that would hang instead aborts
// after kPatience with a message naming what it waited for: meson's own
// timeout would kill the test without saying where it was stuck.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <mutex>
#include <thread>

namespace sdccache::test {

inline constexpr std::chrono::seconds kPatience{20};

// The scratch directory (from mkdtemp) that GiveUp removes before it
// aborts, as abort() runs no destructor: a test sets it while it uses it.
// Fixed size, so that GiveUp allocates nothing (a test may give up while
// its operator new is set to fail).
struct ScratchDir {
  std::mutex mu;
  char path[64] = {};
};
inline ScratchDir scratch_dir;

[[noreturn]] inline void GiveUp(const char* what) {
  std::fprintf(stderr, "gave up after %lld s waiting for %s\n",
               static_cast<long long>(kPatience.count()), what);
  {
    std::lock_guard<std::mutex> l(scratch_dir.mu);
    char cmd[96];
    if (scratch_dir.path[0] &&
        std::snprintf(cmd, sizeof cmd, "rm -rf '%s'", scratch_dir.path) < int{sizeof cmd})
      (void)!std::system(cmd);
  }
  std::abort();
}

// Waits on `cv` (with `l` held) until pred() holds.
template <class Pred>
void Await(std::condition_variable& cv, std::unique_lock<std::mutex>& l, const char* what,
           Pred pred) {
  if (!cv.wait_for(l, kPatience, pred)) GiveUp(what);
}

// Polls pred(), yielding between calls, until it holds: for state that no
// condition variable announces (counters of the engine under test).
template <class Pred>
void AwaitPoll(const char* what, Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + kPatience;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) GiveUp(what);
    std::this_thread::yield();
  }
}

// The result of a call running on another thread (std::async), once it
// has ended: aborts, naming `what`, if it has not within kPatience (a bare
// get() would wait for ever, and so would the future's destructor).
template <class T>
T Get(std::future<T>& f, const char* what) {
  if (f.wait_for(kPatience) != std::future_status::ready) GiveUp(what);
  return f.get();
}

// Aborts, naming `what`, unless it is destroyed within kPatience: for a
// call of the code under test that would block for ever (a writer waiting
// for room that is never given back).
class Watchdog {
 public:
  explicit Watchdog(const char* what)
      : what_(what), thread_([this] {
          std::unique_lock<std::mutex> l(mu_);
          if (!cv_.wait_for(l, kPatience, [this] { return done_; })) GiveUp(what_);
        }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> l(mu_);
      done_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  const char* const what_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::thread thread_;  // last: starts once the members it uses exist
};

}  // namespace sdccache::test
