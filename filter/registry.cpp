// Registry: per-export caches, control actions and shutdown reporting.
#include "registry.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <optional>

#include "statsfile.h"

namespace sdccache {

static constexpr uint32_t kMaxCoalesce = 1u << 20;

static void OnBatch(void* opaque, Trigger why, uint64_t requests, uint64_t bytes,
                    uint64_t plugin_writes, uint64_t us, int err) {
  auto* stats = static_cast<StatsFile*>(opaque);
  if (sdccache_debug_verbose)
    nbdkit_debug("sdccache: batch trigger=%s requests=%llu bytes=%llu plugin_writes=%llu "
                 "duration_us=%llu result=%s",
                 TriggerName(why), static_cast<unsigned long long>(requests),
                 static_cast<unsigned long long>(bytes),
                 static_cast<unsigned long long>(plugin_writes),
                 static_cast<unsigned long long>(us), err ? std::strerror(err) : "ok");
  if (stats) stats->Kick();
}

ExportCache* Registry::Get(const std::string& name, nbdkit_next* writer) {
  // Asked before taking mu_: with a remote plugin (nbd, ssh, curl) each
  // answer may be a network round trip, and every connection's open and
  // close, the stats and the export description wait on mu_.
  std::optional<PluginSink::Answers> answers;
  if (writer) answers = PluginSink::Ask(writer, &gate_);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = exports_.find(name);
  if (it != exports_.end()) {
    if (writer) {
      // Attached first, so that the flusher Unpark starts can write what a
      // parked export still holds at once.  If the threads cannot start,
      // this connection fails, detached again, and the export stays parked.
      it->second->sink->Attach(writer, *answers);
      try {
        it->second->writeback->Unpark();
      } catch (...) {
        it->second->sink->Detach(writer, /*unless_last=*/false);
        throw;
      }
    }
    return it->second.get();
  }
  if (writer == nullptr) return nullptr;

  auto cache = std::make_unique<ExportCache>();
  cache->name = name;
  cache->sink = std::make_unique<PluginSink>(writer, *answers, &gate_);
  WriteBackOptions opts;
  opts.threshold = threshold_override_ ? threshold_override_ : params_.threshold;
  opts.queue_max_bytes = params_.queue_max_size;
  opts.max_age = params_.max_age;
  // A coalesced request is copied into a bounce buffer, and those share
  // an 8 MiB budget (BatchWriter): 1 MiB lets 8 of the largest be in
  // flight at once and is already large enough that plugins see few
  // requests for sequential data.
  opts.max_plugin_write = std::min<uint32_t>(cache->sink->max_write(), kMaxCoalesce);
  opts.max_request = cache->sink->max_write();
  opts.write_threads = params_.writeback_threads;
  opts.bypass_min = params_.bypass_min;
  // Other connections read through their own contexts: without multi-conn
  // consistency, only a plugin flush makes our writes visible to them.
  opts.flush_before_release = !cache->sink->multi_conn();
  // A writer waiting for room (on its request thread) gives up once nbdkit
  // is shutting down or its client has gone: nbdkit_nanosleep then fails
  // at once, and logs which.
  opts.writer_gone = [] { return nbdkit_nanosleep(0, 0) == -1; };
  cache->writeback = std::make_unique<WriteBack>(cache->sink.get(), opts);
  cache->writeback->SetBatchHook(OnBatch, stats_file_);
  if (paused_) cache->writeback->Pause();
  nbdkit_debug("sdccache: export '%s': threshold=%u queue-max-size=%llu max-age=%lldms "
               "max-plugin-write=%u bypass-min=%u multi-conn=%d",
               name.c_str(), opts.threshold,
               static_cast<unsigned long long>(opts.queue_max_bytes),
               static_cast<long long>(opts.max_age.count()), opts.max_plugin_write,
               opts.bypass_min, cache->sink->multi_conn());
  ExportCache* raw = cache.get();
  exports_.emplace(name, std::move(cache));
  any_export_.store(true, std::memory_order_release);
  return raw;
}

ExportCache* Registry::Find(const std::string& name) {
  if (!any_export_.load(std::memory_order_acquire)) return nullptr;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = exports_.find(name);
  return it == exports_.end() ? nullptr : it->second.get();
}

int Registry::Leave(ExportCache* cache, nbdkit_next* writer, bool wrote,
                    const std::function<bool()>& client_stays) {
  // A connection that wrote makes its data durable.
  int err = wrote ? cache->writeback->Flush(Trigger::kDisconnect) : 0;
  // One that did not makes an attempt too while write-back fails, unless
  // its own context has failed: it may be the one that works (a retry
  // filter above reopened it after the plugin's server restarted, while
  // another client's context still talks to the dead one), and once it
  // has left, what is buffered could be left to contexts that never work
  // again.  Not counted, and its failure is not this client's.  If an
  // attempt went through another context, which failed, while this one
  // has not failed, one more: the flusher now writes through this one.
  const auto attempt = [&] {
    return cache->writeback->FlushUntil(std::chrono::milliseconds(0), Trigger::kDisconnect,
                                        /*count=*/false);
  };
  bool failed = err != 0;
  if (!wrote && cache->writeback->backing_off() && !cache->sink->Failing(writer))
    failed = attempt() != 0;
  if (failed && cache->sink->OnlyOneNotFailing(writer, cache->writeback->buffered_end())) {
    const int r = attempt();
    if (wrote) err = r;
  }
  // Detach flushes the context if background writes went through it since
  // its last flush (a plugin without multi-conn flushes per context).
  int detach_err = 0;
  if (!cache->sink->Detach(writer, /*unless_last=*/true, &detach_err,
                           cache->writeback->buffered_end())) {
    // The last connection of this export that can hold the buffered data
    // (the others saw it smaller): nothing could write that data after it,
    // so keep trying (the plugin may recover) for a while.
    // One disconnect is one flush in flushes_disconnect, counted here once.
    if (!wrote) err = cache->writeback->Flush(Trigger::kDisconnect);
    // Unless the client is still there: a filter above reopens the
    // connection after a failed request (nbdkit-retry-filter), through a
    // new context that writes what is left at once.  Retrying through
    // this one (with the nbd plugin, a dead connection for good) held the
    // reconnect, and the client's request, for shutdown-timeout.  Asked
    // only after a failed attempt: at a real disconnect nbdkit logs why
    // the question's sleep ended.
    if (err != 0 && client_stays && client_stays()) {
      nbdkit_debug(
          "sdccache: export '%s': connection reopened by a filter above while "
          "write-back fails (%s): the data stays buffered for its new context",
          cache->name.c_str(), std::strerror(err));
    } else {
      err = cache->writeback->FlushUntil(err != 0 ? RetryLimit(cache) : params_.shutdown_timeout,
                                         Trigger::kDisconnect, /*count=*/false);
    }
    cache->sink->Detach(writer, /*unless_last=*/false, &detach_err);
  }
  if (detach_err != 0) cache->writeback->CountFailedCall(detach_err);  // a plugin flush failed
  // Whichever leaving writer detaches last (several may leave at once, and
  // a context still detaching counts as attached) finds none left: unless
  // a writer came meanwhile (Get, under the same lock), the export keeps
  // no thread until the next one does.
  bool parked = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    parked = cache->sink->attached() == 0 && cache->writeback->Park();
  }
  if (parked) {
    nbdkit_debug("sdccache: export '%s': no writer left, threads stopped", cache->name.c_str());
    cache->writeback->ReleaseIdleMemory();  // not under mu_: it may take a while
  }
  return err ? err : detach_err;
}

// Shared so that a connection whose .finalize a filter above called
// (retry, reopening it) and which then ends, nbdkit shutting down, does
// not retry the same data for shutdown-timeout twice: its first .finalize,
// taken for a disconnect as nbdkit's shutdown ended the question's sleep,
// already did.
std::chrono::milliseconds Registry::RetryLimit(ExportCache* cache) {
  const auto now = std::chrono::steady_clock::now();
  const uint64_t acked = cache->writeback->acknowledged();
  std::lock_guard<std::mutex> l(cache->retry_mu);
  if (acked == cache->retry_for)
    return std::max(
        std::chrono::milliseconds(0),
        std::chrono::duration_cast<std::chrono::milliseconds>(cache->retry_until - now));
  cache->retry_for = acked;
  cache->retry_until = now + params_.shutdown_timeout;
  return params_.shutdown_timeout;
}

std::vector<ExportCache*> Registry::All() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<ExportCache*> all;
  for (auto& [name, c] : exports_) all.push_back(c.get());
  return all;
}

void Registry::Pause(bool on) {
  std::lock_guard<std::mutex> lock(mu_);
  paused_ = on;
  for (auto& [name, c] : exports_) {
    if (on)
      c->writeback->Pause();
    else
      c->writeback->Resume();
  }
}

void Registry::SetThreshold(uint32_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  threshold_override_ = n;
  for (auto& [name, c] : exports_) c->writeback->SetThreshold(n);
}

int Registry::FlushAll(Trigger why) {
  int first = 0;
  for (ExportCache* c : All()) {
    int err = c->writeback->Flush(why);
    if (err && !first) first = err;
  }
  return first;
}

CounterList Registry::Stats() {
  auto all = All();
  if (all.empty()) {
    std::lock_guard<std::mutex> lock(mu_);
    uint32_t t = threshold_override_ ? threshold_override_ : params_.threshold;
    return {{"threshold", std::to_string(t)}, {"paused", paused_ ? "1" : "0"},
            {"queued_requests", "0"}, {"queued_bytes", "0"}, {"memory_bytes", "0"},
            {"batches_flushed", "0"}};
  }
  if (all.size() == 1) return all[0]->writeback->Stats();
  CounterList out;
  for (ExportCache* c : all) {
    const std::string prefix = KeyPart(c->name) + ".";
    for (auto& [k, v] : c->writeback->Stats()) out.emplace_back(prefix + k, v);
  }
  return out;
}

// The client chose the export name: in a counter key, every byte that
// could break a `key: value` line or a JSON string (anything but letters,
// digits and -_./+@,=) becomes %XX, as does '%' itself.
std::string Registry::KeyPart(const std::string& name) {
  static const char kHex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : name) {
    if (std::isalnum(c) || (c != 0 && std::strchr("-_./+@,=", c) != nullptr)) {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  return out;
}

std::string Registry::Summary() {
  uint64_t reqs = 0, bytes = 0, batches = 0;
  uint32_t threshold = params_.threshold;
  for (ExportCache* c : All()) {
    reqs += c->writeback->queued_requests();
    bytes += c->writeback->queued_bytes();
    batches += c->writeback->counters().batches_flushed.load(std::memory_order_relaxed);
    threshold = c->writeback->threshold();
  }
  return "sdccache: threshold=" + std::to_string(threshold) +
         " queued_requests=" + std::to_string(reqs) + " queued_bytes=" + std::to_string(bytes) +
         " batches_flushed=" + std::to_string(batches);
}

void Registry::Drain() {
  for (ExportCache* c : All()) {
    const std::string& name = c->name;
    Leftover left = c->writeback->Stop(std::chrono::milliseconds(0));
    if (left.bytes > 0 || left.requests > 0)
      nbdkit_error(
          "sdccache: export '%s': %llu requests, %llu bytes could not be written to "
          "the plugin (%s) and are lost: %s",
          name.c_str(), static_cast<unsigned long long>(left.requests),
          static_cast<unsigned long long>(left.bytes), std::strerror(left.error ? left.error : EIO),
          left.ranges.c_str());
    else if (left.error)
      nbdkit_error("sdccache: export '%s': the final plugin flush failed: %s", name.c_str(),
                   std::strerror(left.error));
    std::string summary = RenderText(c->writeback->Stats());
    for (size_t at = 0; at < summary.size();) {
      size_t nl = summary.find('\n', at);
      nbdkit_debug("sdccache: export '%s' %s", name.c_str(),
                   summary.substr(at, nl - at).c_str());
      at = nl + 1;
    }
  }
}

void Registry::Close() {
  std::map<std::string, std::unique_ptr<ExportCache>> exports;
  {
    std::lock_guard<std::mutex> lock(mu_);
    exports.swap(exports_);
  }
  for (auto& [name, c] : exports) {
    c->writeback.reset();
    c->sink.reset();
  }
}

}  // namespace sdccache
