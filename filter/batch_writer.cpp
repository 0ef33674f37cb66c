// BatchWriter: coalescing and parallel plugin requests for one batch.
#include "batch_writer.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <exception>
#include <new>

#include <sys/resource.h>

namespace sdccache {

BatchWriter::BatchWriter(Sink* sink, unsigned threads, uint32_t max_write)
    : sink_(sink),
      max_write_(std::max<uint32_t>(max_write, 1)),
      // The calling thread of each batch is one of its writers.
      max_helpers_(threads > 1 ? threads - 1 : 0) {
  workers_.reserve(max_helpers_);
  idle_.reserve(max_helpers_);  // a helper going idle allocates nothing
}

BatchWriter::~BatchWriter() {
  StopHelpers();
}

void BatchWriter::StopHelpers() {
  // No Write() is running: every helper is in idle_ (a helper goes there
  // before it ends its part of a job), or about to wait for go.
  stopping_.store(true);
  std::vector<std::unique_ptr<Worker>> workers;
  {
    std::lock_guard<std::mutex> l(idle_mu_);
    workers.swap(workers_);
  }
  for (auto& w : workers) w->go.release();
  for (auto& w : workers) w->thread.join();
  workers.clear();
  std::lock_guard<std::mutex> l(idle_mu_);
  idle_.clear();
  started_ = 0;
  workers_.swap(workers);  // empty, with the capacity StartHelpers relies on
  stopping_.store(false);
}

size_t BatchWriter::helpers_started() const {
  std::lock_guard<std::mutex> l(idle_mu_);
  return workers_.size();
}

void BatchWriter::StartHelpers(Job* job, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    try {
      auto w = std::make_unique<Worker>();
      w->job = job;
      w->go.release();
      w->thread = std::thread([this, w = w.get()] { WorkerLoop(w); });
      std::lock_guard<std::mutex> l(idle_mu_);
      workers_.push_back(std::move(w));  // capacity reserved: cannot throw
    } catch (const std::exception&) {
      // Out of threads (or memory): give back this slot and the rest; a
      // later batch may try again.
      std::lock_guard<std::mutex> l(idle_mu_);
      started_ -= n - i;
      job->pending.fetch_sub(static_cast<unsigned>(n - i));  // the caller holds one
      return;
    }
  }
}

int BatchWriter::Write(const std::vector<DirtyRange>& plan, std::vector<char>* written,
                       uint64_t* plugin_writes) {
  written->assign(plan.size(), 0);
  Job job;
  job.plan = &plan;
  job.written = written;
  for (size_t i = 0; i < plan.size();) {
    size_t j = i + 1;
    // Only small ranges are joined: the copy into the bounce buffer costs
    // more than the plugin saves on ranges that are large already.
    auto joinable = [&](size_t k) {
      return plan[k].kind == RangeKind::kData && plan[k].length < kJoinBelow;
    };
    if (joinable(i)) {
      uint64_t run = plan[i].length;
      while (j < plan.size() && joinable(j) &&
             plan[j].offset == plan[j - 1].end() && run + plan[j].length <= max_write_) {
        run += plan[j].length;
        ++j;
      }
    }
    job.ops.push_back({i, j});
    i = j;
  }
  // How to run the batch depends on what the plugin's requests do.  One
  // that mostly waits (a remote or delayed plugin) is latency-bound: the
  // batch gets one request in flight per op (up to the idle helpers, and
  // helpers that finish other batches join it).  One
  // that mostly computes (copying into a local page cache) is CPU-bound:
  // more threads only contend for the same cores and file locks, so the
  // batch runs on this thread alone.  To tell, the first request of a batch
  // runs alone, timed by the wall clock and by this thread's CPU clock: in
  // every batch while CPU-bound (it costs nothing then), and in every
  // kProbeEvery-th batch while latency-bound (where waiting for one request
  // before starting the others costs one request's latency).
  bool probe;
  {
    std::lock_guard<std::mutex> l(probe_mu_);
    probe = !job.ops.empty() && (!latency_bound_ || batches_ % kProbeEvery == 0);
    ++batches_;
  }
  if (probe) {
    const Clocks start = Clocks::Now();
    job.next_op.store(1);
    RunOne(&job, 0);
    RecordProbe(start, Clocks::Now());
  }
  const bool waiting = latency_bound();
  const size_t left = job.ops.size() - std::min(job.ops.size(), job.next_op.load());
  // Borrow idle helpers; each is woken through its own semaphore (no herd
  // on one lock), and the last one to finish wakes this thread.  Short of
  // helpers, the job is listed for those that finish other jobs to join.
  // Helpers are started here, while fewer are idle than wanted, up to
  // max_helpers_.
  // Out of memory for the lists below, the batch runs without helpers.
  std::vector<Worker*> helpers;
  size_t start = 0;
  bool listed = false;
  bool borrow = waiting && !job.given_up.load() && left > 1;
  if (borrow) {
    try {
      helpers.reserve(std::min(max_helpers_, left - 1));
    } catch (const std::bad_alloc&) {
      borrow = false;
    }
  }
  if (borrow) {
    std::lock_guard<std::mutex> l(idle_mu_);
    const size_t n = std::min({idle_.size(), left - 1, helpers.capacity()});
    helpers.assign(idle_.end() - static_cast<std::ptrdiff_t>(n), idle_.end());
    idle_.resize(idle_.size() - n);
    start = std::min(left - 1 - n, max_helpers_ - started_);
    if (n + start < left - 1) {
      try {
        wanting_.push_back(&job);
        listed = true;
      } catch (const std::bad_alloc&) {
      }
    }
    started_ += start;
    job.pending.fetch_add(static_cast<unsigned>(n + start));
  }
  for (Worker* w : helpers) {
    w->job = &job;
    w->go.release();
  }
  if (start > 0) StartHelpers(&job, start);
  RunOps(&job);
  if (listed) {
    std::lock_guard<std::mutex> l(idle_mu_);
    std::erase(wanting_, &job);
  }
  if (job.pending.fetch_sub(1) != 1) job.done.acquire();
  *plugin_writes += job.calls.load();
  return job.error.load();
}

BatchWriter::Job* BatchWriter::JoinWanting() {
  while (!wanting_.empty()) {
    Job* job = wanting_.front();
    if (!job->given_up.load() && job->next_op.load() < job->ops.size()) {
      job->pending.fetch_add(1);
      return job;
    }
    wanting_.erase(wanting_.begin());  // nothing left to help with
  }
  return nullptr;
}

void BatchWriter::RecordProbe(const Clocks& start, const Clocks& end) {
  const double wall_us = end.wall_us - start.wall_us;
  if (wall_us <= 0) return;
  const double waiting = end.blocked == start.blocked
                             ? 0.0
                             : std::clamp(1.0 - (end.cpu_us - start.cpu_us) / wall_us, 0.0, 1.0);
  std::lock_guard<std::mutex> l(probe_mu_);
  if (latency_bound_) {
    // Probed seldom: trust each probe.
    latency_bound_ = waiting >= kLatencyBound;
    recent_waiting_ = 0;
    return;
  }
  // A local file's write sleeps now and then, in bursts, on the inode lock
  // or on page-cache throttling (measured: 6% of the probes of fio's 64 KiB
  // writes, each 0.3-6 ms off the CPU); more requests in flight would not
  // help those.  So a CPU-bound plugin turns latency-bound only when most
  // of its recent probes waited.
  recent_waiting_ = static_cast<uint16_t>((recent_waiting_ << 1) | (waiting >= kLatencyBound));
  if (std::popcount(recent_waiting_) >= kWaitingOf16) latency_bound_ = true;
}

int BatchWriter::WriteTimed(const void* buf, uint32_t count, uint64_t offset, bool fua) {
  // A FUA write's time includes the plugin's flush, which says nothing of
  // how its writes go: not a probe.
  if (fua || timed_writes_.fetch_add(1, std::memory_order_relaxed) % kProbeBypassEvery != 0)
    return sink_->Write(buf, count, offset, fua);
  const Clocks start = Clocks::Now();
  const int err = sink_->Write(buf, count, offset, fua);
  if (err == 0) RecordProbe(start, Clocks::Now());
  return err;
}

bool BatchWriter::latency_bound() const { return latency_bound_.load(); }

size_t BatchWriter::BounceSize(uint64_t run) const {
  const uint64_t size = std::bit_ceil(std::max<uint64_t>(run, kMinBounce));
  return static_cast<size_t>(std::min(size, std::max<uint64_t>(max_write_, run)));
}

std::unique_ptr<uint8_t[]> BatchWriter::AcquireBounce(size_t size) {
  // The budget admits at least one buffer of any size, so a caller that
  // waits only waits for buffers in use, which their holders release.
  const size_t budget = std::max(kBounceBudget, size);
  std::unique_lock<std::mutex> l(bounce_mu_);
  while (true) {
    auto same = bounce_idle_.find(size);
    if (same != bounce_idle_.end() && !same->second.empty()) {
      std::unique_ptr<uint8_t[]> buf = std::move(same->second.back());
      same->second.pop_back();
      bounce_idle_bytes_ -= size;
      return buf;
    }
    if (bounce_bytes_ + size <= budget) {
      // Uninitialised: every byte is written before the plugin sees it.
      // Charged once allocated: a charge left by a failed allocation stayed
      // for good, and eight failed 1 MiB ones filled the budget, so that
      // every later batch waited here for ever (flushes and SIGTERM hung).
      std::unique_ptr<uint8_t[]> buf(new uint8_t[size]);
      bounce_bytes_ += size;
      return buf;
    }
    // Make room by freeing an idle buffer of another size, largest first.
    auto other = std::find_if(bounce_idle_.rbegin(), bounce_idle_.rend(),
                              [](const auto& kv) { return !kv.second.empty(); });
    if (other != bounce_idle_.rend()) {
      other->second.pop_back();
      bounce_bytes_ -= other->first;
      bounce_idle_bytes_ -= other->first;
      continue;
    }
    bounce_free_.wait(l);
  }
}

void BatchWriter::ReleaseBounce(std::unique_ptr<uint8_t[]> buf, size_t size) {
  {
    std::lock_guard<std::mutex> l(bounce_mu_);
    try {
      bounce_idle_[size].push_back(std::move(buf));  // leaves buf as it was if it throws
      bounce_idle_bytes_ += size;
    } catch (const std::bad_alloc&) {
      // No memory to keep it: freed (buf, on return), and uncharged.  Its
      // charge stayed, and eight such 1 MiB ones held the whole budget.
      bounce_bytes_ -= size;
    }
  }
  bounce_free_.notify_all();  // waiters may want different sizes
}

size_t BatchWriter::coalescing_bytes() const {
  return bounce_bytes_.load();
}

bool BatchWriter::coalescing_idle() const {
  return bounce_idle_bytes_.load() > 0;
}

void BatchWriter::ReleaseIdleBuffers() {
  std::map<size_t, std::vector<std::unique_ptr<uint8_t[]>>> idle;
  {
    std::lock_guard<std::mutex> l(bounce_mu_);
    idle.swap(bounce_idle_);
    bounce_bytes_ -= bounce_idle_bytes_.exchange(0);
  }
  bounce_free_.notify_all();  // room for a waiter's size now
}  // freed here, without the lock

void BatchWriter::WorkerLoop(Worker* self) {
  while (true) {
    self->go.acquire();
    if (stopping_.load()) return;
    for (Job* job = self->job; job != nullptr;) {
      RunOps(job);
      Job* next;
      {
        std::lock_guard<std::mutex> l(idle_mu_);
        next = JoinWanting();
        if (next == nullptr) idle_.push_back(self);
      }
      // The job may end as soon as pending reaches 0: touch it no more.
      if (job->pending.fetch_sub(1) == 1) job->done.release();
      job = next;
    }
  }
}

void BatchWriter::RunOps(Job* job) {
  while (!job->given_up.load(std::memory_order_relaxed)) {
    const size_t i = job->next_op.fetch_add(1);
    if (i >= job->ops.size()) return;
    RunOne(job, i);
  }
}

void BatchWriter::RunOne(Job* job, size_t i) {
  const Op& op = job->ops[i];
  int err;
  try {
    err = RunOp(job, op);
  } catch (const std::bad_alloc&) {  // none expected (RunOp): written again later
    err = ENOMEM;
  }
  if (err) {
    int expected = 0;
    job->error.compare_exchange_strong(expected, err);
    if (job->failed_in_a_row.fetch_add(1) + 1 >= kGiveUpAfter) job->given_up.store(true);
    return;
  }
  job->failed_in_a_row.store(0, std::memory_order_relaxed);
  for (size_t k = op.first; k < op.last; ++k) (*job->written)[k] = 1;
}

namespace {
double NowUs(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}
}  // namespace

BatchWriter::Clocks BatchWriter::Clocks::Now() {
  struct rusage ru {};
  getrusage(RUSAGE_THREAD, &ru);
  return {NowUs(CLOCK_MONOTONIC), NowUs(CLOCK_THREAD_CPUTIME_ID), ru.ru_nvcsw};
}

int BatchWriter::RunOp(Job* job, const Op& op) {
  const std::vector<DirtyRange>& plan = *job->plan;
  const DirtyRange& r = plan[op.first];
  if (r.kind != RangeKind::kData) {
    job->calls.fetch_add(r.kind == RangeKind::kZero
                             ? sink_->ZeroCalls(static_cast<uint32_t>(r.length))
                             : sink_->TrimCalls(),
                         std::memory_order_relaxed);
    return r.kind == RangeKind::kZero
               ? sink_->Zero(static_cast<uint32_t>(r.length), r.offset, r.may_trim, false)
               : sink_->Trim(static_cast<uint32_t>(r.length), r.offset, false);
  }
  if (op.last == op.first + 1) {  // one range: no copy; split if over the cap
    uint64_t calls = 0;
    const int err = WriteInPieces(sink_, r.bytes(), r.length, r.offset, max_write_, &calls);
    job->calls.fetch_add(calls, std::memory_order_relaxed);
    return err;
  }
  const uint64_t run = plan[op.last - 1].end() - r.offset;
  const size_t size = BounceSize(run);
  std::unique_ptr<uint8_t[]> joined;
  try {
    joined = AcquireBounce(size);
  } catch (const std::bad_alloc&) {
    // No memory for the copy: the ranges one by one, from their chunks
    // (each within max_write_, as the run is), which takes none.  When the
    // queue itself has used up the memory, the copy's 1 MiB would fail on
    // every retry, and nothing would ever be written.
    for (size_t k = op.first; k < op.last; ++k) {
      job->calls.fetch_add(1, std::memory_order_relaxed);
      if (int err = sink_->Write(plan[k].bytes(), static_cast<uint32_t>(plan[k].length),
                                 plan[k].offset, false))
        return err;
    }
    return 0;
  }
  for (size_t k = op.first; k < op.last; ++k)
    std::memcpy(joined.get() + (plan[k].offset - r.offset), plan[k].bytes(), plan[k].length);
  job->calls.fetch_add(1, std::memory_order_relaxed);
  const int err = sink_->Write(joined.get(), static_cast<uint32_t>(run), r.offset, false);
  ReleaseBounce(std::move(joined), size);
  return err;
}

}  // namespace sdccache
