// WriteBack: the write-back engine of one export (no nbdkit dependency).
//
// Contract (the man page's DATA SAFETY section says it for users):
//  - Write/Zero/Trim buffer the request and return; reads (Lookup) on any
//    thread see it at once.  Requests are applied newest-wins.
//  - A background flusher writes the buffered set to the Sink when
//    `threshold` requests are queued (`gather` later, so that requests
//    still arriving join the batch), when they hold half of
//    queue_max_bytes, when the oldest is `max_age` old, when
//    a writer waits for room, and when Flush() asks.  While it writes one
//    batch ("flushing"), new requests go to the next ("active").  A caller
//    of Flush() (or a FUA or write-through request) whose requests are still
//    in the active set writes that batch, and then the plugin flush, in its
//    own thread, alongside batches already running if their ranges are
//    disjoint from it (so the plugin never sees two writes of one byte in
//    flight at once).
//  - Flush(): when it returns 0, everything buffered before the call is in
//    the Sink and the Sink was flushed.  Requests made meanwhile do not wait.
//    A FUA request is buffered, then flushed before it returns (a FUA
//    write-through, once written, is flushed the same way).
//  - Bytes buffered are bounded by queue_max_bytes: a writer past it waits
//    (it fails only when its client has gone, ESHUTDOWN, or out of memory,
//    ENOMEM).  A single write that does not fit in the bound with its
//    chunk's header and index entry (WriteCharge) is written through,
//    after everything before it has reached the Sink (with
//    flush_before_release, and flushed, before it returns).
//  - A write of at least bypass_min bytes goes straight to a Sink timed as
//    CPU-bound when nothing buffered or in flight overlaps it (WriteBypass),
//    and so does a FUA write, zero or trim of any size, to any Sink, when
//    everything before it has been written and flushed too (unless
//    bypass_min is 0); if the Sink fails it, it is buffered instead.
//  - A failed Sink write keeps its batch buffered (merged under newer
//    requests), is retried with capped exponential backoff, and fails every
//    Flush() waiting meanwhile with the Sink's errno.
//  - Ranges leave the overlay only after the Sink write succeeded (and, with
//    flush_before_release, after a Sink flush too).
//
// Thread safety: every public method may be called from any thread, except
// Stop(), which is called once, after client requests have ended.  No lock is
// held across a Sink call or a payload copy.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "batch_writer.h"
#include "counters.h"
#include "dirty_map.h"
#include "memory_account.h"
#include "mutex.h"
#include "overlay.h"
#include "sink.h"

namespace sdccache {

struct WriteBackOptions {
  uint32_t threshold = 1024;
  uint64_t queue_max_bytes = 64ull << 20;
  std::chrono::milliseconds max_age{30000};  // 0: no age trigger
  std::chrono::microseconds gather{1000};    // threshold batches start this late
  uint32_t max_plugin_write = 4u << 20;      // coalescing cap
  unsigned write_threads = 64;               // plugin requests in flight
  bool flush_before_release = false;         // Sink contexts not coherent
  // Writes of at least this many bytes go straight to a CPU-bound Sink
  // when nothing buffered overlaps them (WriteBypass); 0: never.
  uint32_t bypass_min = 64 * 1024;
  // The largest write the Sink takes in one call (the plugin's block size
  // maximum).  A larger one (from a client that ignores the maximum the
  // filter advertises) is never sent straight there, but buffered and
  // written back in pieces, or written through in pieces.
  uint32_t max_request = UINT32_MAX;
  std::chrono::milliseconds retry_min{10};
  std::chrono::milliseconds retry_max{1000};
  // Asked on a writer's thread while it waits for room (every
  // MemoryAccount::kGiveUpPoll): true ends the wait, and the request fails
  // with ESHUTDOWN, unbuffered and never acknowledged.  The filter says
  // whether nbdkit is shutting down or the client has gone: a plugin that
  // keeps failing would otherwise hold those writers, and nbdkit's exit,
  // for ever.  Unset: writers wait until there is room.
  std::function<bool()> writer_gone;
};

// What Stop() could not write.
struct Leftover {
  uint64_t requests = 0;
  uint64_t bytes = 0;
  int error = 0;
  std::string ranges;  // summarised, e.g. "[0,+4096) [1048576,+65536) ... (12 ranges)"
};

class WriteBack {
 public:
  // Each buffered request charges the queue-max-size budget this much
  // beside its data, for the index entry it adds (about 100 bytes), so
  // that a stream of zeroes, trims or tiny writes is bounded too.  What a
  // request merged into others, or a range written, had charged is given
  // back (ReconcileChargesLocked).
  static constexpr uint64_t kRangeCharge = 128;
  // What buffering a write of `count` bytes charges: its chunk, with its
  // header, and its index entry.  A write for which this exceeds
  // queue_max_bytes is written through.
  static uint64_t WriteCharge(uint64_t count) {
    return Chunk::AllocationSize(count) + kRangeCharge;
  }

  // Starts the flusher and the plugin-flush thread (BatchWriter starts its
  // helpers when needed); throws std::system_error, with none left
  // running, if it cannot.
  WriteBack(Sink* sink, const WriteBackOptions& opts);
  ~WriteBack();  // Stop() with no drain if not stopped yet
  WriteBack(const WriteBack&) = delete;
  WriteBack& operator=(const WriteBack&) = delete;

  // Return 0 or a positive errno.
  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) EXCLUDES(mu_);
  int Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) EXCLUDES(mu_);
  int Trim(uint32_t count, uint64_t offset, bool fua) EXCLUDES(mu_);
  int Flush(Trigger why) EXCLUDES(mu_);

  // Snapshot of buffered content over [offset, offset+length), for reads
  // and block status.  Take it before reading the plugin.
  Overlay Lookup(uint64_t offset, uint64_t length) EXCLUDES(mu_);
  // The same for block status, over at most about `max_ranges` buffered
  // ranges: *length is cut to where the snapshot ends (a reply may
  // describe less than was asked).  Taking every range in the request
  // cost O(ranges buffered there) per request, and qemu asks with REQ_ONE
  // for the rest of the image each time, one extent per reply: a walk of
  // the image (qemu-img map) cost O(N^2).
  Overlay LookupExtents(uint64_t offset, uint64_t* length, size_t max_ranges) EXCLUDES(mu_);

  // Flush(), retried (at the backoff pace) until it succeeds or `limit`
  // has passed, or nbdkit is quitting (an attempt made off a client's
  // thread failed with ESHUTDOWN while opts_.writer_gone said true there:
  // every wait in a layer below now fails) and no attempt has retired
  // anything for kQuitPatience x retry_max.  At least one attempt is
  // made.  The flush is counted once, under `why`; not at all without
  // `count` (a caller that has counted the same request with a Flush() of
  // its own).
  int FlushUntil(std::chrono::milliseconds limit, Trigger why, bool count = true) EXCLUDES(mu_);
  static constexpr int kQuitPatience = 3;

  // With limit > 0, makes one last FlushUntil(limit, kShutdown) if anything
  // is buffered; then stops the flusher.  Returns what is still unwritten.
  Leftover Stop(std::chrono::milliseconds limit) EXCLUDES(mu_);

  // For an export no writer is connected to (so no Sink context either):
  // lets the batches, bypass writes and Sink flushes running end, and
  // starts no new one; stops the flusher, the plugin-flush thread and
  // BatchWriter's helpers; returns true (false if parked or stopped
  // already).  Reads (Lookup) and counters go on; a flush that has
  // something to write or flush fails with ENOTCONN.  What is still
  // buffered stays, and is retried once Unpark() has started the flusher
  // again.  Call Unpark() before the next write.  Not at the same time as
  // Stop(), Unpark() or another Park().
  bool Park() EXCLUDES(mu_);
  // Starts the threads again after Park() (nothing if not parked); throws
  // std::system_error, still parked, if it cannot.
  void Unpark() EXCLUDES(mu_);
  bool parked() EXCLUDES(mu_);
  // Whether the last write-back attempt failed (its retry is due later).
  bool backing_off() EXCLUDES(mu_);
  // Counts a plugin call the Sink made on its own that failed with `err`
  // (a leaving context's flush) in flush_errors and last_error.
  void CountFailedCall(int err) EXCLUDES(mu_);
  // Returns the pool of chunk buffers, the coalescing buffers kept for
  // reuse and malloc's free pages to the system (the flusher does after
  // kIdleRelease with nothing buffered).
  void ReleaseIdleMemory() EXCLUDES(mu_);

  void Pause() EXCLUDES(mu_);   // no threshold/age batches until Resume
  void Resume() EXCLUDES(mu_);
  void SetThreshold(uint32_t n) EXCLUDES(mu_);

  CounterList Stats() EXCLUDES(mu_);
  const Counters& counters() const { return counters_; }
  uint64_t queued_requests() EXCLUDES(mu_);
  // Requests buffered or sent straight to the Sink so far (a count that
  // only grows).
  uint64_t acknowledged() EXCLUDES(mu_);
  // Whether the plugin's requests were last timed as mostly waiting
  // (BatchWriter): then batches run several requests at once, and no
  // write goes straight to the plugin (WriteBypass).
  bool plugin_latency_bound() const { return batch_writer_.latency_bound(); }
  uint64_t queued_bytes() EXCLUDES(mu_);
  // Where the last buffered range ends (0 with nothing buffered).
  uint64_t buffered_end() EXCLUDES(mu_);
  uint64_t memory_bytes() EXCLUDES(mu_);
  uint32_t threshold() EXCLUDES(mu_);
  // For tests: the buffered sets as "active | flushing" DirtyMap strings.
  std::string DebugString() EXCLUDES(mu_);
  // For tests: how often the flusher has gone to wait with nothing
  // buffered or pooled while a buffer was still held (by a read, say).
  uint64_t waits_on_held_buffers() EXCLUDES(mu_);
  // For tests: how often a request has waited for a bypass or write-through
  // write of the same bytes to end.
  uint64_t overlap_waits() EXCLUDES(mu_);

  // Called after each batch with (trigger, requests, bytes, plugin writes,
  // duration in µs, errno); from the thread that ran it (the flusher or a
  // flushing client), with no lock held.
  using BatchHook = void (*)(void* opaque, Trigger, uint64_t, uint64_t, uint64_t, uint64_t, int);
  void SetBatchHook(BatchHook hook, void* opaque) EXCLUDES(mu_);

 private:
  using Clock = std::chrono::steady_clock;
  // Starts the flusher and the plugin-flush thread; throws, with neither
  // running, if it cannot.
  void StartThreads() EXCLUDES(mu_);
  // Ends them (a plugin flush they started finishes first) and joins them;
  // leaves stopping_ and flush_thread_stop_ set.
  void JoinThreads() EXCLUDES(mu_);
  // Charges `bytes` to account_, waiting for room (and starting write-back
  // to make it); false if opts_.writer_gone ended the wait.
  bool ReserveRoom(uint64_t bytes, uint64_t pool_payload = 0, void** pooled = nullptr)
      EXCLUDES(mu_);
  // After a failed attempt: off a client's thread (no connection there),
  // ESHUTDOWN with opts_.writer_gone() true means nbdkit is quitting and
  // failed a wait below (sets quitting_); an ESHUTDOWN the plugin itself
  // returned (a remote server's) does not.
  void NoteQuittingLocked(int err, bool client_thread) REQUIRES(mu_);
  int Buffer(DirtyRange r, bool fua) EXCLUDES(mu_);
  // Write, Zero and Trim, before TellLoss.
  int WriteRequest(const void* buf, uint32_t count, uint64_t offset, bool fua) EXCLUDES(mu_);
  int ZeroRequest(uint32_t count, uint64_t offset, bool may_trim, bool fua) EXCLUDES(mu_);
  int TrimRequest(uint32_t count, uint64_t offset, bool fua) EXCLUDES(mu_);
  // A client's flush or FUA request returning `err`: with multi-conn, the
  // Sink's error if it reported writes lost that no such request has
  // failed for yet (see the .cpp).
  int TellLoss(int err) EXCLUDES(mu_);
  // Gives back the charges of index entries that no longer exist (merged
  // requests, written ranges), down to kRangeCharge per range held.
  void ReconcileChargesLocked() REQUIRES(mu_);
  int WriteThrough(const void* buf, uint32_t count, uint64_t offset, bool fua) EXCLUDES(mu_);
  // Sends a write straight to the Sink if it may (see the .cpp).
  // `any_plugin`: also when the plugin is latency-bound (a write the queue
  // has no room for).
  enum class Bypass {
    kSent,      // the Sink took it
    kDeclined,  // not sent: to be buffered
    kFailed,    // the Sink failed it (counted): to be buffered, not sent again
  };
  Bypass WriteBypass(const void* buf, uint32_t count, uint64_t offset, bool fua,
                     bool any_plugin = false) EXCLUDES(mu_);
  // A FUA zero or trim, sent like a FUA write.
  Bypass ZeroBypass(uint32_t count, uint64_t offset, bool may_trim) EXCLUDES(mu_);
  Bypass TrimBypass(uint32_t count, uint64_t offset) EXCLUDES(mu_);
  // What the three share: `call` makes the Sink call (`calls` plugin
  // calls, for plugin_writes) when the request may go straight there.
  template <typename Call>
  Bypass SendDirect(uint64_t offset, uint32_t count, bool fua, bool any_plugin, uint64_t calls,
                    Call&& call) EXCLUDES(mu_);
  bool OverlapsBypass(uint64_t offset, uint64_t length) const REQUIRES(mu_);
  // Everything acknowledged so far has been written back and flushed.
  bool AllFlushedLocked() const REQUIRES(mu_);
  // Removes a bypass or write-through write's entry once it has ended.
  void EndBypassLocked(std::pair<uint64_t, uint64_t> mine) REQUIRES(mu_);
  // Lookup's and LookupExtents' snapshot of [offset, offset+length): the
  // running batches' pieces, then active_'s (newer last).
  Overlay SnapshotLocked(uint64_t offset, uint64_t length) REQUIRES(mu_);
  // Without `retry`, the flusher starts an attempt now, even while it
  // backs off after a failure, and the call waits for the outcome of an
  // attempt that starts after it.  With it (FlushUntil's retries), the
  // flusher makes its next attempt when due; an attempt started after
  // retry->attempts_before counts, and the call returns ETIMEDOUT at
  // retry->deadline.
  struct RetryWait {
    uint64_t attempts_before;
    Clock::time_point deadline;
  };
  int WaitFor(uint64_t seq, uint64_t gen, bool flush, Trigger why, bool count = true,
              const RetryWait* retry = nullptr) REQUIRES(mu_);
  void FlusherLoop() EXCLUDES(mu_);
  bool FlushPending() const REQUIRES(mu_);
  bool BatchDue(Clock::time_point now, Trigger* why) const REQUIRES(mu_);
  // Whether active_ holds data of half queue_max_bytes or more: a batch
  // starts then whatever the request count, so that writers do not reach
  // the bound (and wait) before write-back has begun.
  bool HalfFull() const REQUIRES(mu_) {
    return active_.data_bytes() >= opts_.queue_max_bytes / 2;
  }
  // A batch being written: the active set as it was taken.
  struct Batch {
    // Changed only by the thread running the batch, under mu_; so that
    // thread alone may also read it without mu_ (PlanBatch).
    DirtyMap map;
    uint64_t requests = 0;
    uint64_t min_seq = 0;  // its oldest request
    Clock::time_point since;  // when that request came
  };
  // Whether active_ may become a batch now: none is running, or the ones
  // running are few and share no byte with it.
  bool CanStartBatch() const REQUIRES(mu_);
  // Whether a running batch holds a byte of [offset, offset + length).
  bool OverlapsBatches(uint64_t offset, uint64_t length) const REQUIRES(mu_);
  // Takes active_ as a new batch and writes it; the flusher and flushing
  // clients both may.
  // client_thread: run by a client's request (RunHere), not the flusher.
  void RunBatch(Trigger why, bool client_thread = false) REQUIRES(mu_);
  // written_seq_ from what is still unwritten.
  void UpdateWrittenSeq() REQUIRES(mu_);
  // A waiter's own step towards seq (a batch or a plugin flush); false if
  // there is nothing it can do now.
  bool RunHere(uint64_t seq, uint64_t gen, bool flush) REQUIRES(mu_);
  // The running thread's copy of its batch, made without mu_ (see the .cpp).
  static std::vector<DirtyRange> PlanBatch(const Batch& b) NO_THREAD_SAFETY_ANALYSIS;
  struct FlushJob {
    uint64_t seq, gen, attempt;
  };
  // Whether the flusher should start a plugin flush for the waiters.
  bool PluginFlushDue() const REQUIRES(mu_);
  // Whether a plugin flush for a waiter of (seq, gen) should start now.
  bool PluginFlushDueFor(uint64_t seq, uint64_t gen) const REQUIRES(mu_);
  FlushJob NewFlushJob() REQUIRES(mu_);
  void StartPluginFlush() REQUIRES(mu_);        // on a plugin flush thread
  void RunFlushJob(const FlushJob& job, bool client_thread = false) REQUIRES(mu_);  // here
  void PluginFlushLoop() EXCLUDES(mu_);
  void RecordError(int err, uint64_t attempt) REQUIRES(mu_);
  void CountFailedCallLocked(int err) REQUIRES(mu_);
  // Whether a failed attempt run on a client's thread failed only because
  // nbdkit aborted a wait in it, its client having gone; if so, notes it
  // (aborted_attempt_) and has the flusher do the work instead.
  bool AbortedHere(int err, bool client_thread, uint64_t attempt) REQUIRES(mu_);
  void WakeForRoom() EXCLUDES(mu_);
  // A Sink flush that fails with EIO also when the Sink has lost writes
  // since `losses_before` was read (Sink::losses), though another flush
  // may have been the one told.
  int FlushSinceLosses(uint64_t losses_before) EXCLUDES(mu_);
  uint64_t MemoryBytesLocked() const REQUIRES(mu_);
  uint64_t QueuedRequestsLocked() const REQUIRES(mu_);

  // Constant after construction.
  Sink* const sink_;
  const WriteBackOptions opts_;

  MemoryAccount account_;  // thread-safe itself
  Counters counters_;      // atomics

  Mutex mu_;
  CondVar work_{&mu_};  // wakes the flusher
  CondVar done_{&mu_};  // wakes Flush() and write-through waiters
  CondVar flush_wake_{&mu_};  // wakes the plugin flush thread
  DirtyMap active_ GUARDED_BY(mu_);
  // Batches being written, oldest first; pairwise disjoint.  Nodes stay
  // put while others come and go, so a running thread's Batch& stays valid.
  std::list<Batch> batches_ GUARDED_BY(mu_);
  static constexpr size_t kMaxBatches = 4;
  // A batch starts beside running ones only if active_ has at most this
  // many ranges (the disjointness check is done under mu_).
  static constexpr size_t kMaxCheckedRanges = 256;
  // Bypass and write-through writes in flight: (offset, length), pairwise
  // disjoint, and disjoint from active_ and batches_ (Buffer waits).  A
  // vector that keeps its capacity, so that a bypass write allocates
  // nothing (a list node each was a fair part of the filter's own cost on
  // fio's 64 KiB writes).
  std::vector<std::pair<uint64_t, uint64_t>> bypass_ GUARDED_BY(mu_);
  uint64_t active_requests_ GUARDED_BY(mu_) = 0;
  // kRangeCharge bytes charged to account_ per buffered request, less what
  // ReconcileChargesLocked gave back: down to kRangeCharge per range held.
  uint64_t range_charges_ GUARDED_BY(mu_) = 0;
  uint64_t active_min_seq_ GUARDED_BY(mu_) = 0;  // oldest request in active_
  uint64_t batch_data_bytes_ GUARDED_BY(mu_) = 0;  // data bytes in batches_
  Clock::time_point active_since_ GUARDED_BY(mu_);  // when it came
  Clock::time_point last_work_ GUARDED_BY(mu_);  // end of the last batch
  uint64_t waits_on_held_buffers_ GUARDED_BY(mu_) = 0;
  uint64_t overlap_waits_ GUARDED_BY(mu_) = 0;
  Clock::time_point threshold_at_ GUARDED_BY(mu_);  // when active_ reached threshold_
  uint32_t threshold_ GUARDED_BY(mu_);
  bool paused_ GUARDED_BY(mu_) = false;
  bool pressure_ GUARDED_BY(mu_) = false;  // a writer waits for room
  bool kick_ GUARDED_BY(mu_) = false;      // a fresh request skips the backoff
  bool stopping_ GUARDED_BY(mu_) = false;
  bool stopped_ GUARDED_BY(mu_) = false;
  bool parked_ GUARDED_BY(mu_) = false;  // Park(): no thread of ours runs
  // Batches ended (written or failed) whose buffers are being freed
  // outside mu_: Stats() waits, so that it never reports queued bytes gone
  // while their memory is still held.
  unsigned retiring_ GUARDED_BY(mu_) = 0;
  Trigger pending_why_ GUARDED_BY(mu_) = Trigger::kClient;

  // Epochs.  Every buffered request gets seq = ++last_seq_.  Requests up to
  // written_seq_ are in the Sink (it is one below the oldest request still
  // in a batch or in active_); up to flushed_seq_ they are also flushed.
  // write_gen_ counts completed Sink writes (batches, bypass writes and
  // write-throughs); flushed_gen_ is the write_gen_ a successful Sink
  // flush covered, or a FUA bypass write that found all flushed and was
  // the only write to complete meanwhile (WriteBypass).
  uint64_t last_seq_ GUARDED_BY(mu_) = 0;
  uint64_t direct_sends_ GUARDED_BY(mu_) = 0;  // bypass writes and write-throughs done
  uint64_t losses_told_ GUARDED_BY(mu_) = 0;   // Sink losses a client request failed for
  uint64_t written_seq_ GUARDED_BY(mu_) = 0;
  uint64_t flushed_seq_ GUARDED_BY(mu_) = 0;
  uint64_t write_gen_ GUARDED_BY(mu_) = 0;
  uint64_t flushed_gen_ GUARDED_BY(mu_) = 0;
  uint64_t drain_req_seq_ GUARDED_BY(mu_) = 0;  // must be written
  uint64_t flush_req_seq_ GUARDED_BY(mu_) = 0;  // must be written and flushed
  uint64_t flush_req_gen_ GUARDED_BY(mu_) = 0;
  // Plugin attempts (batches and flushes) are numbered as they start; a
  // waiter fails only on an attempt that started after it asked, so a retry
  // already in flight when the plugin recovers cannot fail a fresh flush.
  uint64_t attempts_started_ GUARDED_BY(mu_) = 0;
  uint64_t last_failed_attempt_ GUARDED_BY(mu_) = 0;
  uint64_t aborted_attempt_ GUARDED_BY(mu_) = 0;  // see AbortedHere
  bool quitting_ GUARDED_BY(mu_) = false;         // see NoteQuittingLocked
  int last_error_ GUARDED_BY(mu_) = 0;
  Clock::time_point retry_at_ GUARDED_BY(mu_);
  std::chrono::milliseconds backoff_ GUARDED_BY(mu_){0};

  // Plugin flushes started and not finished (on plugin_flushers_ or in a
  // waiting client's thread): what each covers and its attempt number.
  // One at a time (group commit, see PluginFlushLoop).
  static constexpr unsigned kFlushThreads = 1;
  std::deque<FlushJob> flush_jobs_ GUARDED_BY(mu_);  // not yet picked up
  unsigned flushes_in_flight_ GUARDED_BY(mu_) = 0;    // queued or running
  uint64_t newest_flush_seq_ GUARDED_BY(mu_) = 0;     // of the last started
  uint64_t newest_flush_gen_ GUARDED_BY(mu_) = 0;
  bool flush_thread_stop_ GUARDED_BY(mu_) = false;

  BatchHook hook_ GUARDED_BY(mu_) = nullptr;
  void* hook_opaque_ GUARDED_BY(mu_) = nullptr;

  BatchWriter batch_writer_;  // used by threads running batches
  std::thread flusher_;
  std::thread plugin_flushers_[kFlushThreads];
};

}  // namespace sdccache
