// Mutex, MutexLock and CondVar with clang thread-safety annotations.
//
// std::mutex carries no capability attributes under libstdc++, so the engine
// uses these thin wrappers; `clang -Wthread-safety` then checks every
// GUARDED_BY member and REQUIRES method.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>

#if defined(__clang__)
#define SDC_TSA(x) __attribute__((x))
#else
#define SDC_TSA(x)
#endif

#define CAPABILITY(x) SDC_TSA(capability(x))
#define SCOPED_CAPABILITY SDC_TSA(scoped_lockable)
#define GUARDED_BY(x) SDC_TSA(guarded_by(x))
#define REQUIRES(...) SDC_TSA(requires_capability(__VA_ARGS__))
#define EXCLUDES(...) SDC_TSA(locks_excluded(__VA_ARGS__))
#define ACQUIRE(...) SDC_TSA(acquire_capability(__VA_ARGS__))
#define RELEASE(...) SDC_TSA(release_capability(__VA_ARGS__))
#define NO_THREAD_SAFETY_ANALYSIS SDC_TSA(no_thread_safety_analysis)

namespace sdccache {

class CAPABILITY("mutex") Mutex {
 public:
  void Lock() ACQUIRE() { mu_.lock(); }
  void Unlock() RELEASE() { mu_.unlock(); }

 private:
  friend class CondVar;
  std::mutex mu_;
};

class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex* mu) ACQUIRE(mu) : mu_(mu) { mu_->Lock(); }
  ~MutexLock() RELEASE() { mu_->Unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex* const mu_;
};

class CondVar {
 public:
  explicit CondVar(Mutex* mu) : mu_(mu) {}
  // REQUIRES: the caller holds the Mutex given at construction; it is
  // released while waiting and held again on return.  (Not annotated, as in
  // LevelDB's port::CondVar: the analysis cannot tie mu_ to the caller's.)
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_->mu_, std::adopt_lock);
    cv_.wait(lock);
    lock.release();
  }
  void WaitUntil(std::chrono::steady_clock::time_point t) {
    std::unique_lock<std::mutex> lock(mu_->mu_, std::adopt_lock);
    cv_.wait_until(lock, t);
    lock.release();
  }
  void Signal() { cv_.notify_one(); }
  void SignalAll() { cv_.notify_all(); }

 private:
  Mutex* const mu_;
  std::condition_variable cv_;
};

}  // namespace sdccache
