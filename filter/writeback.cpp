// WriteBack: buffering, epochs and the background flusher.
#include "writeback.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#ifdef __GLIBC__
#include <malloc.h>
#endif

namespace sdccache {

using std::chrono::duration_cast;
using std::chrono::microseconds;
using std::chrono::milliseconds;

// An export with nothing buffered for this long returns its pool of chunk
// buffers (and malloc's free pages) to the system.
static constexpr milliseconds kIdleRelease{2000};
// How long a failed batch waits, out of memory, before it tries again to
// merge back into what is buffered.
static constexpr milliseconds kNoMemoryWait{10};

WriteBack::WriteBack(Sink* sink, const WriteBackOptions& opts)
    : sink_(sink),
      opts_(opts),
      account_(opts.queue_max_bytes),
      threshold_(opts.threshold),
      batch_writer_(sink, std::max(1u, opts.write_threads), opts.max_plugin_write) {
  StartThreads();
}

void WriteBack::StartThreads() {
  try {
    flusher_ = std::thread([this] { FlusherLoop(); });
    for (auto& t : plugin_flushers_) t = std::thread([this] { PluginFlushLoop(); });
  } catch (...) {
    JoinThreads();  // what started
    MutexLock l(&mu_);
    stopping_ = false;
    flush_thread_stop_ = false;
    throw;
  }
}

void WriteBack::JoinThreads() {
  {
    MutexLock l(&mu_);
    stopping_ = true;
    work_.SignalAll();
  }
  if (flusher_.joinable()) flusher_.join();
  {
    MutexLock l(&mu_);
    flush_thread_stop_ = true;  // flushes started finish first
    flush_wake_.SignalAll();
  }
  for (auto& t : plugin_flushers_)
    if (t.joinable()) t.join();
}

bool WriteBack::Park() {
  {
    MutexLock l(&mu_);
    if (parked_ || stopping_ || stopped_) return false;
    // From here no batch or plugin flush starts (RunHere, WriteBypass and
    // the flusher all check stopping_); a waiter meanwhile waits, and gets
    // ENOTCONN once parked_ is set.  Those already running end: with no
    // Sink context left they fail at once.  Data still buffered (the
    // plugin failed the last write-back) stays: the flusher that Unpark()
    // starts retries it.
    stopping_ = true;
    work_.SignalAll();
    while (!batches_.empty() || !bypass_.empty() || flushes_in_flight_ > 0) done_.Wait();
  }
  JoinThreads();
  batch_writer_.StopHelpers();
  MutexLock l(&mu_);
  stopping_ = false;
  flush_thread_stop_ = false;
  parked_ = true;
  done_.SignalAll();
  return true;
}

void WriteBack::Unpark() {
  {
    MutexLock l(&mu_);
    if (!parked_) return;
    // Data the last writer left (the plugin failed): the new flusher
    // retries it at once, not when the last backoff ends.
    retry_at_ = Clock::now();
  }
  StartThreads();
  MutexLock l(&mu_);
  parked_ = false;
}

bool WriteBack::parked() {
  MutexLock l(&mu_);
  return parked_;
}

uint64_t WriteBack::acknowledged() {
  MutexLock l(&mu_);
  return last_seq_ + direct_sends_;
}

bool WriteBack::backing_off() {
  MutexLock l(&mu_);
  return backoff_.count() > 0;
}

WriteBack::~WriteBack() {
  bool stopped;
  {
    MutexLock l(&mu_);
    stopped = stopped_;
  }
  if (!stopped) Stop(milliseconds(0));
}

int WriteBack::Write(const void* buf, uint32_t count, uint64_t offset, bool fua) {
  const int err = WriteRequest(buf, count, offset, fua);
  return fua ? TellLoss(err) : err;
}

int WriteBack::Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) {
  const int err = ZeroRequest(count, offset, may_trim, fua);
  return fua ? TellLoss(err) : err;
}

int WriteBack::Trim(uint32_t count, uint64_t offset, bool fua) {
  const int err = TrimRequest(count, offset, fua);
  return fua ? TellLoss(err) : err;
}

// With multi-conn (no flush_before_release) a batch is released once
// written, so writes a Sink reports lost (a leaving context's flush
// failed) cannot be written again, only reported.  PluginSink::Flush tells
// whichever flush comes first, which may be the flusher's own retry or an
// attempt no client waits for; under nbdkit's multi-conn filter (emulate),
// the client's next flush then reached no plugin connection and succeeded.
// So each loss also fails the next client flush or FUA request, unless
// one failed since it came.
int WriteBack::TellLoss(int err) {
  if (opts_.flush_before_release) return err;
  const uint64_t losses = sink_->losses();
  {
    MutexLock l(&mu_);
    // `<=`: a thread that read the count before another loss was told of
    // must not move it back (and fail one request more).
    if (losses <= losses_told_) return err;
    losses_told_ = losses;
  }
  // Told here, a loss the Sink counted after this request's own flush must
  // not fail the next flush too.
  sink_->LossesTold(losses);
  return err != 0 ? err : sink_->loss_error();
}

int WriteBack::WriteRequest(const void* buf, uint32_t count, uint64_t offset, bool fua) {
  if (count == 0) return fua ? Flush(Trigger::kFua) : 0;
  // A write that cannot fit in the bound with its chunk's header could be
  // buffered only alone, once the queue is empty (which steady writers can
  // put off for ever), and would then hold more than the bound.
  const uint64_t need = WriteCharge(count);
  if (need > opts_.queue_max_bytes) return WriteThrough(buf, count, offset, fua);
  // One over the plugin's maximum is only buffered (and written back in
  // pieces): sent straight, the plugin would fail it.
  const bool one_call = count <= opts_.max_request;
  Bypass bypass = Bypass::kDeclined;
  // A FUA write waits for the plugin anyway, whatever its size and the
  // plugin's speed: it may go straight there when nothing older is left to
  // write or flush (WriteBypass).
  if (one_call && opts_.bypass_min != 0 && (count >= opts_.bypass_min || fua)) {
    bypass = WriteBypass(buf, count, offset, fua, /*any_plugin=*/fua);
    if (bypass == Bypass::kSent) return 0;
  }
  // A write taking more than half the bound fits beside no other such
  // write: buffered, each waited for room until the one before it had been
  // written back, so a slow plugin saw them one at a time (1020 KiB writes
  // with queue-max-size=1M, QD8 over delay-write=1ms: 3x slower than
  // without the filter, and than 1028 KiB ones, written through).  When
  // the queue has no room for it now, it goes straight to the plugin if it
  // may (nothing older overlaps it, ...), whatever the plugin's speed;
  // not a second time if the plugin has just failed it.
  if (one_call && bypass != Bypass::kFailed && need > opts_.queue_max_bytes / 2 &&
      account_.used() + need > opts_.queue_max_bytes &&
      WriteBypass(buf, count, offset, fua, /*any_plugin=*/true) == Bypass::kSent)
    return 0;
  void* pooled = nullptr;
  if (!ReserveRoom(need, count, &pooled)) return ESHUTDOWN;
  Chunk* c = Chunk::Create(buf, count, &account_, pooled);
  if (c == nullptr) {
    account_.Release(need);
    return ENOMEM;
  }
  DirtyRange r;
  r.offset = offset;
  r.length = count;
  r.kind = RangeKind::kData;
  r.chunk = ChunkRef(c);
  return Buffer(std::move(r), fua);
}

bool WriteBack::ReserveRoom(uint64_t bytes, uint64_t pool_payload, void** pooled) {
  return account_.Reserve(
      bytes, [this] { WakeForRoom(); }, pool_payload, pooled, opts_.writer_gone);
}

int WriteBack::ZeroRequest(uint32_t count, uint64_t offset, bool may_trim, bool fua) {
  if (fua && count != 0 && opts_.bypass_min != 0 &&
      ZeroBypass(count, offset, may_trim) == Bypass::kSent)
    return 0;
  if (count != 0 && !ReserveRoom(kRangeCharge)) return ESHUTDOWN;
  DirtyRange r;
  r.offset = offset;
  r.length = count;
  r.kind = RangeKind::kZero;
  r.may_trim = may_trim;
  return Buffer(std::move(r), fua);
}

int WriteBack::TrimRequest(uint32_t count, uint64_t offset, bool fua) {
  if (fua && count != 0 && opts_.bypass_min != 0 && TrimBypass(count, offset) == Bypass::kSent)
    return 0;
  if (count != 0 && !ReserveRoom(kRangeCharge)) return ESHUTDOWN;
  DirtyRange r;
  r.offset = offset;
  r.length = count;
  r.kind = RangeKind::kTrim;
  return Buffer(std::move(r), fua);
}

int WriteBack::Buffer(DirtyRange r, bool fua) {
  MutexLock l(&mu_);
  // A bypass write of these bytes is still in flight: this newer request
  // must not reach the plugin before it, so it waits (a client that sends
  // overlapping writes at once gets them in some order, but one order).
  while (OverlapsBypass(r.offset, r.length)) {
    ++overlap_waits_;
    done_.Wait();
  }
  if (r.length == 0) return fua ? WaitFor(last_seq_, write_gen_, true, Trigger::kFua) : 0;
  const bool was_empty = active_.empty();
  const bool was_half = HalfFull();
  try {
    active_.Insert(std::move(r));  // a failed allocation changes nothing
  } catch (...) {
    account_.Release(kRangeCharge);  // reserved by the caller for this entry
    throw;                           // the caller's chunk goes with r
  }
  const uint64_t seq = ++last_seq_;
  if (was_empty) {
    active_since_ = Clock::now();
    active_min_seq_ = seq;
  }
  ++active_requests_;
  range_charges_ += kRangeCharge;  // reserved by the caller
  // An overwrite adds no entry, and one over several ranges leaves fewer:
  // their charges are given back (waking writers that wait).  One inside a
  // buffered range splits it in two: one entry more than its own, charged.
  ReconcileChargesLocked();
  counters_.RaisePeak(active_.data_bytes() + batch_data_bytes_);
  if (active_requests_ == threshold_) threshold_at_ = Clock::now();
  if (active_requests_ == threshold_ || (was_empty && opts_.max_age.count() > 0) ||
      (!was_half && HalfFull()))
    work_.Signal();
  if (fua) return WaitFor(seq, write_gen_, true, Trigger::kFua);
  return 0;
}

int WriteBack::WriteThrough(const void* buf, uint32_t count, uint64_t offset, bool fua) {
  MutexLock l(&mu_);
  const uint64_t before = last_seq_;  // what FUA also covers
  // Everything acknowledged before this request must reach the Sink first,
  // or an older buffered overlap would land over it later.  Then, like a
  // bypass write, it is in flight alone on its bytes: a newer request for
  // them waits for it (Buffer), or could be written back before it lands
  // and be read back, after both were acknowledged, first as the newest
  // and then as overwritten.  Requests for its bytes that came while it
  // waited are written first too; one in bypass_ (itself in flight) ends.
  while (true) {
    if (int err = WaitFor(last_seq_, 0, false, Trigger::kBackpressure)) return err;
    if (OverlapsBypass(offset, count)) {
      ++overlap_waits_;
      done_.Wait();
    } else if (!active_.Overlaps(offset, count) && !OverlapsBatches(offset, count)) {
      break;
    }
  }
  const std::pair<uint64_t, uint64_t> mine{offset, count};
  bypass_.push_back(mine);
  counters_.writethrough_requests.fetch_add(1, std::memory_order_relaxed);
  mu_.Unlock();  // no lock across plugin I/O
  // Nothing keeps this write once the Sink has it.  With flush_before_release
  // (contexts not coherent) the write may have gone through another
  // connection's context, which could leave before any flush covers it, and
  // which the client's own reads do not go through: flush it, as a batch
  // is flushed, before acknowledging it.
  const bool flush = opts_.flush_before_release;
  const uint64_t losses_before = flush ? sink_->losses() : 0;
  uint64_t calls = 0;  // within the plugin's maximum
  int err = WriteInPieces(sink_, static_cast<const uint8_t*>(buf), count, offset, opts_.max_request,
                          &calls);
  if (err == 0 && flush) err = FlushSinceLosses(losses_before);
  mu_.Lock();
  EndBypassLocked(mine);
  counters_.plugin_writes.fetch_add(calls, std::memory_order_relaxed);  // made, as a batch's
  if (err) {
    CountFailedCallLocked(err);
    return err;
  }
  ++write_gen_;
  ++direct_sends_;
  // FUA: this write, and what came before it (written above, not flushed),
  // durable, by a plugin flush as for a buffered FUA request.  With
  // flush_before_release both are already: each batch was flushed before
  // its ranges left, and this write just now.
  return fua && !flush ? WaitFor(before, write_gen_, true, Trigger::kFua) : 0;
}

// A failed write made on a client's thread, outside any batch (a bypass
// or a write-through): counted like a failed batch, but it starts no
// backoff (the write is buffered, or its client told).  Not if nbdkit
// aborted it because its client has gone (see AbortedHere).
void WriteBack::CountFailedCallLocked(int err) {
  if (err == ESHUTDOWN && opts_.writer_gone && opts_.writer_gone()) return;
  counters_.flush_errors.fetch_add(1, std::memory_order_relaxed);
  // ENOTCONN only says no context was there (see RecordError).
  if (err != ENOTCONN || last_error_ == 0) last_error_ = err;
  counters_.last_error.store(last_error_, std::memory_order_relaxed);
}

void WriteBack::CountFailedCall(int err) {
  MutexLock l(&mu_);
  CountFailedCallLocked(err);
}

void WriteBack::EndBypassLocked(std::pair<uint64_t, uint64_t> mine) {
  // The entries are disjoint (OverlapsBypass before each was added), so
  // this one is ours.
  const auto it = std::find(bypass_.begin(), bypass_.end(), mine);
  *it = bypass_.back();
  bypass_.pop_back();
  done_.SignalAll();  // for writers of the same bytes (Buffer, WriteThrough)
}

bool WriteBack::OverlapsBypass(uint64_t offset, uint64_t length) const {
  for (const auto& [o, n] : bypass_)
    if (offset < o + n && o < offset + length) return true;
  return false;
}

// A large write to a plugin whose requests are CPU-bound (a local file's
// page cache): buffering it would copy it once more and hand it to one
// write-back thread, only to make the same plugin call later, so it goes
// to the plugin now, from the client's thread, like with no filter.  Only
// when nothing buffered or being written shares a byte with it (so that no
// older data can land over it later) and write-back is neither paused nor
// backing off after a failure.  If the plugin fails it, the write is
// buffered instead and retried like any other: sent or buffered, a write
// that returns 0 is never lost.
WriteBack::Bypass WriteBack::WriteBypass(const void* buf, uint32_t count, uint64_t offset, bool fua,
                                         bool any_plugin) {
  return SendDirect(offset, count, fua, any_plugin, 1,
                    [&] { return batch_writer_.WriteTimed(buf, count, offset, fua); });
}

// A FUA zero or trim, like a FUA write (below): to the plugin with FUA
// when nothing before it is left to write back or flush.
WriteBack::Bypass WriteBack::ZeroBypass(uint32_t count, uint64_t offset, bool may_trim) {
  return SendDirect(offset, count, /*fua=*/true, /*any_plugin=*/true, sink_->ZeroCalls(count),
                    [&] { return sink_->Zero(count, offset, may_trim, true); });
}

WriteBack::Bypass WriteBack::TrimBypass(uint32_t count, uint64_t offset) {
  return SendDirect(offset, count, /*fua=*/true, /*any_plugin=*/true, sink_->TrimCalls(),
                    [&] { return sink_->Trim(count, offset, true); });
}

template <typename Call>
WriteBack::Bypass WriteBack::SendDirect(uint64_t offset, uint32_t count, bool fua, bool any_plugin,
                                        uint64_t calls, Call&& call) {
  MutexLock l(&mu_);
  if (stopping_ || paused_ || backoff_.count() > 0 || opts_.flush_before_release ||
      (!any_plugin && batch_writer_.latency_bound()) || active_.Overlaps(offset, count) ||
      OverlapsBatches(offset, count) || OverlapsBypass(offset, count))
    return Bypass::kDeclined;
  // A FUA reply says that everything acknowledged before it is durable,
  // and reports a failure to write any of it, as a flush does.  So a FUA
  // request goes to the plugin (with FUA) only when nothing acknowledged
  // before it waits to be written back or flushed, as with a client that
  // writes through (qemu's cache=writethrough): one plugin call, as with no
  // filter, where buffering it would copy it, write it and flush.  One at
  // a time: FUA requests that come together are buffered, and one plugin
  // flush covers them all.
  if (fua && (!bypass_.empty() || !AllFlushedLocked())) return Bypass::kDeclined;
  const uint64_t gen_before = write_gen_;
  const std::pair<uint64_t, uint64_t> mine{offset, count};
  bypass_.push_back(mine);
  mu_.Unlock();  // no lock across plugin I/O
  const int err = call();
  mu_.Lock();
  EndBypassLocked(mine);
  counters_.plugin_writes.fetch_add(calls, std::memory_order_relaxed);  // made, as a batch's
  if (err != 0) {
    CountFailedCallLocked(err);
    return Bypass::kFailed;
  }
  ++write_gen_;
  ++direct_sends_;
  // Durable with its FUA; when no other Sink write completed meanwhile,
  // every write so far is (nothing was unflushed when it started), and a
  // flush or FUA request that follows has nothing to do.
  if (fua && write_gen_ == gen_before + 1 && flushed_gen_ >= gen_before) flushed_gen_ = write_gen_;
  counters_.bypass_writes.fetch_add(1, std::memory_order_relaxed);
  return Bypass::kSent;
}

bool WriteBack::AllFlushedLocked() const {
  return active_.empty() && batches_.empty() && flushed_seq_ >= last_seq_ &&
         flushed_gen_ >= write_gen_;
}

int WriteBack::Flush(Trigger why) {
  int err;
  {
    MutexLock l(&mu_);
    err = WaitFor(last_seq_, write_gen_, true, why);
  }
  // A client's FUA request is told in Write, Zero or Trim (which may come
  // here with kFua), once.
  return why == Trigger::kClient ? TellLoss(err) : err;
}

int WriteBack::WaitFor(uint64_t seq, uint64_t gen, bool flush, Trigger why, bool count,
                       const RetryWait* retry) {
  auto satisfied = [&]() REQUIRES(mu_) {
    return flush ? flushed_seq_ >= seq && flushed_gen_ >= gen : written_seq_ >= seq;
  };
  if (satisfied()) return 0;
  if (stopped_) return ESHUTDOWN;
  if (flush) {
    flush_req_seq_ = std::max(flush_req_seq_, seq);
    flush_req_gen_ = std::max(flush_req_gen_, gen);
    if (count)
      counters_.by_trigger[static_cast<size_t>(why)].fetch_add(1, std::memory_order_relaxed);
  } else {
    drain_req_seq_ = std::max(drain_req_seq_, seq);
  }
  pending_why_ = why;
  if (retry == nullptr) kick_ = true;
  const uint64_t started_before = retry ? retry->attempts_before : attempts_started_;
  auto sleep = [&]() REQUIRES(mu_) {
    if (retry)
      done_.WaitUntil(retry->deadline);
    else
      done_.Wait();
  };
  bool leave_to_flusher = why == Trigger::kDisconnect;
  while (!satisfied()) {
    if (last_failed_attempt_ > started_before) return last_error_;
    if (stopped_) return ESHUTDOWN;
    // No writer is connected (Park): no Sink context is left to write or
    // flush through, and a batch run here could start helper threads.
    if (parked_) return ENOTCONN;
    if (retry && Clock::now() >= retry->deadline) return ETIMEDOUT;
    // The caller does the work itself when nobody else is at it: handing
    // the batch and the plugin flush to other threads and waiting to be
    // woken costs several context switches per client flush, which is most
    // of a flush's cost on a fast plugin.  Not on a disconnect: that thread's
    // connection is closing, and nbdkit aborts plugin calls made from it
    // that wait (nbdkit_nanosleep, as in the delay filter, fails with
    // ESHUTDOWN); the flusher writes for it.  So it does once an attempt
    // made here was aborted so (the client went while it waited).
    if (leave_to_flusher) {
      work_.Signal();
      sleep();
    } else {
      const uint64_t attempt = attempts_started_ + 1;  // RunHere's, if it starts one
      if (!RunHere(seq, gen, flush))
        sleep();
      else if (aborted_attempt_ == attempt)
        leave_to_flusher = true;
    }
  }
  return 0;
}

bool WriteBack::RunHere(uint64_t seq, uint64_t gen, bool flush) {
  if (stopping_) return false;
  if (written_seq_ < seq) {
    // Requests up to seq that are not in active_ are in running batches:
    // wait for those.  A batch of only newer requests is not this
    // caller's to write.
    if (active_.empty() || active_min_seq_ > seq || !CanStartBatch()) return false;
    RunBatch(pending_why_, /*client_thread=*/true);
    return true;
  }
  if (flush && PluginFlushDueFor(seq, gen)) {
    RunFlushJob(NewFlushJob(), /*client_thread=*/true);
    return true;
  }
  return false;
}

bool WriteBack::CanStartBatch() const {
  if (batches_.empty()) return true;
  // With flush_before_release a batch's plugin flush must cover exactly the
  // batches before it: one at a time.  A plugin whose requests are
  // CPU-bound gains nothing from more of them at once (BatchWriter).
  if (opts_.flush_before_release || batches_.size() >= kMaxBatches ||
      active_.size() > kMaxCheckedRanges || !batch_writer_.latency_bound())
    return false;
  for (const DirtyRange& r : active_)
    if (OverlapsBatches(r.offset, r.length)) return false;
  return true;
}

bool WriteBack::OverlapsBatches(uint64_t offset, uint64_t length) const {
  for (const Batch& b : batches_)
    if (b.map.Overlaps(offset, length)) return true;
  return false;
}

void WriteBack::UpdateWrittenSeq() {
  uint64_t oldest = last_seq_ + 1;  // the oldest request not yet written
  if (!active_.empty()) oldest = std::min(oldest, active_min_seq_);
  for (const Batch& b : batches_) oldest = std::min(oldest, b.min_seq);
  written_seq_ = std::max(written_seq_, oldest - 1);
}

void WriteBack::WakeForRoom() {
  MutexLock l(&mu_);
  pressure_ = true;
  work_.Signal();
}

Overlay WriteBack::Lookup(uint64_t offset, uint64_t length) {
  MutexLock l(&mu_);
  return SnapshotLocked(offset, length);
}

Overlay WriteBack::LookupExtents(uint64_t offset, uint64_t* length, size_t max_ranges) {
  MutexLock l(&mu_);
  uint64_t stop = offset + *length;
  for (const Batch& b : batches_) stop = b.map.CutAfter(offset, stop, max_ranges);
  stop = active_.CutAfter(offset, stop, max_ranges);
  *length = stop - offset;
  return SnapshotLocked(offset, *length);
}

Overlay WriteBack::SnapshotLocked(uint64_t offset, uint64_t length) {
  Overlay ov(offset, length);
  for (const Batch& b : batches_) b.map.Collect(offset, length, &ov.pieces());  // disjoint
  active_.Collect(offset, length, &ov.pieces());
  if (!ov.empty()) counters_.read_overlay_hits.fetch_add(1, std::memory_order_relaxed);
  return ov;
}

bool WriteBack::FlushPending() const {
  return flush_req_seq_ > flushed_seq_ || flush_req_gen_ > flushed_gen_;
}

bool WriteBack::BatchDue(Clock::time_point now, Trigger* why) const {
  // Someone waits for requests that are still in active_ (not only in
  // running batches).
  const uint64_t need = std::max(drain_req_seq_, flush_req_seq_);
  if (need > written_seq_ && active_min_seq_ <= need) {
    *why = pending_why_;
    return true;
  }
  if (pressure_) {
    *why = Trigger::kBackpressure;
    return true;
  }
  if (backoff_.count() > 0) {  // a failed batch waits for its retry only
    *why = Trigger::kRetry;
    return true;
  }
  if (paused_) return false;
  if (active_requests_ >= threshold_ && now >= threshold_at_ + opts_.gather) {
    *why = Trigger::kThreshold;
    return true;
  }
  if (HalfFull()) {  // counted with threshold batches: a size threshold
    *why = Trigger::kThreshold;
    return true;
  }
  if (opts_.max_age.count() > 0 && now >= active_since_ + opts_.max_age) {
    *why = Trigger::kAge;
    return true;
  }
  return false;
}

void WriteBack::FlusherLoop() {
  MutexLock l(&mu_);
  while (!stopping_) {
    const auto now = Clock::now();
    const bool backing_off = backoff_.count() > 0 && now < retry_at_ && !kick_;
    Trigger why = Trigger::kThreshold;
    const bool can_start = !active_.empty() && CanStartBatch();
    if (!backing_off && can_start && BatchDue(now, &why)) {
      RunBatch(why);
    } else if (!backing_off && PluginFlushDue()) {
      StartPluginFlush();
    } else {
      auto wake = Clock::time_point::max();
      // A buffer still held (by a read, or by the thread that ran the
      // last batch) reaches the pool later without waking us: keep the
      // timer armed while anything is charged or pooled.
      const bool idle_buffers = account_.pooled() > 0 || batch_writer_.coalescing_idle();
      if (active_.empty() && (idle_buffers || account_.used() > 0)) {
        const auto release_at = last_work_ + kIdleRelease;
        if (now >= release_at && idle_buffers) {
          mu_.Unlock();
          ReleaseIdleMemory();
          mu_.Lock();
          continue;
        }
        wake = now >= release_at ? now + kIdleRelease : release_at;
      }
      // While backing off, only the retry (or a kick) may start a batch:
      // the age and threshold times may be long past, and waiting until
      // them would spin.  While active_ cannot start, the end of a batch
      // wakes the flusher.
      if (backing_off) {
        wake = std::min(wake, retry_at_);
      } else if (can_start && !paused_) {
        if (opts_.max_age.count() > 0) wake = std::min(wake, active_since_ + opts_.max_age);
        if (active_requests_ >= threshold_) wake = std::min(wake, threshold_at_ + opts_.gather);
      }
      if (active_.empty() && account_.pooled() == 0 && account_.used() > 0)
        ++waits_on_held_buffers_;
      if (wake == Clock::time_point::max())
        work_.Wait();
      else
        work_.WaitUntil(wake);
    }
  }
}

void WriteBack::RunBatch(Trigger why, bool client_thread) {
  // Out of memory, an attempt fails like the plugin's (retried after a
  // backoff, reported to a flush waiting for it) and loses nothing: no
  // exception may leave the flusher (nbdkit would end), and none may
  // leave once the batch has left active_.
  try {
    batches_.emplace_back();
  } catch (const std::bad_alloc&) {
    pressure_ = false;  // as an attempt that started: the backoff holds the next one
    kick_ = false;
    RecordError(ENOMEM, ++attempts_started_);
    done_.SignalAll();
    return;
  }
  const auto it = std::prev(batches_.end());
  Batch& b = *it;
  b.map = std::move(active_);
  active_ = DirtyMap();
  b.requests = active_requests_;
  b.min_seq = active_min_seq_;
  b.since = active_since_;
  active_requests_ = 0;
  batch_data_bytes_ += b.map.data_bytes();
  const uint64_t gen_before = write_gen_;
  const uint64_t attempt = ++attempts_started_;
  const bool flush_after = opts_.flush_before_release;
  pressure_ = false;
  kick_ = false;
  // Requested flushes were counted when asked for; batches the flusher
  // starts by itself are counted here, a retry of a failed one as a retry.
  if (backoff_.count() > 0)
    why = Trigger::kRetry;
  if (why != Trigger::kClient && why != Trigger::kFua && why != Trigger::kDisconnect &&
      why != Trigger::kShutdown && why != Trigger::kControl)
    counters_.by_trigger[static_cast<size_t>(why)].fetch_add(1, std::memory_order_relaxed);
  const uint64_t requests = b.requests;
  const uint64_t bytes = b.map.total_bytes();

  const auto start = Clock::now();
  uint64_t plugin_writes = 0;
  std::vector<char> written;
  mu_.Unlock();  // no lock across plugin I/O, nor while a large batch is copied
  // A context that carried this batch's writes may leave, its last flush
  // failing, before the batch's own flush; a flush job running meanwhile may
  // be the one told.  Only flush_before_release keeps a batch until it is
  // flushed, and then it is the only batch running: a loss since it began
  // is of its writes.
  const uint64_t losses_before = flush_after ? sink_->losses() : 0;
  std::vector<DirtyRange> plan;
  int err;
  try {
    plan = PlanBatch(b);
    err = batch_writer_.Write(plan, &written, &plugin_writes);
  } catch (const std::bad_alloc&) {  // before anything was written
    plan.clear();
    written.clear();
    err = ENOMEM;
  }
  // Whether the ranges written are in the plugin for every context to see:
  // at once with multi-conn, else once a flush has reached the contexts
  // that carried them.  A batch that failed in part is flushed too, so
  // that what it wrote can be retired: kept and written again in full,
  // a batch of many ranges with a plugin failing now and then would
  // almost never get through.
  bool written_durable = !flush_after;
  if (flush_after && (err == 0 || std::find(written.begin(), written.end(), 1) != written.end())) {
    const int flush_err = FlushSinceLosses(losses_before);
    written_durable = flush_err == 0;
    if (err == 0) err = flush_err;
  }
  mu_.Lock();
  const uint64_t us = static_cast<uint64_t>(duration_cast<microseconds>(Clock::now() - start).count());
  counters_.plugin_writes.fetch_add(plugin_writes, std::memory_order_relaxed);
  batch_data_bytes_ -= b.map.data_bytes();

  DirtyMap retired;  // freed after the lock is dropped: reads must not wait for that
  if (err == 0) {
    retired = std::move(b.map);
    batches_.erase(it);
    ++write_gen_;
    UpdateWrittenSeq();
    if (flush_after) {  // the only batch running (CanStartBatch)
      flushed_seq_ = std::max(flushed_seq_, written_seq_);
      flushed_gen_ = std::max(flushed_gen_, gen_before);
    }
    backoff_ = milliseconds(0);
    counters_.batches_flushed.fetch_add(1, std::memory_order_relaxed);
    counters_.requests_flushed.fetch_add(requests, std::memory_order_relaxed);
    counters_.bytes_flushed.fetch_add(bytes, std::memory_order_relaxed);
    counters_.RecordBatchLatency(us);
  } else {
    // Ranges written are in the plugin (and, see above, visible to every
    // context): retire them, so that a plugin failing now and then, or
    // refusing one range for good, still makes progress.  Keep the rest:
    // the failed batch is older than anything buffered since, and shares
    // no byte with the other batches running.
    if (written_durable) {
      uint64_t retired = 0, retired_bytes = 0;
      for (size_t i = 0; i < plan.size(); ++i)
        if (written[i]) {
          ++retired;
          retired_bytes += plan[i].length;
          b.map.Erase(plan[i].offset);
        }
      // Which requests a range holds is not kept: requests that overlapped
      // were merged into one range, and one request split by later ones
      // left several.  Count one request per range retired, but leave at
      // least one per range kept (or all the batch's requests, if fewer),
      // so that what stays is never under-counted nor the count wraps.
      const uint64_t kept_ranges = plan.size() - retired;
      retired = std::min(retired, b.requests - std::min(b.requests, kept_ranges));
      counters_.requests_flushed.fetch_add(retired, std::memory_order_relaxed);
      counters_.bytes_flushed.fetch_add(retired_bytes, std::memory_order_relaxed);
      b.requests -= retired;
    }
    const bool was_empty = active_.empty();
    // The batch stays listed (reads see it) until it is merged back, for
    // which memory may have to be waited for.
    while (true) {
      try {
        active_.InsertUnder(std::move(b.map));
        break;
      } catch (const std::bad_alloc&) {
        batch_data_bytes_ += b.map.data_bytes();  // still listed meanwhile
        mu_.Unlock();
        std::this_thread::sleep_for(kNoMemoryWait);
        mu_.Lock();
        batch_data_bytes_ -= b.map.data_bytes();
      }
    }
    active_requests_ += b.requests;
    if (was_empty || b.min_seq < active_min_seq_) active_min_seq_ = b.min_seq;
    if (was_empty || b.since < active_since_) active_since_ = b.since;
    batches_.erase(it);
    if (!AbortedHere(err, client_thread, attempt)) RecordError(err, attempt);
    NoteQuittingLocked(err, client_thread);
  }
  ReconcileChargesLocked();
  // What the batch retired, and its plan's references to buffers (a
  // failed batch's too), are freed below without the lock: memory counts
  // wait for that (retiring_).  The flusher, woken now, must see this
  // batch as the last work, or it could take the export for idle (the
  // last batch long ago) and release the pool as it fills.
  ++retiring_;
  last_work_ = Clock::now();
  done_.SignalAll();
  work_.Signal();  // the flusher may have waited for the batch to end
  BatchHook hook = hook_;
  void* opaque = hook_opaque_;
  mu_.Unlock();
  retired.clear();
  plan.clear();
  mu_.Lock();
  last_work_ = Clock::now();
  if (--retiring_ == 0) done_.SignalAll();
  if (hook != nullptr) {
    mu_.Unlock();
    hook(opaque, why, requests, bytes, plugin_writes, us, err);
    mu_.Lock();
  }
}

int WriteBack::FlushSinceLosses(uint64_t losses_before) {
  const int err = sink_->Flush();
  // Another flush may have been the one told that writes were lost.
  if (err == 0 && sink_->losses() != losses_before) return sink_->loss_error();
  return err;
}

void WriteBack::ReleaseIdleMemory() {
  account_.Drain();
  batch_writer_.ReleaseIdleBuffers();
#ifdef __GLIBC__
  // Chunks are allocated by nbdkit's request threads and freed by others,
  // so their pages sit free in several malloc arenas: hand them back too.
  malloc_trim(0);
#endif
}

// Runs on the batch's thread without mu_: other threads only read b.map,
// and only the thread running the batch changes it, so iterating it here
// races with nothing.
std::vector<DirtyRange> WriteBack::PlanBatch(const Batch& b) {
  std::vector<DirtyRange> plan;
  plan.reserve(b.map.size());
  for (const DirtyRange& r : b.map) plan.push_back(r);
  return plan;
}

bool WriteBack::PluginFlushDue() const {
  return PluginFlushDueFor(flush_req_seq_, flush_req_gen_);  // the newest waiter's
}

bool WriteBack::PluginFlushDueFor(uint64_t seq, uint64_t gen) const {
  if ((flushed_seq_ >= seq && flushed_gen_ >= gen) || written_seq_ < seq) return false;
  if (flushes_in_flight_ == 0) return true;
  // One in flight already covers this waiter: wait for it.
  if (newest_flush_seq_ >= seq && newest_flush_gen_ >= gen) return false;
  return flushes_in_flight_ < kFlushThreads;
}

WriteBack::FlushJob WriteBack::NewFlushJob() {
  newest_flush_seq_ = written_seq_;
  newest_flush_gen_ = write_gen_;
  ++flushes_in_flight_;
  kick_ = false;
  return {written_seq_, write_gen_, ++attempts_started_};
}

void WriteBack::StartPluginFlush() {
  const FlushJob job = NewFlushJob();
  try {
    flush_jobs_.push_back(job);
  } catch (const std::bad_alloc&) {  // no room to hand it over: run it here
    RunFlushJob(job);
    return;
  }
  flush_wake_.Signal();
}

void WriteBack::RunFlushJob(const FlushJob& job, bool client_thread) {
  mu_.Unlock();  // no lock across plugin I/O
  const int err = sink_->Flush();
  mu_.Lock();
  if (err == 0) {
    flushed_seq_ = std::max(flushed_seq_, job.seq);
    flushed_gen_ = std::max(flushed_gen_, job.gen);
    if (job.attempt > last_failed_attempt_) backoff_ = milliseconds(0);
  } else if (!AbortedHere(err, client_thread, job.attempt)) {
    RecordError(err, job.attempt);
    NoteQuittingLocked(err, client_thread);
  }
  --flushes_in_flight_;
  done_.SignalAll();
  work_.Signal();  // the flusher may start the next flush
}

// Plugin flushes the flusher starts run on this thread, so that it can
// write the next batch meanwhile.  One plugin flush is in flight at a time:
// waiters it does not cover wait for it, and the next one covers all of
// them (group commit).  Several at once (4 until 2026-11-22) measured
// slower on ext4, where concurrent fdatasync calls each wait for their own
// journal commit: fio randwrite QD16 fsync=32 over delay-write=1ms, fresh
// sparse image, 4 interleaved runs: 10,015 IOPS median with 4 in flight,
// 12,139 with 1 (no filter: 7,676).  A flush covers the writes that
// completed before it started (FlushJob), which is all NBD promises.
void WriteBack::PluginFlushLoop() {
  MutexLock l(&mu_);
  while (true) {
    while (flush_jobs_.empty() && !flush_thread_stop_) flush_wake_.Wait();
    if (flush_jobs_.empty()) return;
    const FlushJob job = flush_jobs_.front();
    flush_jobs_.pop_front();
    RunFlushJob(job);
  }
}

// nbdkit fails a wait (nbdkit_nanosleep, as in the delay filter) with
// ESHUTDOWN in a plugin call made on the thread of a client that has gone.
// That is not the plugin's failure: no other client's flush may fail for it
// (nor a backoff start), and the flusher, whose waits nbdkit aborts only at
// shutdown, writes or flushes at once instead.
bool WriteBack::AbortedHere(int err, bool client_thread, uint64_t attempt) {
  if (err != ESHUTDOWN || !client_thread || !opts_.writer_gone || !opts_.writer_gone())
    return false;
  aborted_attempt_ = attempt;
  kick_ = true;
  return true;
}

void WriteBack::NoteQuittingLocked(int err, bool client_thread) {
  if (err == ESHUTDOWN && !client_thread && !quitting_ && opts_.writer_gone && opts_.writer_gone())
    quitting_ = true;
}

void WriteBack::RecordError(int err, uint64_t attempt) {
  last_failed_attempt_ = std::max(last_failed_attempt_, attempt);
  // ENOTCONN only says no connection was there to borrow a plugin context
  // from: keep reporting the plugin's own error if there was one.
  if (err != ENOTCONN || last_error_ == 0) last_error_ = err;
  counters_.flush_errors.fetch_add(1, std::memory_order_relaxed);
  counters_.last_error.store(last_error_, std::memory_order_relaxed);
  backoff_ = backoff_.count() == 0 ? opts_.retry_min : std::min(backoff_ * 2, opts_.retry_max);
  retry_at_ = Clock::now() + backoff_;
}

int WriteBack::FlushUntil(milliseconds limit, Trigger why, bool count) {
  const auto until = Clock::now() + limit;
  MutexLock l(&mu_);
  uint64_t retired = counters_.bytes_flushed.load(std::memory_order_relaxed);
  auto progress_at = Clock::now();
  int err = WaitFor(last_seq_, write_gen_, true, why, count);
  while (err != 0 && Clock::now() < until) {
    // Parked, a flush fails at once (ENOTCONN) and nothing can change that
    // before Unpark(): waiting for retry_at_, long past, would spin.
    if (parked_) break;
    // Quitting, a layer below that waits on every call (delay) can write
    // nothing more: the data is logged as lost once the retries, at the
    // longest backoff, have retired nothing for kQuitPatience x retry_max,
    // not after shutdown-timeout.  One that waits only when its budget is
    // spent (rate) still gets data through between retries: go on while
    // it does.
    const uint64_t now_retired = counters_.bytes_flushed.load(std::memory_order_relaxed);
    if (now_retired != retired) {
      retired = now_retired;
      progress_at = Clock::now();
    } else if (quitting_ && Clock::now() - progress_at >= kQuitPatience * opts_.retry_max) {
      break;
    }
    // The flusher retries at the backoff's pace: wait for the outcome of
    // its next retry (or for the data to be flushed otherwise), until
    // `until`.  Kicking it here made attempts come in bursts (42 in 2 ms):
    // a failed attempt signals done_ as it ends, which woke this loop
    // early, and a kick makes the flusher ignore the backoff.  Any attempt
    // from here on counts: one the flusher starts just as this thread
    // wakes must not make it wait for the one after.
    const RetryWait retry{attempts_started_, until};
    while (Clock::now() < until && retry_at_ > Clock::now() && !stopped_ && !parked_ &&
           (flushed_seq_ < last_seq_ || flushed_gen_ < write_gen_))
      done_.WaitUntil(std::min(until, retry_at_));
    // The same request tried again: counted once.
    const int r = WaitFor(last_seq_, write_gen_, true, why, /*count=*/false, &retry);
    if (r == ETIMEDOUT) break;  // the last attempt's error stands
    err = r;
  }
  return err;
}

Leftover WriteBack::Stop(milliseconds limit) {
  bool buffered;
  {
    MutexLock l(&mu_);
    buffered = !active_.empty() || !batches_.empty() || FlushPending();
  }
  if (buffered && limit.count() > 0) FlushUntil(limit, Trigger::kShutdown);
  JoinThreads();
  MutexLock l(&mu_);
  stopped_ = true;
  done_.SignalAll();
  Leftover left;
  left.requests = active_requests_;
  for (Batch& b : batches_) {  // none once client requests have ended
    active_.InsertUnder(std::move(b.map));
    left.requests += b.requests;
  }
  batches_.clear();
  batch_data_bytes_ = 0;
  left.bytes = active_.total_bytes();
  // An error is worth reporting only if something is left because of it.
  if (!active_.empty() || FlushPending()) left.error = last_error_ ? last_error_ : EIO;
  size_t shown = 0;
  for (const DirtyRange& r : active_) {
    if (shown++ == 8) {
      left.ranges += " ...";
      break;
    }
    if (!left.ranges.empty()) left.ranges += ' ';
    left.ranges += '[' + std::to_string(r.offset) + ",+" + std::to_string(r.length) + ')';
  }
  if (active_.size() > 8) left.ranges += " (" + std::to_string(active_.size()) + " ranges)";
  return left;
}

void WriteBack::Pause() {
  MutexLock l(&mu_);
  paused_ = true;
}

void WriteBack::Resume() {
  MutexLock l(&mu_);
  paused_ = false;
  work_.Signal();
}

void WriteBack::SetThreshold(uint32_t n) {
  MutexLock l(&mu_);
  threshold_ = n;
  work_.Signal();
}

void WriteBack::SetBatchHook(BatchHook hook, void* opaque) {
  MutexLock l(&mu_);
  hook_ = hook;
  hook_opaque_ = opaque;
}

void WriteBack::ReconcileChargesLocked() {
  uint64_t ranges = active_.size();
  for (const Batch& b : batches_) ranges += b.map.size();
  const uint64_t held = ranges * kRangeCharge;
  if (range_charges_ < held) {
    // Entries nobody has paid for: a request split a buffered range, or a
    // failed batch's ranges merged back under newer ones were split by
    // them.  Charged now, past the bound if need be: the next writer waits
    // until they are given back.
    account_.Charge(held - range_charges_);
  } else if (range_charges_ > held) {
    account_.Release(range_charges_ - held);
  }
  range_charges_ = held;
}

uint64_t WriteBack::MemoryBytesLocked() const {
  // The charges for index entries stand in for index_bytes(): count the
  // real thing instead.  A charge is in account_ before it is in
  // range_charges_, and leaves range_charges_ first.
  const uint64_t charges = range_charges_;
  uint64_t index = active_.index_bytes();
  for (const Batch& b : batches_) index += b.map.index_bytes();
  const uint64_t used = account_.used();
  return (used > charges ? used - charges : 0) + index;
}

uint64_t WriteBack::QueuedRequestsLocked() const {
  uint64_t n = active_requests_;
  for (const Batch& b : batches_) n += b.requests;
  return n;
}

uint64_t WriteBack::queued_requests() {
  MutexLock l(&mu_);
  return QueuedRequestsLocked();
}

uint64_t WriteBack::buffered_end() {
  MutexLock l(&mu_);
  uint64_t end = active_.end_offset();
  for (const Batch& b : batches_) end = std::max(end, b.map.end_offset());
  return end;
}

uint64_t WriteBack::queued_bytes() {
  MutexLock l(&mu_);
  return active_.data_bytes() + batch_data_bytes_;
}

uint64_t WriteBack::memory_bytes() {
  MutexLock l(&mu_);
  while (retiring_ > 0) done_.Wait();
  return MemoryBytesLocked();
}

uint32_t WriteBack::threshold() {
  MutexLock l(&mu_);
  return threshold_;
}

uint64_t WriteBack::overlap_waits() {
  MutexLock l(&mu_);
  return overlap_waits_;
}

uint64_t WriteBack::waits_on_held_buffers() {
  MutexLock l(&mu_);
  return waits_on_held_buffers_;
}

std::string WriteBack::DebugString() {
  MutexLock l(&mu_);
  // "active | batch", or with several batches running "active | b1 | b2".
  std::string s = active_.ToString();
  s += " | ";
  bool first = true;
  for (const Batch& b : batches_) {
    if (!first) s += " | ";
    first = false;
    s += b.map.ToString();
  }
  return s;
}

CounterList WriteBack::Stats() {
  CounterList c;
  auto add = [&c](const char* k, uint64_t v) { c.emplace_back(k, std::to_string(v)); };
  {
    MutexLock l(&mu_);
    while (retiring_ > 0) done_.Wait();
    uint64_t total = active_.total_bytes();
    auto since = active_.empty() ? Clock::time_point::max() : active_since_;
    for (const Batch& b : batches_) {
      total += b.map.total_bytes();
      since = std::min(since, b.since);
    }
    const uint64_t data = active_.data_bytes() + batch_data_bytes_;
    add("threshold", threshold_);
    add("paused", paused_ ? 1 : 0);
    add("plugin_latency_bound", batch_writer_.latency_bound() ? 1 : 0);
    add("writeback_helpers", batch_writer_.helpers_started());
    add("queued_requests", QueuedRequestsLocked());
    add("queued_bytes", data);
    add("queued_zero_bytes", total - data);
    add("memory_bytes", MemoryBytesLocked());
    add("pooled_bytes", account_.pooled());
    add("coalescing_bytes", batch_writer_.coalescing_bytes());
    uint64_t age = 0;
    if (since != Clock::time_point::max())
      age = static_cast<uint64_t>(duration_cast<milliseconds>(Clock::now() - since).count());
    add("oldest_dirty_age_ms", age);
  }
  auto get = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  add("peak_queued_bytes", get(counters_.peak_queued_bytes));
  add("batches_flushed", get(counters_.batches_flushed));
  add("requests_flushed", get(counters_.requests_flushed));
  add("bytes_flushed", get(counters_.bytes_flushed));
  add("plugin_writes", get(counters_.plugin_writes));
  add("writethrough_requests", get(counters_.writethrough_requests));
  add("bypass_writes", get(counters_.bypass_writes));
  for (size_t t = 0; t < static_cast<size_t>(Trigger::kCount); ++t)
    c.emplace_back(std::string("flushes_") + TriggerName(static_cast<Trigger>(t)),
                   std::to_string(get(counters_.by_trigger[t])));
  add("flush_errors", get(counters_.flush_errors));
  int e = counters_.last_error.load(std::memory_order_relaxed);
  c.emplace_back("last_error", e ? std::strerror(e) : "none");
  add("backpressure_waits", account_.waits());
  add("backpressure_wait_us", account_.wait_ns() / 1000);
  add("read_overlay_hits", get(counters_.read_overlay_hits));
  add("last_flush_us", get(counters_.last_flush_us));
  add("max_flush_us", get(counters_.max_flush_us));
  std::string hist;
  for (size_t i = 0; i < counters_.flush_latency_hist.size(); ++i) {
    if (i) hist += ' ';
    hist += (i < kLatencyBucketsMs.size() ? "le" + std::to_string(kLatencyBucketsMs[i]) + "ms="
                                          : std::string("inf="));
    hist += std::to_string(get(counters_.flush_latency_hist[i]));
  }
  c.emplace_back("flush_latency_hist", hist);
  return c;
}

}  // namespace sdccache
