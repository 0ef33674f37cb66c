// PluginSink: the engine's Sink over an nbdkit plugin context.
//
// It does what the plugin allows: FUA becomes a plugin flush when the
// plugin has no FUA, zeroes become written zero blocks when it cannot zero,
// trims are dropped when it cannot trim (a trim is only advisory), and a flush
// is a no-op when it cannot flush.
//
// PluginGate serialises every call the filter makes into the plugin when the
// final thread model is not parallel, so the flusher never runs beside a
// client request.
#pragma once

#include <mutex>

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

 private:
  bool on_ = false;
  std::mutex mu_;
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
  // Queries the context's capabilities; the context must be prepared.
  PluginSink(nbdkit_next* next, PluginGate* gate);

  int Write(const void* buf, uint32_t count, uint64_t offset, bool fua) override;
  int Zero(uint32_t count, uint64_t offset, bool may_trim, bool fua) override;
  int Trim(uint32_t count, uint64_t offset, bool fua) override;
  int Flush() override;

  bool multi_conn() const { return multi_conn_; }
  uint32_t max_write() const { return max_write_; }

 private:
  int FuaFallback(bool fua);

  nbdkit_next* const next_;
  PluginGate* const gate_;
  int can_fua_, can_zero_;
  bool can_flush_, can_trim_, multi_conn_;
  uint32_t max_write_;
};

}  // namespace sdccache
