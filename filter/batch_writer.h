// BatchWriter: writes one batch to the Sink with several requests in flight.
//
// A batch is a sorted list of non-overlapping ranges, so its plugin requests
// may run in any order and at once (NBD allows it; the engine orders
// batches, never requests within one).  Adjacent data ranges are coalesced
// into one request up to max_write (ranges of 64 KiB or more go as they
// are).  Slow backends (remote, or with a per-request latency) are what the
// parallelism is for: with one request in flight, write-back of random 4 KiB
// writes over a 1 ms backend would top out at 1000 requests a second.  A
// backend whose requests are CPU-bound gets them one at a time (Write()).
//
// Thread safety: Write() may be called by several threads at once, one
// batch each (the engine only runs batches together when their ranges are
// disjoint); each caller does part of its own batch's work and borrows
// whichever helpers are idle, and helpers that finish other batches join it
// while it has requests left.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <semaphore>
#include <thread>
#include <vector>

#include <time.h>

#include "dirty_map.h"
#include "sink.h"

namespace sdccache {

class BatchWriter {
 public:
  // Up to threads - 1 helpers, started only when a latency-bound batch
  // wants more than are idle (a CPU-bound plugin never gets one; an export
  // that is never written back costs no thread).
  BatchWriter(Sink* sink, unsigned threads, uint32_t max_write);
  ~BatchWriter();
  BatchWriter(const BatchWriter&) = delete;
  BatchWriter& operator=(const BatchWriter&) = delete;

  // Writes `plan`.  Returns 0, or the first errno.  A request that fails
  // does not stop the others: a range the plugin refuses for good (one
  // past a shrunk size, say) must not hold back every range after it.
  // Only kGiveUpAfter failures in a row (the plugin is down) skip the
  // requests not yet started.  (*written)[i] says whether plan[i] reached
  // the Sink.  Out of memory, it throws std::bad_alloc before it writes
  // anything, or fails a request with ENOMEM; it never throws once it has
  // started writing.
  int Write(const std::vector<DirtyRange>& plan, std::vector<char>* written,
            uint64_t* plugin_writes);

  // Whether the plugin's requests were last found to mostly wait (so that
  // more of them in flight, in this batch or beside it, help).
  bool latency_bound() const;

  // Helpers running (they stay until StopHelpers or destruction).
  size_t helpers_started() const;

  // Ends every helper (joined before it returns); later batches start
  // them again as they want them.  No Write() may be running.
  void StopHelpers();

  // Memory of the coalescing buffers allocated (in use or kept for reuse).
  size_t coalescing_bytes() const;
  // Whether some of that memory is kept for reuse with nothing using it.
  bool coalescing_idle() const;
  // Hands the buffers kept for reuse back to the system (the others are
  // freed as their requests end, when nothing uses them).
  void ReleaseIdleBuffers();

  // One plugin write from the caller's thread, timed like a batch's probe
  // (so that a plugin that turns slow is noticed while every write goes
  // straight to it).
  int WriteTimed(const void* buf, uint32_t count, uint64_t offset, bool fua);

 private:
  struct Op {
    size_t first, last;  // plan[first, last), coalesced
  };
  // One call of Write(): lives on its caller's stack until every helper it
  // borrowed, or that joined it, has finished with it.
  struct Job {
    const std::vector<DirtyRange>* plan = nullptr;
    std::vector<Op> ops;
    std::vector<char>* written = nullptr;
    std::atomic<size_t> next_op{0};
    std::atomic<int> error{0};  // the first
    std::atomic<unsigned> failed_in_a_row{0};
    std::atomic<bool> given_up{false};  // kGiveUpAfter failures in a row
    std::atomic<uint64_t> calls{0};
    // Threads not yet done with it: its caller and each helper.  Helpers
    // join only while it is in wanting_, so it never rises from 0.
    std::atomic<unsigned> pending{1};
    std::binary_semaphore done{0};  // released by the last helper to finish
  };
  // Bounce buffers for coalesced requests.  Each is sized to its run
  // (rounded up to a power of two, at least kMinBounce, at most max_write),
  // allocated once and kept for reuse, and together they hold at most
  // kBounceBudget bytes: a caller waits only when the buffers in use fill
  // the budget.  A count cap instead (8 buffers of max_write) held much of
  // a latency-bound batch back: random 4 KiB writes coalesce into runs of
  // 8-16 KiB, and with 64 requests of 1 ms in flight about a third held
  // or wanted a buffer.  One buffer per writer thread would cost
  // writeback-threads x max_write of resident memory; fresh ones per
  // request would cost page faults.
  static constexpr size_t kBounceBudget = 8u << 20;
  static constexpr size_t kMinBounce = 8u << 10;
  size_t BounceSize(uint64_t run) const;
  std::unique_ptr<uint8_t[]> AcquireBounce(size_t size);
  void ReleaseBounce(std::unique_ptr<uint8_t[]> buf, size_t size);
  struct Worker {
    // Released once each time it is taken from idle_; it then helps with
    // `job`, and with jobs it joins after that, until it is idle again.
    std::binary_semaphore go{0};
    // Set by the thread that takes it from idle_, before go is released;
    // read by the worker only just after go.acquire().
    Job* job = nullptr;
    std::thread thread;
  };
  void WorkerLoop(Worker* self);
  // Starts `n` new helpers on `job`, whose pending already counts them.
  // Those that cannot be started (out of threads) are uncounted again:
  // the job's other threads do their share.
  void StartHelpers(Job* job, size_t n);
  // Under idle_mu_: the oldest job in wanting_ that has ops left, joined
  // (its pending counted); or null.  Drops exhausted or given-up jobs it
  // passes over.
  Job* JoinWanting();
  // Failures in a row after which a batch's remaining requests are skipped.
  static constexpr unsigned kGiveUpAfter = 8;
  // Takes the job's ops until none is left (or it is given up).
  void RunOps(Job* job);
  void RunOne(Job* job, size_t i);  // op i, recording success or the first error
  int RunOp(Job* job, const Op& op);
  // A thread's clocks, for timing one plugin request.  Time off the CPU,
  // runnable or not, counts as waiting: on a loaded machine a sleeping
  // plugin's thread also waits for a CPU after each sleep, and counting
  // that as busy made the delay filter look CPU-bound (a bench run of
  // 906b518: write-back one request at a time, 15 s drains).  But only a
  // request that blocked (gave up the CPU itself, at least once) can have
  // waited: one that never did was off the CPU only because it was
  // preempted or its vCPU was stolen by the hypervisor, which the thread's
  // CPU clock does not count either (a CI run with 20-75% steal saw a
  // CPU-bound test plugin as latency-bound).
  struct Clocks {
    double wall_us = 0, cpu_us = 0;
    long blocked = 0;  // voluntary context switches of the thread so far
    static Clocks Now();
  };
  // Folds one timed request into latency_bound_.
  void RecordProbe(const Clocks& start, const Clocks& end);

  // A request that spends at least this share of its time off the CPU is
  // latency-bound (see Write()).
  static constexpr double kLatencyBound = 0.5;
  // A CPU-bound plugin is taken for latency-bound when this many of its
  // last 16 probes waited (a latency-bound one for CPU-bound after one
  // probe that did not: it is probed only every kProbeEvery-th batch).
  static constexpr int kWaitingOf16 = 12;
  static constexpr uint64_t kProbeEvery = 16;
  // Of WriteTimed's requests, every kProbeBypassEvery-th is timed: a probe
  // reads the clocks twice, four system calls, far more than the rest of
  // the filter's part of a bypass write (BM_Bypass64k in bench/: 197 ns a
  // write with a probe every 8th write, 66 ns with one every 32nd).  A
  // plugin turning slow is still noticed within about 400 writes.
  static constexpr uint64_t kProbeBypassEvery = 32;
  std::atomic<uint64_t> timed_writes_{0};
  static constexpr uint64_t kJoinBelow = 64 * 1024;

  Sink* const sink_;
  const uint64_t max_write_;
  mutable std::mutex probe_mu_;
  // What the probes found: changed under probe_mu_, read without it (every
  // bypass write asks).  Starts latency-bound, so that a slow plugin's
  // first batch is parallel.
  std::atomic<bool> latency_bound_{true};
  uint16_t recent_waiting_ = 0;  // probe_mu_, while CPU-bound: one bit a probe
  uint64_t batches_ = 0;  // probe_mu_
  std::mutex bounce_mu_;
  std::condition_variable bounce_free_;
  // Guarded by bounce_mu_: idle buffers by size.
  std::map<size_t, std::vector<std::unique_ptr<uint8_t[]>>> bounce_idle_;
  // Changed under bounce_mu_, read without it (counters, the flusher's
  // idle timer): the bytes of all buffers allocated (idle and in use), and
  // of the idle ones.
  std::atomic<size_t> bounce_bytes_{0};
  std::atomic<size_t> bounce_idle_bytes_{0};
  const size_t max_helpers_;
  mutable std::mutex idle_mu_;
  // Guarded by idle_mu_: every helper started (and slots reserved for
  // helpers being started: started_ may exceed workers_.size() briefly).
  std::vector<std::unique_ptr<Worker>> workers_;
  size_t started_ = 0;
  std::vector<Worker*> idle_;  // guarded by idle_mu_: helpers free to borrow
  // Guarded by idle_mu_: latency-bound jobs whose caller and helpers were
  // fewer than their ops, oldest first.  A helper that finishes its job
  // joins one of these before it goes idle.  A batch that starts while the
  // others hold every helper would otherwise write its ranges one at a
  // time: 32 ranges over a 1 ms plugin took 35 ms instead of about 1.5.
  std::vector<Job*> wanting_;
  std::atomic<bool> stopping_{false};
};

}  // namespace sdccache
