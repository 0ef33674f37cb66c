// PluginSink: plugin writes for the flusher, within the plugin's abilities.
#include "plugin_sink.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

namespace sdccache {

// The largest request made to a plugin that states no maximum: what NBD
// clients send at most (libnbd, qemu), half of nbdkit 1.32's own limit.
static constexpr uint32_t kNbdkitMaxRequest = 32u << 20;

PluginSink::Answers PluginSink::Ask(nbdkit_next* next, PluginGate* gate) {
  // A context is attached in .prepare, before the handshake has asked its
  // size, and the flusher may write through it at once (what an export
  // left holding), so everything nbdkit checks a data call against is
  // asked here: a data call on a context of unknown size aborts nbdkit.
  GateHold g(gate);
  const int64_t size = next->get_size(next);
  if (size == -1) throw std::runtime_error("the plugin could not tell the export's size");
  Answers a{};
  a.size = static_cast<uint64_t>(size);
  a.can_fua = next->can_fua(next);
  a.can_zero = next->can_zero(next);
  a.can_fast_zero = next->can_fast_zero(next) == 1;
  a.can_flush = next->can_flush(next) == 1;
  a.can_trim = next->can_trim(next) == 1;
  a.multi_conn = next->can_multi_conn(next) == 1;
  uint32_t minimum = 0, preferred = 0, maximum = 0;
  a.max_write = kNbdkitMaxRequest;
  a.min_block = 1;
  if (next->block_size(next, &minimum, &preferred, &maximum) == 0) {
    if (maximum > 0 && maximum != 0xffffffff) a.max_write = std::min(a.max_write, maximum);
    // A power of 2, as NBD requires (nbdkit checks a plugin's).
    if (minimum > 1 && std::has_single_bit(minimum)) a.min_block = minimum;
  }
  // Pieces of a larger request start where the one before ends: a maximum
  // that is no multiple of the minimum (nbdkit 1.32's blocksize-policy
  // filter allows one) would start the second one unaligned.
  a.max_write = std::max(a.min_block, a.max_write / a.min_block * a.min_block);
  return a;
}

PluginSink::PluginSink(nbdkit_next* first, const Answers& answers, PluginGate* gate)
    : gate_(gate),
      can_fua_(answers.can_fua),
      can_zero_(answers.can_zero),
      can_fast_zero_(answers.can_fast_zero),
      can_flush_(answers.can_flush),
      can_trim_(answers.can_trim),
      multi_conn_(answers.multi_conn),
      max_write_(answers.max_write),
      min_block_(answers.min_block) {
  Attach(first, answers);
}

void PluginSink::Attach(nbdkit_next* next, const Answers& answers) {
  // Background calls use any attached context as the first one's answers
  // allow, and nbdkit aborts on a FUA, zero, trim or flush call to a
  // context whose plugin said it cannot do it.
  const char* lacks = nullptr;
  if (can_fua_ != NBDKIT_FUA_NONE && answers.can_fua == NBDKIT_FUA_NONE)
    lacks = "FUA";
  else if (can_zero_ != NBDKIT_ZERO_NONE && answers.can_zero == NBDKIT_ZERO_NONE)
    lacks = "zero";
  else if (can_trim_ && !answers.can_trim)
    lacks = "trim";
  else if (can_flush_ && !answers.can_flush)
    lacks = "flush";
  else if (multi_conn_ && !answers.multi_conn)
    lacks = "multi-conn";
  if (lacks)
    throw std::runtime_error(std::string("the plugin says this connection cannot ") + lacks +
                             ", which the first connection to the export could; the filter "
                             "writes any connection's data through any of them");
  std::lock_guard<std::mutex> l(mu_);
  contexts_.push_back(Slot{next, answers.size});
}

PluginSink::Slot* PluginSink::FindLocked(nbdkit_next* next) {
  for (Slot& c : contexts_)
    if (c.next == next) return &c;
  return nullptr;
}

PluginSink::Slot* PluginSink::PickLocked(uint64_t end) {
  if (caller_ != nullptr)
    for (Slot& c : contexts_)
      if (c.next == caller_ && !c.leaving && c.size >= end) {
        Slot* instead = OwnLeftForLocked(c, end);
        return instead ? instead : &c;
      }
  for (Slot& c : contexts_)
    if (!c.leaving && c.size >= end && c.failed_at == 0) return &c;
  // All failing: the one that failed longest ago, so that one that failed
  // once is tried again rather than the same dead one every time.
  Slot* best = nullptr;
  for (Slot& c : contexts_)
    if (!c.leaving && c.size >= end && (best == nullptr || c.failed_at < best->failed_at))
      best = &c;
  if (best) return best;
  for (Slot& c : contexts_)
    if (!c.leaving) return &c;
  return contexts_.empty() ? nullptr : &contexts_.front();
}

PluginSink::Slot* PluginSink::OwnLeftForLocked(const Slot& own, uint64_t end) {
  if (!own.flush_lost && !(multi_conn_ && own.failed_at != 0)) return nullptr;
  Slot* best = nullptr;
  for (Slot& o : contexts_)
    if (&o != &own && !o.leaving && o.size >= end && o.failed_at == 0 &&
        o.succeeded_at > own.failed_at && (best == nullptr || o.succeeded_at > best->succeeded_at))
      best = &o;
  return best;
}

bool PluginSink::OthersStayLocked(nbdkit_next* next, uint64_t end) {
  for (const Slot& c : contexts_)
    if (c.next != next && !c.leaving && c.size >= end) return true;
  return false;
}

bool PluginSink::Failing(nbdkit_next* next) {
  std::lock_guard<std::mutex> l(mu_);
  const Slot* self = FindLocked(next);
  return self != nullptr && self->failed_at != 0;
}

bool PluginSink::OnlyOneNotFailing(nbdkit_next* next, uint64_t end) {
  std::lock_guard<std::mutex> l(mu_);
  const Slot* self = FindLocked(next);
  if (self == nullptr || self->leaving || self->failed_at != 0 || self->size < end) return false;
  bool others = false;
  for (const Slot& c : contexts_) {
    if (c.next == next || c.leaving || c.size < end) continue;
    if (c.failed_at == 0) return false;
    others = true;
  }
  return others;
}

bool PluginSink::Detach(nbdkit_next* next, bool unless_last, int* flush_err,
                        uint64_t buffered_end) {
  std::unique_lock<std::mutex> l(mu_);
  if (FindLocked(next) == nullptr) return true;
  // "Last" means no other context stays that can write what is buffered:
  // when several leave at once, at least one of them is told so and writes
  // it.  (A context that saw the export smaller than the data, the image
  // having grown since it opened, cannot: the writes fail with ENOSPC.)
  if (unless_last && !OthersStayLocked(next, buffered_end)) return false;
  FindLocked(next)->leaving = true;  // new calls go elsewhere
  auto idle = [&] { return FindLocked(next)->in_flight == 0; };
  idle_.wait(l, idle);
  if (unless_last && !OthersStayLocked(next, buffered_end)) {
    FindLocked(next)->leaving = false;
    return false;
  }
  // Without multi-conn, a plugin flush covers only its own context's
  // writes: flush the ones made through this context, while it is still in
  // the pool (so that a concurrent Flush finds it too, and waits for it).
  // With multi-conn, a flush through any context covers them, but only
  // while this one is open for some layers: nbdkit's multi-conn filter
  // (multi-conn-mode=emulate) forgets a closed connection's writes, and
  // its flushes then reach no plugin connection.  So writes through this
  // context (the flusher's, say, of another client's data) that no flush
  // has covered yet are flushed here too: a flush, not more, and only when
  // a client left before flushing.
  int failed_with = 0;
  while (can_flush_) {
    Slot* slot = FindLocked(next);
    if (!UnflushedLocked(*slot)) break;
    l.unlock();
    const int err = FlushOne(next);  // only this Detach removes `next`
    l.lock();
    if (err) {
      if (flush_err) *flush_err = err;
      failed_with = err;
      break;
    }
  }
  idle_.wait(l, idle);  // a concurrent Flush may still use it
  Slot* slot = FindLocked(next);
  // Writes through it that no flush covers (its flush failed): the next
  // Flush fails, so that the engine writes them again elsewhere (without
  // multi-conn; with it, their batches are gone, and the failure is
  // reported: a later flush through another context may not cover them).
  if (can_flush_ && UnflushedLocked(*slot)) CountLossLocked(failed_with);
  contexts_.erase(contexts_.begin() + (slot - contexts_.data()));
  return true;
}

bool PluginSink::UnflushedLocked(const Slot& slot) const {
  return multi_conn_ ? slot.last_write_tick > all_flushed_ticks_ : slot.written != slot.flushed;
}

uint64_t PluginSink::losses() {
  std::lock_guard<std::mutex> l(mu_);
  return lost_;
}

void PluginSink::LossesTold(uint64_t n) {
  std::lock_guard<std::mutex> l(mu_);
  lost_reported_ = std::max(lost_reported_, std::min(n, lost_));
}

int PluginSink::loss_error() {
  std::lock_guard<std::mutex> l(mu_);
  return lost_err_;
}

// The error a flush reporting the loss returns: the plugin's, as for any
// failed write-back (a flush that failed without one, or only because
// nbdkit aborted a wait of a leaving client's thread, is reported as EIO).
void PluginSink::CountLossLocked(int err) {
  ++lost_;
  lost_err_ = err == 0 || err == ESHUTDOWN || err == ENOTCONN ? EIO : err;
}

size_t PluginSink::attached() {
  std::lock_guard<std::mutex> l(mu_);
  return contexts_.size();
}

size_t PluginSink::detaching() {
  std::lock_guard<std::mutex> l(mu_);
  // A context is marked leaving under the same hold of mu_ that starts its
  // Detach's wait, so a leaving context is one whose Detach has begun.
  return static_cast<size_t>(
      std::count_if(contexts_.begin(), contexts_.end(), [](const Slot& c) { return c.leaving; }));
}

int PluginGate::waiting() {
  std::lock_guard<std::mutex> l(turn_mu_);
  return waiting_[kWrite] + waiting_[kFlush] + waiting_[kFua];
}

void PluginGate::TakeTurn(Turn t) {
  std::unique_lock<std::mutex> l(turn_mu_);
  auto free = [&]() {
    switch (t) {
      case kWrite:
        return running_[kFlush] + running_[kFua] + waiting_[kFlush] + waiting_[kFua] == 0;
      case kFlush:
        return running_[kWrite] + running_[kFua] + waiting_[kFua] == 0;
      case kFua:
        break;
    }
    return running_[kWrite] + running_[kFlush] + running_[kFua] == 0;
  };
  if (!free()) {
    ++waiting_[t];
    turn_cv_.wait(l, free);
    --waiting_[t];
  }
  ++running_[t];
}

void PluginGate::EndTurn(Turn t) {
  {
    std::lock_guard<std::mutex> l(turn_mu_);
    --running_[t];
  }
  turn_cv_.notify_all();
}

PluginSink::Lease::Lease(PluginSink* sink, Turn turn, nbdkit_next* which, uint64_t end)
    : sink_(sink), next_(nullptr), turn_(turn) {
  sink_->gate_->TakeTurn(turn);  // first: the context is picked as things are then
  std::lock_guard<std::mutex> l(sink_->mu_);
  Slot* c = which ? sink_->FindLocked(which) : sink_->PickLocked(end);
  // A write never goes to a leaving context: its Detach may already have
  // flushed it for the last time.  (It fails with ENOTCONN and stays
  // buffered, as when no context is attached.)
  if (c == nullptr || (write() && c->leaving)) {
    sink_->gate_->EndTurn(turn);
    return;
  }
  ++c->in_flight;
  next_ = c->next;
  size_ = c->size;
  written_at_start_ = c->written;
  write_ticks_at_start_ = sink_->write_ticks_;
}

void PluginSink::Lease::Flushed() {
  std::lock_guard<std::mutex> l(sink_->mu_);
  Slot* c = sink_->FindLocked(next_);
  c->flushed = std::max(c->flushed, written_at_start_);
  sink_->all_flushed_ticks_ = std::max(sink_->all_flushed_ticks_, write_ticks_at_start_);
}

void PluginSink::Lease::Outcome(bool failed, bool durable) {
  outcome_ = failed ? kFailed : kSucceeded;
  durable_ = !failed && durable;
}

void PluginSink::Lease::Lost(int err) {
  std::lock_guard<std::mutex> l(sink_->mu_);
  Slot* c = sink_->FindLocked(next_);
  c->flush_lost = true;
  if (c->flushed >= written_at_start_) return;  // nothing was left uncovered
  c->flushed = written_at_start_;
  sink_->CountLossLocked(err);
}

PluginSink::Lease::~Lease() {
  if (next_ == nullptr) return;
  {
    std::lock_guard<std::mutex> l(sink_->mu_);
    Slot* c = sink_->FindLocked(next_);
    --c->in_flight;
    if (write()) ++c->written;
    // With multi-conn, only a write that succeeded without FUA needs a
    // flush: a failed one stays buffered (a leaving context that carried
    // only those failed its flush too, when the plugin's connection was
    // dead, and reported a loss), and one made with FUA is durable (a
    // client that writes only so, qemu's cache=writethrough, made its
    // context flush as it left).
    if (write() && outcome_ == kSucceeded && !durable_) c->last_write_tick = ++sink_->write_ticks_;
    // The call's outcome, under this one hold of mu_ rather than one more
    // per plugin call.
    if (outcome_ == kFailed) {
      c->failed_at = ++sink_->outcomes_;
    } else if (outcome_ == kSucceeded) {
      c->failed_at = 0;
      c->succeeded_at = ++sink_->outcomes_;
      c->flush_lost = false;
    }
  }
  sink_->gate_->EndTurn(turn_);
  sink_->idle_.notify_all();
}

int PluginSink::FuaFallback(bool fua) { return fua && can_fua_ == NBDKIT_FUA_NONE ? Flush() : 0; }

template <typename Call>
int PluginSink::DataCall(uint64_t offset, uint32_t count, uint32_t flags, bool fua, Call call) {
  // A plugin that cannot flush but takes FUA: a later Flush() cannot make
  // this call durable, so every call carries FUA.
  if ((fua || !can_flush_) && can_fua_ != NBDKIT_FUA_NONE) flags |= NBDKIT_FLAG_FUA;
  {
    int err = 0;
    // FUA the engine asked for (not only added because the plugin cannot
    // flush, which no layer below then emulates with a flush): nbdkit
    // emulates it with a flush for a layer below that says so.
    Lease lease(this, fua && (flags & NBDKIT_FLAG_FUA) ? PluginGate::kFua : PluginGate::kWrite,
                nullptr, offset + count);
    nbdkit_next* next = lease.get();
    if (next == nullptr) return ENOTCONN;
    if (!lease.Holds(offset, count)) return ENOSPC;
    int r;
    {
      GateHold g(gate_);
      r = call(next, flags, &err);
    }
    lease.Outcome(r == -1, (flags & NBDKIT_FLAG_FUA) != 0);
    if (r == -1) return err ? err : EIO;
  }
  return FuaFallback(fua);
}

int PluginSink::Write(const void* buf, uint32_t count, uint64_t offset, bool fua) {
  return DataCall(offset, count, 0, fua, [&](nbdkit_next* next, uint32_t flags, int* err) {
    return next->pwrite(next, buf, count, offset, flags, err);
  });
}

int PluginSink::Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) {
  if (can_zero_ == NBDKIT_ZERO_NONE) {
    // Write real zero blocks, within the plugin's request limit.
    const uint32_t step = ZeroStep();
    std::vector<char> zeroes;
    try {
      zeroes.resize(std::min(step, count));
    } catch (const std::bad_alloc&) {  // the engine tries again later
      return ENOMEM;
    }
    for (uint32_t done = 0; done < count;) {
      uint32_t n = std::min<uint32_t>(step, count - done);
      if (int err = Write(zeroes.data(), n, offset + done, false)) return err;
      done += n;
    }
    return fua ? Flush() : 0;
  }
  return DataCall(offset, count, may_trim ? NBDKIT_FLAG_MAY_TRIM : 0, fua,
                  [&](nbdkit_next* next, uint32_t flags, int* err) {
                    return next->zero(next, count, offset, flags, err);
                  });
}

int PluginSink::Trim(uint32_t count, uint64_t offset, bool fua) {
  if (!can_trim_) return fua ? Flush() : 0;
  return DataCall(offset, count, 0, fua, [&](nbdkit_next* next, uint32_t flags, int* err) {
    return next->trim(next, count, offset, flags, err);
  });
}

int PluginSink::FlushOne(nbdkit_next* which) {
  int err = 0;
  Lease lease(this, PluginGate::kFlush, which);
  nbdkit_next* next = lease.get();
  // `which` left: its Detach flushed it, or counted it in lost_ (see Flush).
  if (next == nullptr) return which ? 0 : ENOTCONN;
  int r;
  {
    GateHold g(gate_);
    r = next->flush(next, 0, &err);
  }
  lease.Outcome(r == -1);
  if (r == -1) {
    // Without multi-conn: what went through `which` that no flush covers
    // cannot be counted on.  Counted as lost, as when a context leaves so
    // (Detach): this Flush fails, the engine writes the batches again (the
    // flusher through another context, PickLocked), and the next Flush
    // need not reach `which`, which may fail for good.
    if (which != nullptr && !multi_conn_) lease.Lost(err);
    return err ? err : EIO;
  }
  lease.Flushed();
  return 0;
}

int PluginSink::Flush() {
  if (!can_flush_) return 0;
  // Without multi-conn: each context with writes that no flush through it
  // has covered yet.  With it, any one covers them all.
  std::vector<nbdkit_next*> dirty;
  uint64_t lost_at_start;
  {
    std::lock_guard<std::mutex> l(mu_);
    lost_at_start = lost_;
    try {
      if (!multi_conn_)
        for (const Slot& c : contexts_)
          if (c.written != c.flushed) dirty.push_back(c.next);
    } catch (const std::bad_alloc&) {  // the engine tries again later
      return ENOMEM;
    }
  }
  int first = 0;
  if (dirty.empty()) first = FlushOne(nullptr);
  for (nbdkit_next* next : dirty)
    if (int err = FlushOne(next); err && !first) first = err;
  // A context left with writes its last flush did not cover: report it to
  // every Flush running meanwhile and to the next one, so that the engine
  // keeps the batch and writes it again.
  std::lock_guard<std::mutex> l(mu_);
  if (lost_ != lost_at_start || lost_ != lost_reported_) {
    lost_reported_ = lost_;
    if (!first) first = lost_err_;
  }
  return first;
}

}  // namespace sdccache
