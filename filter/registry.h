// Registry: one WriteBack per export, written through the plugin contexts
// of that export's own connections, so data never lands in another export.  Also the parameters and
// runtime settings shared by the callbacks, the stats file and the control
// socket.
//
// Thread safety: all methods may be called from any thread; the export map
// is guarded by mu_.  Caches (and their counters) live until Close(), from
// .cleanup; the threads of an export no writer is connected to are stopped
// (WriteBack::Park) until one connects again.
#pragma once

#include <nbdkit-filter.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "counters.h"
#include "params.h"
#include "plugin_sink.h"
#include "writeback.h"

// -D sdccache.verbose=1: log every batch.
extern "C" int sdccache_debug_verbose;

namespace sdccache {

class StatsFile;

struct ExportCache {
  std::string name;
  std::unique_ptr<PluginSink> sink;
  std::unique_ptr<WriteBack> writeback;
  // The last disconnects' retries (Registry::RetryLimit): until when, and
  // for which data (WriteBack::acknowledged() then; none yet: UINT64_MAX).
  std::mutex retry_mu;
  std::chrono::steady_clock::time_point retry_until;  // guarded by retry_mu
  uint64_t retry_for = UINT64_MAX;                    // guarded by retry_mu
};

class Registry {
 public:
  explicit Registry(const Params& params) : params_(params) {}

  // Finds the export's cache.  With a writable connection's context
  // `writer`, creates the cache if needed and attaches the context to it.
  ExportCache* Get(const std::string& name, nbdkit_next* writer);
  // Finds the export's cache without creating it; null if there is none.
  ExportCache* Find(const std::string& name);
  // Called from .finalize of a writable connection: makes what it wrote
  // durable, and when it is the export's last connection, everything
  // buffered (retrying up to shutdown-timeout); then detaches its context,
  // and if no writer is left, stops the export's threads (Get with the
  // next writer starts them again).  `client_stays`, if given, says
  // whether a filter above is reopening the connection after a failed
  // request (nbdkit-retry-filter), the client still connected, and a new
  // context of the same connection comes next.  Then the last connection
  // makes one attempt, not retries up to shutdown-timeout, and leaves the
  // rest buffered.
  int Leave(ExportCache* cache, nbdkit_next* writer, bool wrote,
            const std::function<bool()>& client_stays = {});
  std::vector<ExportCache*> All();

  // Control: applied to existing and future caches.
  void Pause(bool on);
  void SetThreshold(uint32_t n);
  int FlushAll(Trigger why);  // 0 or the first errno

  // Counters of every export (keys prefixed "EXPORT." when there are several).
  CounterList Stats();
  // An export name as it appears in counter keys (NAME.key): bytes other
  // than letters, digits and -_./+@,= become %XX.
  static std::string KeyPart(const std::string& name);
  std::string Summary();  // the one-line export description suffix

  // Stops every flusher; logs what could not be written (all connections
  // have left, so nothing more can be).  Counters stay readable until Close().
  void Drain();
  void Close();

  // Where batches are announced (set once, before any connection).
  void SetStatsFile(StatsFile* f) { stats_file_ = f; }

  PluginGate* gate() { return &gate_; }
  const Params& params() const { return params_; }

 private:
  // How long a last disconnect retries write-back: shutdown-timeout, but
  // shared by the last disconnects that come while nothing new has been
  // acknowledged (what is left of it; at least one attempt).
  std::chrono::milliseconds RetryLimit(ExportCache* cache);

  const Params params_;
  PluginGate gate_;
  StatsFile* stats_file_ = nullptr;
  std::mutex mu_;
  std::map<std::string, std::unique_ptr<ExportCache>> exports_;  // guarded by mu_
  // Whether exports_ ever held a cache: lets read-only connections skip
  // the lock while no writer has connected (e.g. nbdkit -r).
  std::atomic<bool> any_export_{false};
  bool paused_ = false;                                           // guarded by mu_
  uint32_t threshold_override_ = 0;                               // guarded by mu_
};

}  // namespace sdccache
