// PluginSink: plugin writes for the flusher, within the plugin's abilities.
#include "plugin_sink.h"

#include <algorithm>
#include <cerrno>
#include <vector>

namespace sdccache {

// nbdkit rejects data requests over 32 MiB.
static constexpr uint32_t kNbdkitMaxRequest = 32u << 20;

PluginSink::PluginSink(nbdkit_next* next, PluginGate* gate) : next_(next), gate_(gate) {
  GateHold g(gate_);
  can_fua_ = next_->can_fua(next_);
  can_zero_ = next_->can_zero(next_);
  can_flush_ = next_->can_flush(next_) == 1;
  can_trim_ = next_->can_trim(next_) == 1;
  multi_conn_ = next_->can_multi_conn(next_) == 1;
  uint32_t minimum = 0, preferred = 0, maximum = 0;
  max_write_ = kNbdkitMaxRequest;
  if (next_->block_size(next_, &minimum, &preferred, &maximum) == 0 && maximum > 0 &&
      maximum != 0xffffffff)
    max_write_ = std::min(max_write_, maximum);
}

int PluginSink::FuaFallback(bool fua) { return fua && can_fua_ == NBDKIT_FUA_NONE ? Flush() : 0; }

int PluginSink::Write(const void* buf, uint32_t count, uint64_t offset, bool fua) {
  int err = 0;
  const uint32_t flags = fua && can_fua_ != NBDKIT_FUA_NONE ? NBDKIT_FLAG_FUA : 0;
  {
    GateHold g(gate_);
    if (next_->pwrite(next_, buf, count, offset, flags, &err) == -1) return err ? err : EIO;
  }
  return FuaFallback(fua);
}

int PluginSink::Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) {
  if (can_zero_ == NBDKIT_ZERO_NONE) {
    // Write real zero blocks, within the plugin's request limit.
    const uint32_t step = std::min<uint32_t>(max_write_, 1u << 20);
    std::vector<char> zeroes(std::min(step, count));
    for (uint32_t done = 0; done < count;) {
      uint32_t n = std::min<uint32_t>(step, count - done);
      if (int err = Write(zeroes.data(), n, offset + done, false)) return err;
      done += n;
    }
    return fua ? Flush() : 0;
  }
  int err = 0;
  uint32_t flags = may_trim ? NBDKIT_FLAG_MAY_TRIM : 0;
  if (fua && can_fua_ != NBDKIT_FUA_NONE) flags |= NBDKIT_FLAG_FUA;
  {
    GateHold g(gate_);
    if (next_->zero(next_, count, offset, flags, &err) == -1) return err ? err : EIO;
  }
  return FuaFallback(fua);
}

int PluginSink::Trim(uint32_t count, uint64_t offset, bool fua) {
  if (!can_trim_) return fua ? Flush() : 0;
  int err = 0;
  const uint32_t flags = fua && can_fua_ != NBDKIT_FUA_NONE ? NBDKIT_FLAG_FUA : 0;
  {
    GateHold g(gate_);
    if (next_->trim(next_, count, offset, flags, &err) == -1) return err ? err : EIO;
  }
  return FuaFallback(fua);
}

int PluginSink::Flush() {
  if (!can_flush_) return 0;
  int err = 0;
  GateHold g(gate_);
  if (next_->flush(next_, 0, &err) == -1) return err ? err : EIO;
  return 0;
}

}  // namespace sdccache
