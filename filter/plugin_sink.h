// PluginSink: the engine's Sink over the plugin contexts of the export's
// writable client connections.
//
// Background writes borrow a context of a connection that is still open
// (nbdkit's readahead filter does the same from its background thread).
// A shared context (nbdkit_next_context_open(..., shared=1)) cannot be used:
// plugins that serve several exports learn the export name from the
// connection (file dir=, sh, eval), and would write to the wrong export or
// crash.  A connection leaves (Detach) only after its data was flushed and no
// background call still uses its context; meanwhile new calls go to other
// contexts.  With no context attached (or only leaving ones), writes fail
// with ENOTCONN and stay buffered.
//
// It does what the plugin allows: FUA becomes a plugin flush when the
// plugin has no FUA, zeroes become written zero blocks when it cannot zero,
// trims are dropped when it cannot trim (a trim is only advisory), and a flush
// is a no-op when it cannot flush.
//
// PluginGate serialises every call the filter makes into the plugin when the
// final thread model is not parallel, so the flusher never runs beside a
// client request.
//
// It also gives plugin calls turns, for every export at once: a plugin flush
// (and a call with FUA, which a layer below may turn into a write and a
// flush) never runs beside a write, zero or trim: it waits for those in
// flight, and new ones wait for it.  nbdkit's multi-conn filter (every mode
// but multi-conn-track-dirty=off) marks a connection dirty as a write begins
// and clean once a flush ends, even if the write ended after the flush
// began; its next flush then skips the plugin, and succeeds over a write no
// plugin flush ever covered.  By default it groups the connections of every
// export, so one export's flush cleans another's connections.  It takes
// flushes beside writes for a client's fault (the NBD spec asks a client to
// wait for the writes a flush must cover), and this filter is the client of
// the layers below it.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>
#include <utility>
#include <vector>

#include <nbdkit-filter.h>

#include "sink.h"

namespace sdccache {

class PluginGate {
 public:
  void Enable(bool on) { on_ = on; }  // once, before any connection
  void Lock() {
    if (on_) mu_.lock();
  }
  void Unlock() {
    if (on_) mu_.unlock();
  }

  // Which plugin calls may run together: writes (and zeroes and trims)
  // beside writes, flushes beside flushes, and a call with FUA alone.  A
  // flush waiting keeps new writes out, and a FUA call waiting new writes
  // and flushes, so that steady write-back cannot put them off.
  enum Turn { kWrite, kFlush, kFua };
  void TakeTurn(Turn t);
  void EndTurn(Turn t);
  // Plugin calls waiting for their turn (for tests).
  int waiting();

 private:
  bool on_ = false;
  std::mutex mu_;
  std::mutex turn_mu_;
  std::condition_variable turn_cv_;
  int running_[3] = {}, waiting_[3] = {};  // guarded by turn_mu_
};

// A plugin call's turn, held for its scope.
class TurnHold {
 public:
  TurnHold(PluginGate* g, PluginGate::Turn t) : g_(g), t_(t) { g_->TakeTurn(t_); }
  ~TurnHold() { g_->EndTurn(t_); }
  TurnHold(const TurnHold&) = delete;
  TurnHold& operator=(const TurnHold&) = delete;

 private:
  PluginGate* g_;
  PluginGate::Turn t_;
};

class GateHold {
 public:
  explicit GateHold(PluginGate* g) : g_(g) { g_->Lock(); }
  ~GateHold() { g_->Unlock(); }
  GateHold(const GateHold&) = delete;
  GateHold& operator=(const GateHold&) = delete;

 private:
  PluginGate* g_;
};

class PluginSink : public Sink {
 public:
  // What a context's plugin said about it.  nbdkit answers a context's data
  // calls only after it has asked the plugin what the context can do and
  // how large it is (it caches the answers per context).
  struct Answers {
    uint64_t size;
    int can_fua, can_zero;
    bool can_fast_zero, can_flush, can_trim, multi_conn;
    uint32_t max_write;  // the largest request the sink makes
    uint32_t min_block;  // the plugin's minimum block size (1: none)
  };
  // Asks `next`'s plugin (through `gate`); throws if it cannot tell its
  // size.  Call it before taking a lock other connections wait on: for a
  // remote plugin each answer may be a network round trip.
  static Answers Ask(nbdkit_next* next, PluginGate* gate);

  // `first` is the context of the connection that creates the cache; its
  // answers stand for the export's.  Call from .prepare.
  PluginSink(nbdkit_next* first, const Answers& answers, PluginGate* gate);
  PluginSink(nbdkit_next* first, PluginGate* gate) : PluginSink(first, Ask(first, gate), gate) {}

  // Makes `next`, whose plugin gave `answers`, usable for background
  // writes.  A write, zero or trim past its size (buffered before the
  // plugin's size shrank) fails with ENOSPC instead of reaching nbdkit,
  // which would abort.
  void Attach(nbdkit_next* next, const Answers& answers);
  void Attach(nbdkit_next* next) { Attach(next, Ask(next, gate_)); }
  // Whether `next` (attached, holding `end` bytes) has not failed its last
  // call while every other context that holds them has: the one that may
  // still write what is buffered.  False if there is no other.
  bool OnlyOneNotFailing(nbdkit_next* next, uint64_t end);
  // Whether `next`'s last call failed.
  bool Failing(nbdkit_next* next);
  // Removes `next` once no background call uses it; new calls go to other
  // contexts meanwhile.  With `unless_last`, leaves it attached (and
  // returns false) if no other context stays that holds buffered_end
  // bytes (where the data still buffered ends: only a context that saw
  // the export at least that large can write it): the caller must first
  // write everything buffered.  If writes made through `next` are not yet
  // covered by a flush (through it, as a plugin without multi-conn needs;
  // with multi-conn, through any context), flushes it before it goes, and
  // sets *flush_err if that fails.
  bool Detach(nbdkit_next* next, bool unless_last, int* flush_err = nullptr,
              uint64_t buffered_end = 0);
  // Contexts attached (leaving ones included).
  size_t attached();
  // Detach calls under way: contexts marked leaving (for tests).
  size_t detaching();

  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override;
  int Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) override;
  int Trim(uint32_t count, uint64_t offset, bool fua) override;
  uint64_t ZeroCalls(uint32_t count) const override {
    return can_zero_ == NBDKIT_ZERO_NONE ? (uint64_t{count} + ZeroStep() - 1) / ZeroStep() : 1;
  }
  uint64_t TrimCalls() const override { return can_trim_ ? 1 : 0; }
  int Flush() override;
  uint64_t losses() override;
  int loss_error() override;
  void LossesTold(uint64_t n) override;

  bool multi_conn() const { return multi_conn_; }
  // What the plugin says of fast zeroes (the filter says the same).  A fast
  // zero is buffered only if the plugin zeroes natively; nbdkit fails it
  // with ENOTSUP when the plugin's zeroes are emulated by writes.
  bool can_fast_zero() const { return can_fast_zero_; }
  bool zeroes_natively() const { return can_zero_ == NBDKIT_ZERO_NATIVE; }
  uint32_t max_write() const { return max_write_; }
  // Whether [offset, offset + count) is aligned to the plugin's minimum
  // block size.  A plugin may refuse a request that is not; refused in the
  // background, after the client's request was acknowledged, the data
  // could never be written, so the filter refuses it up front.
  bool Aligned(uint64_t offset, uint32_t count) const {
    return ((offset | count) & (min_block_ - 1)) == 0;  // min_block_ is a power of 2
  }
  uint32_t min_block() const { return min_block_; }

  // The context of the client connection whose thread is calling (set by
  // the filter's request callbacks): a call made on that thread goes
  // through it when it is attached.  nbdkit ties a context's plugin calls
  // to the calling thread's connection; a filter below that reopens the
  // context (retry) asserts when another connection's thread does it.
  class CallerScope {
   public:
    explicit CallerScope(nbdkit_next* own) : prev_(caller_) { caller_ = own; }
    ~CallerScope() { caller_ = prev_; }
    CallerScope(const CallerScope&) = delete;
    CallerScope& operator=(const CallerScope&) = delete;

   private:
    nbdkit_next* prev_;
  };

 private:
  using Turn = PluginGate::Turn;
  // A borrowed context, returned to the pool when the Lease ends.
  class Lease {
   public:
    // Waits for the call's turn (PluginGate::Turn).  A write, zero or trim
    // (kWrite, kFua) is counted against the context once done.  `which`: that
    // context, if still attached; else the one PickLocked gives.
    Lease(PluginSink* sink, Turn turn, nbdkit_next* which = nullptr, uint64_t end = 0);
    ~Lease();
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    nbdkit_next* get() const { return next_; }
    // Whether [offset, offset + count) lies within the context's size:
    // nbdkit aborts on a data call past it.
    bool Holds(uint64_t offset, uint32_t count) const { return offset + count <= size_; }
    // After a successful flush: the writes done before it began are covered.
    void Flushed();
    // After the call: whether it failed (see Slot::failed_at).  A write
    // made with FUA is `durable`: no flush need cover it.
    void Outcome(bool failed, bool durable = false);  // applied when the lease ends
    // After a failed flush through a context that was given (Flush without
    // multi-conn): the writes done before it began count as lost, with the
    // flush's error.
    void Lost(int err);

   private:
    PluginSink* sink_;
    nbdkit_next* next_;
    uint64_t size_ = 0;
    Turn turn_;
    // The call writes: counted against the context once done.
    bool write() const { return turn_ != PluginGate::kFlush; }
    uint64_t written_at_start_ = 0;
    uint64_t write_ticks_at_start_ = 0;  // the sink's write_ticks_
    enum { kUnknown, kSucceeded, kFailed } outcome_ = kUnknown;
    bool durable_ = false;
  };
  struct Slot {
    nbdkit_next* next;
    uint64_t size;         // what its get_size said when attached
    int in_flight = 0;     // calls using it now
    uint64_t written = 0;  // write calls finished through it
    uint64_t flushed = 0;  // of those, how many a flush through it covers
    // With multi-conn: write_ticks_ when a write through it last finished
    // (covered once all_flushed_ticks_ reaches it).
    uint64_t last_write_tick = 0;
    bool leaving = false;  // in Detach: no new calls
    // Whether its last call failed: 0 if not, else outcomes_ when it did
    // (so that of two failing contexts, the one that failed first is
    // known).  The flusher's calls go to a context that is not failing, if
    // one is attached: a context may fail for good (the nbd plugin's, once
    // the server it talks to has restarted) while another, opened since,
    // works.
    uint64_t failed_at = 0;
    // outcomes_ when a call through it last succeeded, or 0.
    uint64_t succeeded_at = 0;
    // A flush through it failed and its unflushed writes were counted as
    // lost (Lease::Lost), and no call through it has succeeded since.
    // Its own client's thread then leaves it too: each write through it
    // would make it unflushed again, and the next Flush, whichever client
    // asked for it, would fail on it again.
    bool flush_lost = false;
  };
  Slot* FindLocked(nbdkit_next* next);
  // The context a client's thread uses instead of its own, `own`, or null
  // (it uses its own).  It leaves its own once its flush failed and its
  // writes were counted lost (flush_lost), and, with multi-conn, once a
  // call through it failed (failed_at): a multi-conn plugin takes any
  // context's writes as well as the next's; a client's thread that kept
  // writing through its own dead one failed its own FUA requests, and its
  // batches, which hold every client's data, failed the flushes of the
  // others.  It leaves it only for a context known to work: not failing
  // now, and with a call succeeded since its own failed (the most recent
  // such success).  While there is none (an outage, every context failing,
  // or the others never used), it stays on its own: a retry filter below
  // can reopen only that one from its thread (nbdkit 1.32 aborts on
  // another's, losing what is buffered).
  Slot* OwnLeftForLocked(const Slot& own, uint64_t end);
  // The caller's context or the one OwnLeftForLocked gives, else the
  // oldest whose last call did not fail, not leaving and whose size reaches `end`
  // (connections may have seen the image grow in between); else, of those
  // not leaving whose size reaches it, the one that failed longest ago (one
  // that failed once is tried again, not the same dead one every time);
  // else the oldest not leaving; else the oldest.
  Slot* PickLocked(uint64_t end = 0);
  bool OthersStayLocked(nbdkit_next* next, uint64_t end);
  // A write, zero or trim of [offset, offset + count) through a leased
  // context: call(next, flags, &err), with FUA added to `flags` when the
  // plugin takes it (else a flush follows: FuaFallback).  ENOTCONN with no
  // context, ENOSPC past the context's size.
  template <typename Call>
  int DataCall(uint64_t offset, uint32_t count, uint32_t flags, bool fua, Call call);
  // Flushes `which`, or (null) the context PickLocked gives.
  int FlushOne(nbdkit_next* which);
  int FuaFallback(bool fua);
  // The size of the zero blocks written to a plugin that cannot zero.
  uint32_t ZeroStep() const { return max_write_ < (1u << 20) ? max_write_ : 1u << 20; }

  // Inline, with a constant initializer: other units reach it without a
  // call to check for a dynamic initializer (it is set on every request).
  static inline thread_local nbdkit_next* caller_ = nullptr;
  PluginGate* const gate_;
  const int can_fua_, can_zero_;
  const bool can_fast_zero_, can_flush_, can_trim_, multi_conn_;
  const uint32_t max_write_, min_block_;

  std::mutex mu_;
  std::condition_variable idle_;  // a lease ended
  // Guarded by mu_: attached contexts, oldest first.  Calls use the oldest
  // one not leaving; without multi-conn, Flush reaches every context that
  // carried writes since its last flush.
  std::vector<Slot> contexts_;
  // Guarded by mu_: contexts that left with writes no flush covered, and
  // how many of those a Flush has reported (Flushes running when one left
  // report it too).
  uint64_t lost_ = 0, lost_reported_ = 0;
  // Guarded by mu_: the failed flush's error behind the latest loss, which
  // the Flush that reports it returns (the plugin's, as for any failure).
  int lost_err_ = EIO;
  void CountLossLocked(int err);
  // Guarded by mu_: calls whose outcome was recorded (Slot::failed_at,
  // Slot::succeeded_at).
  uint64_t outcomes_ = 0;
  // Guarded by mu_, used with multi-conn: write calls finished through
  // any context, and how many of those a successful flush through any
  // context covers (those finished before it began).
  uint64_t write_ticks_ = 0, all_flushed_ticks_ = 0;
  // Whether writes through `slot` may lack a flush that covers them.
  bool UnflushedLocked(const Slot& slot) const;
};

}  // namespace sdccache
