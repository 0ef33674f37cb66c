// BatchWriter: coalescing and parallel plugin requests for one batch.
#include "batch_writer.h"

#include <algorithm>
#include <cstring>
#include <ctime>

namespace sdccache {

BatchWriter::BatchWriter(Sink* sink, unsigned threads, uint32_t max_write)
    : sink_(sink), max_write_(std::max<uint32_t>(max_write, 1)) {
  // The calling (flusher) thread is one of the writers.
  for (unsigned i = 1; i < threads; ++i) workers_.push_back(std::make_unique<Worker>());
  for (auto& w : workers_) w->thread = std::thread([this, w = w.get()] { WorkerLoop(w); });
}

BatchWriter::~BatchWriter() {
  stopping_.store(true);
  for (auto& w : workers_) w->go.release();
  for (auto& w : workers_) w->thread.join();
}

int BatchWriter::Write(const std::vector<DirtyRange>& plan, std::vector<char>* written,
                       uint64_t* plugin_writes) {
  written->assign(plan.size(), 0);
  ops_.clear();
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
    ops_.push_back({i, j});
    i = j;
  }
  plan_ = &plan;
  written_ = written;
  next_op_.store(0);
  error_.store(0);
  calls_.store(0);
  // How to run the batch depends on what the plugin's requests do.  One
  // that mostly waits (a remote or delayed plugin) is latency-bound: the
  // batch gets one request in flight per op (up to the pool).  One that
  // mostly computes (copying into a local page cache) is CPU-bound: more
  // threads only contend for the same cores and file locks, so the batch
  // runs on this thread alone.  To tell, the first request of a batch runs
  // alone, timed by the wall clock and by this thread's CPU clock: in every
  // batch while CPU-bound (it costs nothing then), and in every
  // kProbeEvery-th batch while latency-bound (where waiting for one request
  // before starting the others costs one request's latency).
  const bool probe = !ops_.empty() && (wait_frac_ < kLatencyBound || batches_ % kProbeEvery == 0);
  ++batches_;
  if (probe) {
    const double wall0 = NowUs(CLOCK_MONOTONIC), cpu0 = NowUs(CLOCK_THREAD_CPUTIME_ID);
    next_op_.store(1);
    RunOne(0);
    const double wall = NowUs(CLOCK_MONOTONIC) - wall0;
    const double cpu = NowUs(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    if (wall > 0) {
      const double waiting = std::clamp(1.0 - cpu / wall, 0.0, 1.0);
      // A latency-bound plugin is probed seldom: trust each probe fully.
      wait_frac_ = wait_frac_ >= kLatencyBound ? waiting : 0.7 * wait_frac_ + 0.3 * waiting;
    }
  }
  const bool latency_bound = wait_frac_ >= kLatencyBound;
  const size_t left = ops_.size() - next_op_.load();
  const unsigned helpers =
      latency_bound && error_.load() == 0 && left > 1
          ? static_cast<unsigned>(std::min<size_t>(workers_.size(), left - 1))
          : 0;
  // Each helper is woken through its own semaphore (no herd on one lock);
  // the last one to finish wakes this thread.
  pending_.store(helpers);
  for (unsigned i = 0; i < helpers; ++i) workers_[i]->go.release();
  RunOps();
  if (helpers > 0) all_done_.acquire();
  *plugin_writes += calls_.load();
  plan_ = nullptr;
  written_ = nullptr;
  return error_.load();
}

uint8_t* BatchWriter::AcquireBounce() {
  std::unique_lock<std::mutex> l(bounce_mu_);
  if (bounce_idle_.empty() && bounce_all_.size() < kBounceBuffers) {
    // Uninitialised: every byte is written before the plugin sees it.
    bounce_all_.emplace_back(new uint8_t[max_write_]);
    return bounce_all_.back().get();
  }
  bounce_free_.wait(l, [this] { return !bounce_idle_.empty(); });
  uint8_t* buf = bounce_idle_.back();
  bounce_idle_.pop_back();
  return buf;
}

void BatchWriter::ReleaseBounce(uint8_t* buf) {
  {
    std::lock_guard<std::mutex> l(bounce_mu_);
    bounce_idle_.push_back(buf);
  }
  bounce_free_.notify_one();
}

void BatchWriter::WorkerLoop(Worker* self) {
  while (true) {
    self->go.acquire();
    if (stopping_.load()) return;
    RunOps();
    if (pending_.fetch_sub(1) == 1) all_done_.release();
  }
}

void BatchWriter::RunOps() {
  while (error_.load(std::memory_order_relaxed) == 0) {
    const size_t i = next_op_.fetch_add(1);
    if (i >= ops_.size()) return;
    RunOne(i);
  }
}

void BatchWriter::RunOne(size_t i) {
  const Op& op = ops_[i];
  if (int err = RunOp(op)) {
    int expected = 0;
    error_.compare_exchange_strong(expected, err);
    return;
  }
  for (size_t k = op.first; k < op.last; ++k) (*written_)[k] = 1;
}

double BatchWriter::NowUs(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

int BatchWriter::RunOp(const Op& op) {
  const std::vector<DirtyRange>& plan = *plan_;
  const DirtyRange& r = plan[op.first];
  if (r.kind != RangeKind::kData) {
    calls_.fetch_add(1, std::memory_order_relaxed);
    return r.kind == RangeKind::kZero
               ? sink_->Zero(static_cast<uint32_t>(r.length), r.offset, r.may_trim, false)
               : sink_->Trim(static_cast<uint32_t>(r.length), r.offset, false);
  }
  if (op.last == op.first + 1) {  // one range: no copy; split if over the cap
    for (uint64_t done = 0; done < r.length; done += max_write_) {
      const uint64_t n = std::min(max_write_, r.length - done);
      calls_.fetch_add(1, std::memory_order_relaxed);
      if (int err = sink_->Write(r.bytes() + done, static_cast<uint32_t>(n), r.offset + done, false))
        return err;
    }
    return 0;
  }
  const uint64_t run = plan[op.last - 1].end() - r.offset;
  uint8_t* joined = AcquireBounce();
  for (size_t k = op.first; k < op.last; ++k)
    std::memcpy(joined + (plan[k].offset - r.offset), plan[k].bytes(), plan[k].length);
  calls_.fetch_add(1, std::memory_order_relaxed);
  const int err = sink_->Write(joined, static_cast<uint32_t>(run), r.offset, false);
  ReleaseBounce(joined);
  return err;
}

}  // namespace sdccache
