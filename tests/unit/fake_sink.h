// FakeSink: an in-memory plugin for engine tests, with failure injection and
// a gate that holds writes so tests can observe a batch in flight.
//
// Every wait in it gives up after kPatience and aborts with a message: a
// test that breaks (or returns early from an ASSERT while the sink still
// holds a call) then fails at once with a reason, instead of hanging until
// meson kills it.
#pragma once

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>
#include <vector>

#include "await.h"
#include "sink.h"

namespace sdccache {

class FakeSink : public Sink {
 public:
  explicit FakeSink(size_t size) : disk_(size, 0) {}

  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override {
    std::unique_lock<std::mutex> l(mu_);
    ++writes_started_;
    cv_.notify_all();
    const bool noted = n_waiting_ < waiting_at_.size();
    if (noted) waiting_at_[n_waiting_++] = offset;
    cv_.notify_all();
    Await(l, "a held write's release", [&] { return !held_ && !hold_at_.count(offset); });
    if (noted) {
      auto* it = std::find(waiting_at_.begin(), waiting_at_.begin() + n_waiting_, offset);
      *it = waiting_at_[--n_waiting_];
    }
    if (write_time_.count() > 0) {  // a plugin whose writes take a while
      l.unlock();
      std::this_thread::sleep_for(write_time_);
      l.lock();
    }
    if (int e = Injected(fail_)) return e;
    if (fail_from_err_ && offset >= fail_from_) return fail_from_err_;
    if (fail_at_err_ && offset == fail_at_) return fail_at_err_;
    std::memcpy(disk_.data() + offset, buf, count);
    ++writes_;
    if (fua) ++fua_writes_;  // durable as it returns, as if flushed
    cv_.notify_all();
    bytes_ += count;
    max_write_ = std::max<uint64_t>(max_write_, count);
    return 0;
  }
  int Zero(uint32_t count, uint64_t offset, bool, bool fua) override {
    std::unique_lock<std::mutex> l(mu_);
    ++zeroes_started_;
    cv_.notify_all();
    Await(l, "the sink's release", [this] { return !held_; });
    if (int e = Injected(fail_)) return e;
    std::memset(disk_.data() + offset, 0, count);
    ++zeroes_;
    if (fua) ++fua_zeroes_and_trims_;
    return 0;
  }
  int Trim(uint32_t count, uint64_t offset, bool fua) override {
    std::unique_lock<std::mutex> l(mu_);
    Await(l, "the sink's release", [this] { return !held_; });
    if (int e = Injected(fail_)) return e;
    std::memset(disk_.data() + offset, 0, count);  // like file/memory plugins
    ++trims_;
    if (fua) ++fua_zeroes_and_trims_;
    return 0;
  }
  int Flush() override {
    std::unique_lock<std::mutex> l(mu_);
    const uint64_t ticket = flushes_started_++;
    cv_.notify_all();
    Await(l, "a held flush's release", [&] { return !flush_held_ || ticket < flushes_allowed_; });
    if (int e = Injected(fail_flush_)) return e;
    ++flushes_;
    return 0;
  }

  uint64_t losses() override {
    std::lock_guard<std::mutex> l(mu_);
    return losses_;
  }
  int loss_error() override {
    std::lock_guard<std::mutex> l(mu_);
    return loss_error_;
  }
  void LossesTold(uint64_t n) override {
    std::lock_guard<std::mutex> l(mu_);
    losses_told_ = std::max(losses_told_, n);
  }
  uint64_t losses_told() {
    std::lock_guard<std::mutex> l(mu_);
    return losses_told_;
  }

  // Test controls.
  // Counts a loss (a plugin context left with writes no flush covered)
  // without failing any Flush: as when another flush was told of it.
  void Lose(int err = EIO) {
    std::lock_guard<std::mutex> l(mu_);
    ++losses_;
    loss_error_ = err;
  }
  void Hold() {
    std::lock_guard<std::mutex> l(mu_);
    held_ = true;
  }
  void Release() {
    {
      std::lock_guard<std::mutex> l(mu_);
      held_ = false;
    }
    cv_.notify_all();
  }
  // Only writes that start at `offset` wait, until ReleaseAt(); with
  // keep_others, also those at the offsets held before.
  void HoldAt(uint64_t offset, bool keep_others = false) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (!keep_others) hold_at_.clear();
      hold_at_.insert(offset);
    }
    cv_.notify_all();  // a write held at another offset goes on
  }
  void ReleaseAt() {
    {
      std::lock_guard<std::mutex> l(mu_);
      hold_at_.clear();
    }
    cv_.notify_all();
  }
  void ReleaseAt(uint64_t offset) {
    {
      std::lock_guard<std::mutex> l(mu_);
      hold_at_.erase(offset);
    }
    cv_.notify_all();
  }
  // Blocks until a write that starts at `offset` is held.
  void AwaitHeldAt(uint64_t offset) {
    std::unique_lock<std::mutex> l(mu_);
    Await(l, "a write to be held", [&] {
      return std::find(waiting_at_.begin(), waiting_at_.begin() + n_waiting_, offset) !=
                 waiting_at_.begin() + n_waiting_ &&
             hold_at_.count(offset);
    });
  }
  // Flushes wait while held (writes do not); ReleaseFlushes(n) lets the
  // next n through in the order they arrived.
  void HoldFlush() {
    std::lock_guard<std::mutex> l(mu_);
    flush_held_ = true;
    flushes_allowed_ = flushes_started_;
  }
  void ReleaseFlushes(uint64_t n) {
    {
      std::lock_guard<std::mutex> l(mu_);
      flushes_allowed_ += n;
    }
    cv_.notify_all();
  }
  void ReleaseFlush() {
    {
      std::lock_guard<std::mutex> l(mu_);
      flush_held_ = false;
    }
    cv_.notify_all();
  }
  // Blocks until at least n flushes have started (entered Flush).
  void AwaitFlushesStarted(uint64_t n) {
    std::unique_lock<std::mutex> l(mu_);
    Await(l, "flushes to start", [&] { return flushes_started_ >= n; });
  }
  // Blocks until at least n writes have completed.
  void AwaitWrites(uint64_t n) {
    std::unique_lock<std::mutex> l(mu_);
    Await(l, "writes to complete", [&] { return writes_ >= n; });
  }
  // Like AwaitWritesStarted, but gives up after `limit`; returns whether
  // they started.
  template <class Duration>
  bool WritesStartWithin(uint64_t n, Duration limit) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, limit, [&] { return writes_started_ >= n; });
  }
  // Blocks until at least n writes have started (entered Write).
  void AwaitWritesStarted(uint64_t n) {
    std::unique_lock<std::mutex> l(mu_);
    Await(l, "writes to start", [&] { return writes_started_ >= n; });
  }
  // The next n plugin calls (writes, zeroes, trims, flushes) fail with err.
  void FailNext(uint64_t n, int err) {
    std::lock_guard<std::mutex> l(mu_);
    fail_next_ = n;
    fail_next_err_ = err;
  }
  uint64_t injected() {
    std::lock_guard<std::mutex> l(mu_);
    return injected_;
  }
  // Writes at or past `offset` fail with err (0: none).
  void FailFrom(uint64_t offset, int err) {
    std::lock_guard<std::mutex> l(mu_);
    fail_from_ = offset;
    fail_from_err_ = err;
  }
  // Writes that start at `offset` fail with err (0: none).
  void FailAt(uint64_t offset, int err) {
    std::lock_guard<std::mutex> l(mu_);
    fail_at_ = offset;
    fail_at_err_ = err;
  }
  // Each write takes this long (it fails or succeeds after it).
  void SetWriteTime(std::chrono::milliseconds t) {
    std::lock_guard<std::mutex> l(mu_);
    write_time_ = t;
  }
  void Fail(int err) {
    std::lock_guard<std::mutex> l(mu_);
    fail_ = err;
  }
  void FailFlush(int err) {
    std::lock_guard<std::mutex> l(mu_);
    fail_flush_ = err;
  }
  void Read(void* buf, uint64_t len, uint64_t offset) {
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(buf, disk_.data() + offset, len);
  }
  std::vector<uint8_t> Disk() {
    std::lock_guard<std::mutex> l(mu_);
    return disk_;
  }
  uint64_t writes() {
    std::lock_guard<std::mutex> l(mu_);
    return writes_;
  }
  uint64_t fua_zeroes_and_trims() {
    std::lock_guard<std::mutex> l(mu_);
    return fua_zeroes_and_trims_;
  }
  uint64_t fua_writes() {
    std::lock_guard<std::mutex> l(mu_);
    return fua_writes_;
  }
  uint64_t zeroes_started() {
    std::lock_guard<std::mutex> l(mu_);
    return zeroes_started_;
  }
  uint64_t writes_started() {
    std::lock_guard<std::mutex> l(mu_);
    return writes_started_;
  }
  uint64_t flushes() {
    std::lock_guard<std::mutex> l(mu_);
    return flushes_;
  }
  uint64_t max_write() {
    std::lock_guard<std::mutex> l(mu_);
    return max_write_;
  }

 private:
  template <class Pred>
  void Await(std::unique_lock<std::mutex>& l, const char* what, Pred pred) {
    test::Await(cv_, l, what, pred);
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<uint8_t> disk_;
  bool held_ = false, flush_held_ = false;
  std::set<uint64_t> hold_at_;
  // Offsets of the writes in Write() before the hold.  A fixed array:
  // Write allocates nothing (the OOM tests fail the engine threads'
  // allocations, and a plugin call never throws).
  std::array<uint64_t, 64> waiting_at_{};
  size_t n_waiting_ = 0;
  uint64_t flushes_started_ = 0, flushes_allowed_ = 0;
  int fail_ = 0, fail_flush_ = 0, fail_next_err_ = 0;
  uint64_t fail_next_ = 0, injected_ = 0, fail_from_ = 0;
  int fail_from_err_ = 0;
  uint64_t fail_at_ = 0;
  int fail_at_err_ = 0;
  // REQUIRES: mu_ held.  The error this call must return, or 0.
  int Injected(int always) {
    if (always) return always;
    if (fail_next_ == 0) return 0;
    --fail_next_;
    ++injected_;
    return fail_next_err_;
  }
  uint64_t zeroes_started_ = 0;
  std::chrono::milliseconds write_time_{0};
  uint64_t writes_started_ = 0, writes_ = 0, bytes_ = 0, zeroes_ = 0, trims_ = 0, flushes_ = 0;
  uint64_t max_write_ = 0, losses_ = 0, losses_told_ = 0, fua_writes_ = 0,
           fua_zeroes_and_trims_ = 0;
  int loss_error_ = EIO;
};

}  // namespace sdccache
