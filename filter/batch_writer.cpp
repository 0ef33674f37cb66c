// BatchWriter: coalescing and parallel plugin requests for one batch.
#include "batch_writer.h"

#include <algorithm>
#include <cstring>

namespace sdccache {

BatchWriter::BatchWriter(Sink* sink, unsigned threads, uint32_t max_write)
    : sink_(sink), max_write_(std::max<uint32_t>(max_write, 1)) {
  // The calling (flusher) thread is one of the writers.
  for (unsigned i = 1; i < threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

BatchWriter::~BatchWriter() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stopping_ = true;
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

int BatchWriter::Write(const std::vector<DirtyRange>& plan, std::vector<char>* written,
                       uint64_t* plugin_writes) {
  written->assign(plan.size(), 0);
  ops_.clear();
  for (size_t i = 0; i < plan.size();) {
    size_t j = i + 1;
    if (plan[i].kind == RangeKind::kData) {
      uint64_t run = plan[i].length;
      while (j < plan.size() && plan[j].kind == RangeKind::kData &&
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
  // Wake enough workers to keep several requests in flight without waking
  // all of them for a small batch.
  const unsigned helpers =
      std::min<size_t>(workers_.size(), ops_.size() > 1 ? (ops_.size() + 3) / 4 : 0);
  if (helpers > 0) {
    {
      std::lock_guard<std::mutex> l(mu_);
      ++job_;
      wanted_ = helpers;
    }
    wake_.notify_all();
  }
  RunOps();
  if (helpers > 0) {
    std::unique_lock<std::mutex> l(mu_);
    wanted_ = 0;  // latecomers skip this batch
    idle_.wait(l, [this] { return busy_ == 0; });
  }
  *plugin_writes += calls_.load();
  plan_ = nullptr;
  written_ = nullptr;
  return error_.load();
}

void BatchWriter::WorkerLoop() {
  std::unique_lock<std::mutex> l(mu_);
  uint64_t seen = job_;
  while (true) {
    wake_.wait(l, [&] { return stopping_ || (job_ != seen && wanted_ > 0); });
    if (stopping_) return;
    seen = job_;
    --wanted_;
    ++busy_;
    l.unlock();
    RunOps();
    l.lock();
    if (--busy_ == 0) idle_.notify_all();
  }
}

void BatchWriter::RunOps() {
  std::vector<uint8_t> scratch;
  while (error_.load(std::memory_order_relaxed) == 0) {
    const size_t i = next_op_.fetch_add(1);
    if (i >= ops_.size()) return;
    const Op& op = ops_[i];
    if (int err = RunOp(op, &scratch)) {
      int expected = 0;
      error_.compare_exchange_strong(expected, err);
      return;
    }
    for (size_t k = op.first; k < op.last; ++k) (*written_)[k] = 1;
  }
}

int BatchWriter::RunOp(const Op& op, std::vector<uint8_t>* scratch) {
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
  scratch->resize(run);
  for (size_t k = op.first; k < op.last; ++k)
    std::memcpy(scratch->data() + (plan[k].offset - r.offset), plan[k].bytes(), plan[k].length);
  calls_.fetch_add(1, std::memory_order_relaxed);
  return sink_->Write(scratch->data(), static_cast<uint32_t>(run), r.offset, false);
}

}  // namespace sdccache
