// nbdkit-sdccache-filter: batched background write-back for any plugin.
//
// The glue between nbdkit callbacks and the WriteBack engine: parameters,
// one cache per export (Registry), the read/extents overlay, and the stats
// file and control socket.  Every callback catches C++ exceptions: none may
// cross into nbdkit.
#include <atomic>
#include <cerrno>
#include <cinttypes>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>

#include <sys/stat.h>

#include <nbdkit-filter.h>

#include "control.h"
#include "params.h"
#include "registry.h"
#include "statsfile.h"

// -D sdccache.verbose=1
NBDKIT_DLL_PUBLIC int sdccache_debug_verbose = 0;

using namespace sdccache;

namespace {

// Heap-allocated in .load, freed in .unload: no global C++ objects with
// constructors or destructors in a dlopen'ed module.
struct Globals {
  Params params;
  int thread_model = NBDKIT_THREAD_MODEL_PARALLEL;
  std::unique_ptr<Registry> registry;
  std::unique_ptr<StatsFile> stats_file;
  std::unique_ptr<ControlSocket> control;
  std::map<std::string, std::string> given;  // the filter's own parameters, as given
};
Globals* g;

struct Handle {
  std::string exportname;
  // Null until a writable connection has created the export's cache; a
  // read-only connection passes through until then (see CacheOf).
  std::atomic<ExportCache*> cache{nullptr};
  nbdkit_next* writer = nullptr;  // set when this connection can write
  std::atomic<bool> wrote{false};  // set by any of the connection's threads
  // The last data request that returned (see LeaveExport).
  std::atomic<bool> last_failed{false};
  bool left = false;  // LeaveExport ran
};

// A writable connection's cache, set in .prepare before any request.
WriteBack* WriteBackOf(Handle* h) {
  return h->cache.load(std::memory_order_relaxed)->writeback.get();
}

// The plugin contexts of a writable connection's export (see WriteBackOf).
PluginSink* SinkOf(Handle* h) {
  return h->cache.load(std::memory_order_relaxed)->sink.get();
}

// The export's cache, or null if no writable connection has created it yet.
// A read-only connection can open before the first writable one: it must
// find the cache as soon as there is one, or it reads past the overlay and
// returns stale data.  (Caches live until .cleanup.)
ExportCache* CacheOf(Handle* h) {
  ExportCache* c = h->cache.load(std::memory_order_acquire);
  if (c == nullptr && (c = g->registry->Find(h->exportname)) != nullptr)
    h->cache.store(c, std::memory_order_release);
  return c;
}

// How long a .finalize that may be a reopen watches the client's socket.
constexpr unsigned kReopenGraceNs = 500'000'000;

// A writer's Registry::Leave, from .finalize or (if nbdkit skipped that,
// the client having gone) .close.  A .finalize that comes from a filter
// above reopening the connection (nbdkit-retry-filter, which does so only
// after a request failed) is told from the end of the connection by two
// things: this context's last request failed, and the client stays
// connected, and nbdkit does not shut down, for kReopenGraceNs (an
// nbdkit_nanosleep that ends early otherwise).  Both are needed because
// the retry filter serialises requests, and without worker threads
// nbdkit_nanosleep does not see a client's NBD_CMD_DISC, only its closed
// socket: a client that sent it and had not yet closed its socket was
// taken for a reopen, and nothing retried.  The grace lets such a client
// close it (one whose last request failed; see the man page).
int LeaveExport(Handle* h, bool from_finalize) {
  const std::function<bool()> client_stays = [h] {
    return h->last_failed.load() && nbdkit_nanosleep(0, kReopenGraceNs) == 0;
  };
  const int err = g->registry->Leave(h->cache.load(), h->writer, h->wrote.load(),
                                     from_finalize ? client_stays : std::function<bool()>());
  h->left = true;
  return err;
}

// Runs `body` and turns a C++ exception into an nbdkit error.
template <typename F>
int Guarded(const char* what, int* err, F&& body) {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    nbdkit_error("sdccache: %s: out of memory", what);
    *err = ENOMEM;
  } catch (const std::exception& e) {
    nbdkit_error("sdccache: %s: %s", what, e.what());
    *err = EIO;
  } catch (...) {
    nbdkit_error("sdccache: %s: unknown exception", what);
    *err = EIO;
  }
  return -1;
}

// A data request: Guarded, with its outcome noted for LeaveExport.
template <typename F>
int Request(Handle* h, const char* what, int* err, F&& body) {
  const int r = Guarded(what, err, std::forward<F>(body));
  // Stored only when it changes: requests from several worker threads do
  // not all write the same cache line.
  if (h->last_failed.load(std::memory_order_relaxed) != (r == -1))
    h->last_failed.store(r == -1, std::memory_order_relaxed);
  return r;
}

// A path parameter, made absolute: nbdkit (without -f) changes directory to
// / when it forks, before .after_fork opens the path.
int AbsolutePath(const char* key, const char* value, std::string* out) {
  char* abs = nbdkit_absolute_path(value);
  if (abs == nullptr) {
    nbdkit_error("%s: cannot make '%s' an absolute path", key, value);
    return -1;
  }
  try {
    *out = abs;
  } catch (...) {
    free(abs);
    throw;  // to the caller's Guarded
  }
  free(abs);
  return 0;
}

// Parses an integer in [1, max] for parameter `key`, with a message that
// names the parameter.  (Not nbdkit_parse_uint32_t: its messages for "abc"
// and overflow are vaguer, and the overflow one goes through "%m".)
int ParseCount(const char* key, const char* value, uint32_t max, uint32_t* out) {
  if (*value == '\0' || strspn(value, "0123456789") != strlen(value)) {
    nbdkit_error("%s: not a positive integer: '%s'", key, value);
    return -1;
  }
  // Digits only: more than 10 of them after leading zeros is out of range
  // whatever they say.
  const char* digits = value + strspn(value, "0");
  const unsigned long long n = strlen(digits) > 10 ? max + 1ull : strtoull(digits, nullptr, 10);
  if (n < 1 || n > max) {
    nbdkit_error("%s: must be between 1 and %u, got %s", key, max, value);
    return -1;
  }
  *out = static_cast<uint32_t>(n);
  return 0;
}

// nbdkit's size syntax (4096, 64K, 1M, ...); range checks are the caller's.
int ParseSize(const char* key, const char* value, int64_t* out) {
  *out = nbdkit_parse_size(value);
  if (*out == -1) {
    nbdkit_error("%s: could not parse size '%s'", key, value);
    return -1;
  }
  return 0;
}

int Fail(const char* what, int e, int* err) {
  nbdkit_error("sdccache: %s: %s", what, std::strerror(e));
  *err = e;
  return -1;
}

// Whether a write, zero or trim meets the plugin's minimum block size (see
// PluginSink::Aligned); if not, fails it with EINVAL, as the plugin may.
bool Aligned(Handle* h, const char* what, uint64_t offset, uint32_t count, int* err) {
  const PluginSink& sink = *SinkOf(h);
  if (sink.Aligned(offset, count)) return true;
  nbdkit_error(
      "sdccache: %s: offset %llu or count %u is not a multiple of the plugin's "
      "minimum block size %u",
      what, static_cast<unsigned long long>(offset), count, sink.min_block());
  *err = EINVAL;
  return false;
}

}  // namespace

// Given twice (--filter=sdccache --filter=sdccache), nbdkit loads the same
// module twice: both layers would share g, the outer one's write-back
// would reach the plugin through the inner one's queue, and its first
// flush would wait for itself.  Counted here, refused in .get_ready.
static int loads = 0;

static void sdccache_load() {
  // .load cannot fail, and an exception must not reach nbdkit's C code:
  // without memory, g stays null and .config or .get_ready says so.
  if (loads++ == 0) g = new (std::nothrow) Globals();
}

static bool Loaded() {
  if (g == nullptr) nbdkit_error("sdccache: out of memory when the filter was loaded");
  return g != nullptr;
}

static void sdccache_unload() {
  if (--loads > 0) return;
  delete g;
  g = nullptr;
}

// Parses one of the filter's own parameters into g->params: 0, or -1 after
// nbdkit_error; kNotOwn if the key is not one of them.
static constexpr int kNotOwn = 1;

static int ConfigOwn(const std::string& k, const char* key, const char* value) {
  Params& p = g->params;
  if (k == "threshold") return ParseCount(key, value, kMaxThreshold, &p.threshold);
  if (k == "writeback-threads")
    return ParseCount(key, value, kMaxWritebackThreads, &p.writeback_threads);
  if (k == "queue-max-size") {
    int64_t n;
    if (ParseSize(key, value, &n) == -1) return -1;
    if (n < 4096) {
      nbdkit_error("queue-max-size: must be at least 4096 bytes, got %s", value);
      return -1;
    }
    p.queue_max_size = static_cast<uint64_t>(n);
    return 0;
  }
  if (k == "bypass-min") {
    int64_t n;
    if (ParseSize(key, value, &n) == -1) return -1;
    if (n != 0 && (n < 4096 || n > (int64_t{1} << 31))) {
      nbdkit_error("bypass-min: must be 0 (never) or from 4096 bytes to 2G, got %s", value);
      return -1;
    }
    p.bypass_min = static_cast<uint32_t>(n);
    return 0;
  }
  if (k == "max-age" || k == "shutdown-timeout") {
    std::chrono::milliseconds d;
    if (!ParseDuration(value, &d)) {
      nbdkit_error("%s: could not parse duration '%s' (use e.g. 500ms, 5s, 2m)", key, value);
      return -1;
    }
    if (d > kMaxDuration) {
      nbdkit_error("%s: '%s' is too long: at most 100 years (876000h)", key, value);
      return -1;
    }
    (k == "max-age" ? p.max_age : p.shutdown_timeout) = d;
    return 0;
  }
  // Prefixed: nbdkit's stats filter, often stacked below, owns statsfile=.
  if (k == "sdccache-statsfile") {
    if (*value == '\0') {
      nbdkit_error("sdccache-statsfile: empty path");
      return -1;
    }
    return AbsolutePath(key, value, &p.statsfile);
  }
  if (k == "sdccache-statsformat") {
    if (strcmp(value, "json") != 0 && strcmp(value, "text") != 0) {
      nbdkit_error("sdccache-statsformat: must be 'text' or 'json', got '%s'", value);
      return -1;
    }
    p.stats_json = strcmp(value, "json") == 0;
    return 0;
  }
  if (k == "control") {
    if (*value == '\0') {
      nbdkit_error("control: empty socket path");
      return -1;
    }
    return AbsolutePath(key, value, &p.control);
  }
  return kNotOwn;
}

static int sdccache_config(nbdkit_next_config* next, nbdkit_backend* nxdata, const char* key,
                           const char* value) {
  if (!Loaded()) return -1;
  int err = 0;
  const int r = Guarded(key, &err, [&] {
    const std::string k = key;
    if (const int own = ConfigOwn(k, key, value); own != 0) return own;
    // Which of two values was meant cannot be told: refuse, as with a bad
    // value.
    const auto [it, first] = g->given.emplace(k, value);
    if (first) return 0;
    nbdkit_error("%s: given twice (%s=%s and %s=%s); give it once", key, key, it->second.c_str(),
                 key, value);
    return -1;
  });
  if (r == kNotOwn) return next(nxdata, key, value);  // for the layers below
  return r;
}

#define sdccache_config_help                                                       \
  "threshold=N               Queued write requests that start a batch (default 1024).\n" \
  "queue-max-size=SIZE       Bound on buffered bytes; writers wait past it (64M).\n"  \
  "max-age=DURATION          Write back data older than this (30s; 0 = never).\n"     \
  "writeback-threads=N       Plugin requests in flight during write-back (64).\n"   \
  "bypass-min=SIZE           Writes this large skip the queue when the plugin is\n"  \
  "                          CPU-bound and nothing queued overlaps (64K; 0 = never).\n" \
  "shutdown-timeout=DURATION How long shutdown retries a failing plugin (30s).\n"      \
  "sdccache-statsfile=PATH   Keep counters in PATH while running.\n"                 \
  "sdccache-statsformat=text|json  Format of the stats file (text).\n"               \
  "control=SOCKET            Unix socket for flush/stats/pause/resume/threshold."

static int sdccache_thread_model() { return NBDKIT_THREAD_MODEL_PARALLEL; }

// The control socket and stats file are made in .after_fork (see there),
// but the usual mistakes in their paths are reported here, before nbdkit
// forks: from .after_fork, an error reaches only syslog when nbdkit runs in
// the background (and nbdkit has already exited 0), and with --run nbdkit
// may exit with the command's status instead.
static int sdccache_get_ready(int thread_model) {
  if (loads > 1) {
    nbdkit_error("sdccache: the filter is given %d times; it may appear only once in a stack",
                 loads);
    return -1;
  }
  if (!Loaded()) return -1;
  g->thread_model = thread_model;
  int err = 0;
  return Guarded("get_ready", &err, [&] {
    const Params& p = g->params;
    if (p.statsfile.empty() && g->given.contains("sdccache-statsformat")) {
      nbdkit_error(
          "sdccache-statsformat: given without sdccache-statsfile=PATH (no stats file "
          "to format)");
      return -1;
    }
    // Each path alone passes the checks below before either file exists;
    // one over the other would fail after the fork (same path), or the
    // stats writer would remove the control socket (its PATH.tmp).
    if (!p.control.empty() && !p.statsfile.empty()) {
      const std::string control = ResolvedPath(p.control);
      const std::string stats = ResolvedPath(p.statsfile);
      if (control == stats || control == stats + ".tmp") {
        nbdkit_error(
            "control=%s and sdccache-statsfile=%s: the control socket would be %s; "
            "give them different paths",
            p.control.c_str(), p.statsfile.c_str(),
            control == stats ? "the stats file" : "the stats file's temporary file");
        return -1;
      }
    }
    if (!p.control.empty() && !ControlSocket::Check(p.control)) return -1;
    if (!p.statsfile.empty() && !StatsFile::Check(p.statsfile)) return -1;
    return 0;
  });
}

static int sdccache_after_fork(nbdkit_backend*) {
  int err = 0;
  return Guarded("after_fork", &err, [&] {
    g->registry = std::make_unique<Registry>(g->params);
    // A plugin that is not fully parallel must never see the flusher's
    // requests beside a client's.
    g->registry->gate()->Enable(g->thread_model < NBDKIT_THREAD_MODEL_PARALLEL);
    // Created here, as the user nbdkit runs as (after -u/-g), and not in
    // .get_ready: created before nbdkit changes user they would belong to
    // the user it was started as, which a -u user could not replace (a
    // stats file in /tmp), unlink at exit or connect to (a 0600 socket).
    // The control socket comes first: a stats file that cannot be written
    // then removes it again, and fails startup (rather than an error
    // every second while nbdkit runs).
    if (!g->params.control.empty()) {
      g->control = std::make_unique<ControlSocket>(g->params.control, g->registry.get());
      if (!g->control->Start()) return -1;
    }
    if (!g->params.statsfile.empty()) {
      bool started = false;
      try {
        g->stats_file = std::make_unique<StatsFile>(g->params.statsfile, g->params.stats_json,
                                                    g->registry.get());
        g->registry->SetStatsFile(g->stats_file.get());
        started = g->stats_file->Start();
      } catch (...) {  // no memory, or no thread: nbdkit exits, without .cleanup
        if (g->control) g->control->Stop();
        throw;
      }
      if (!started) {
        if (g->control) g->control->Stop();
        return -1;
      }
    }
    return 0;
  });
}

static void sdccache_cleanup(nbdkit_backend*) {
  int err = 0;
  Guarded("cleanup", &err, [&] {
    if (g->control) g->control->Stop();
    if (g->registry) g->registry->Drain();
    if (g->stats_file) g->stats_file->Stop();
    if (g->registry) g->registry->Close();
    g->control.reset();
    g->stats_file.reset();
    g->registry.reset();
    return 0;
  });
}

static void* sdccache_open(nbdkit_next_open* next, nbdkit_context* nxdata, int readonly,
                           const char* exportname, int) {
  if (next(nxdata, readonly, exportname) == -1) return nullptr;
  try {
    auto h = std::make_unique<Handle>();
    h->exportname = exportname;
    return h.release();
  } catch (...) {
    nbdkit_error("sdccache: open: out of memory");
    return nullptr;
  }
}

static void sdccache_close(void* handle) {
  auto* h = static_cast<Handle*>(handle);
  // nbdkit skips .finalize when the handshake fails after .prepare (the
  // client hung up before the reply to NBD_OPT_GO) or a filter above us
  // fails its own, yet frees the plugin context right after .close: the
  // context must leave the export's pool here, or background writes use it
  // after it is freed.
  if (h->writer && !h->left) {
    int err = 0;
    Guarded("close", &err, [&] {
      if (int e = LeaveExport(h, /*from_finalize=*/false))
        nbdkit_error("sdccache: close: writing buffered data on disconnect: %s", std::strerror(e));
      return 0;
    });
  }
  delete h;
}

static int sdccache_prepare(nbdkit_next* next, void* handle, int readonly) {
  auto* h = static_cast<Handle*>(handle);
  int err = 0;
  return Guarded("prepare", &err, [&] {
    int can_write;
    {
      GateHold gate(g->registry->gate());
      can_write = next->can_write(next);
    }
    if (can_write == -1) return -1;
    // A writable connection lends its plugin context to the export's
    // background writes; a read-only one only reads the overlay.
    nbdkit_next* writer = !readonly && can_write == 1 ? next : nullptr;
    h->cache.store(g->registry->Get(h->exportname, writer));
    // Only once attached (Get may throw, e.g. if it cannot start threads):
    // .close detaches a writer that nbdkit did not finalize.
    h->writer = writer;
    return 0;
  });
}

// Always returns 0: the client has gone, so a failure (logged) has no one
// to reach, and a failing .finalize makes nbdkit skip the .finalize of
// every layer below (a multi-conn filter there then aborts nbdkit at exit).
// What could not be written stays buffered (and is retried, or reported
// at exit).
static int sdccache_finalize(nbdkit_next*, void* handle) {
  auto* h = static_cast<Handle*>(handle);
  if (!h->writer) return 0;
  int err = 0;
  Guarded("finalize", &err, [&] {
    if (int e = LeaveExport(h, /*from_finalize=*/true))
      return Fail("writing buffered data on disconnect", e, &err);
    return 0;
  });
  return 0;
}

static constexpr size_t kMaxNbdString = 4096;  // NBD_MAX_STRING

static const char* sdccache_export_description(nbdkit_next* next, void* handle) {
  auto* h = static_cast<Handle*>(handle);
  try {
    const char* base;
    {
      GateHold gate(g->registry->gate());
      base = next->export_description(next);
    }
    std::string summary = CacheOf(h) ? g->registry->Summary() : "sdccache: read-only pass-through";
    if (base && *base) {
      // nbdkit drops a description longer than NBD's 4096-byte string
      // limit, which would take the plugin's own with it: keep that one.
      if (std::strlen(base) + summary.size() + 3 > kMaxNbdString) return base;
      return nbdkit_printf_intern("%s (%s)", base, summary.c_str());
    }
    return nbdkit_strdup_intern(summary.c_str());
  } catch (...) {
    return nullptr;
  }
}

// Advertised whenever writable: buffered writes are volatile until flushed.
static int sdccache_can_flush(nbdkit_next* next, void* handle) {
  if (!static_cast<Handle*>(handle)->writer) return next->can_flush(next);
  return 1;
}

static int sdccache_can_fua(nbdkit_next* next, void* handle) {
  if (!static_cast<Handle*>(handle)->writer) return next->can_fua(next);
  return NBDKIT_FUA_NATIVE;
}

static int sdccache_can_zero(nbdkit_next* next, void* handle) {
  if (!static_cast<Handle*>(handle)->writer) return next->can_zero(next);
  return NBDKIT_ZERO_NATIVE;
}

// Always, on a writable connection: a fast zero the plugin cannot do fast
// fails at once with ENOTSUP (sdccache_zero), as nbdkit answers for a
// plugin that cannot zero.  Advertising it only when the plugin did made
// nbdkit 1.32 abort (backend_zero's assertion) on a client that sent the
// flag anyway, losing every buffered write: nbdkit does not check the
// flag against what it advertised, and zero is advertised here even over
// a plugin that cannot zero.
static int sdccache_can_fast_zero(nbdkit_next* next, void* handle) {
  auto* h = static_cast<Handle*>(handle);
  if (!h->writer) return next->can_fast_zero(next);
  return 1;
}

static int sdccache_can_extents(nbdkit_next* next, void* handle) {
  if (!static_cast<Handle*>(handle)->writer) return next->can_extents(next);
  return 1;
}

static int sdccache_can_multi_conn(nbdkit_next* next, void* handle) {
  auto* h = static_cast<Handle*>(handle);
  if (!h->writer) return next->can_multi_conn(next);
  // One overlay serves every connection, but plugin data reaches other
  // contexts coherently only if the plugin says so.
  return SinkOf(h)->multi_conn() ? 1 : 0;
}

static int sdccache_pread(nbdkit_next* next, void* handle, void* buf, uint32_t count,
                          uint64_t offset, uint32_t flags, int* err) {
  auto* h = static_cast<Handle*>(handle);
  return Request(h, "pread", err, [&] {
    ExportCache* cache = CacheOf(h);
    if (!cache) {
      GateHold gate(g->registry->gate());
      return next->pread(next, buf, count, offset, flags, err);
    }
    // Snapshot first: whatever the flusher does next, the overlay is at
    // least as new as what the plugin returns.
    Overlay ov = cache->writeback->Lookup(offset, count);
    if (!ov.CoversAll()) {
      GateHold gate(g->registry->gate());
      if (next->pread(next, buf, count, offset, flags, err) == -1) return -1;
    }
    ov.ApplyTo(static_cast<uint8_t*>(buf));
    return 0;
  });
}

static int sdccache_pwrite(nbdkit_next*, void* handle, const void* buf, uint32_t count,
                           uint64_t offset, uint32_t flags, int* err) {
  auto* h = static_cast<Handle*>(handle);
  PluginSink::CallerScope caller(h->writer);
  return Request(h, "pwrite", err, [&] {
    if (!Aligned(h, "pwrite", offset, count, err)) return -1;
    h->wrote.store(true, std::memory_order_relaxed);
    if (int e = WriteBackOf(h)->Write(buf, count, offset, flags & NBDKIT_FLAG_FUA))
      return Fail("pwrite", e, err);
    return 0;
  });
}

static int sdccache_zero(nbdkit_next*, void* handle, uint32_t count, uint64_t offset,
                         uint32_t flags, int* err) {
  auto* h = static_cast<Handle*>(handle);
  PluginSink::CallerScope caller(h->writer);
  return Request(h, "zero", err, [&] {
    if (!Aligned(h, "zero", offset, count, err)) return -1;
    // A client asks for a fast zero to learn whether zeroing costs less
    // than writing, and a buffered zero is written back as the plugin
    // zeroes.  One the plugin would turn into writes, or does not offer
    // fast, fails at once, as nbdkit fails it without the filter (an
    // expected answer, not logged); it is not buffered.
    if ((flags & NBDKIT_FLAG_FAST_ZERO) &&
        !(SinkOf(h)->zeroes_natively() && SinkOf(h)->can_fast_zero())) {
      *err = ENOTSUP;
      return -1;
    }
    h->wrote.store(true, std::memory_order_relaxed);
    if (int e = WriteBackOf(h)->Zero(count, offset, flags & NBDKIT_FLAG_MAY_TRIM,
                                     flags & NBDKIT_FLAG_FUA)) {
      // The error of an earlier write-back (a FUA zero waits for it): the
      // plugin's ENOTSUP there is not this zero's, and nbdkit 1.32 aborts
      // on a zero failing with it (backend_zero asserts it only comes
      // from a fast zero), losing what is buffered.
      if (e == ENOTSUP || e == EOPNOTSUPP) e = EIO;
      return Fail("zero", e, err);
    }
    return 0;
  });
}

static int sdccache_trim(nbdkit_next*, void* handle, uint32_t count, uint64_t offset,
                         uint32_t flags, int* err) {
  auto* h = static_cast<Handle*>(handle);
  PluginSink::CallerScope caller(h->writer);
  return Request(h, "trim", err, [&] {
    if (!Aligned(h, "trim", offset, count, err)) return -1;
    h->wrote.store(true, std::memory_order_relaxed);
    if (int e = WriteBackOf(h)->Trim(count, offset, flags & NBDKIT_FLAG_FUA))
      return Fail("trim", e, err);
    return 0;
  });
}

static int sdccache_flush(nbdkit_next* next, void* handle, uint32_t flags, int* err) {
  auto* h = static_cast<Handle*>(handle);
  PluginSink::CallerScope caller(h->writer);
  return Request(h, "flush", err, [&] {
    ExportCache* cache = CacheOf(h);
    if (!cache) {
      // Other exports' writes may be in flight (see PluginGate).
      TurnHold turn(g->registry->gate(), PluginGate::kFlush);
      GateHold gate(g->registry->gate());
      return next->flush(next, flags, err);
    }
    if (int e = cache->writeback->Flush(Trigger::kClient)) return Fail("flush", e, err);
    return 0;
  });
}

// Buffered ranges one block status reply describes at most: bounds the
// engine's lock hold and the reply (at most about twice as many extents).
static constexpr size_t kExtentsRanges = 1024;

static int sdccache_extents(nbdkit_next* next, void* handle, uint32_t count, uint64_t offset,
                            uint32_t flags, struct nbdkit_extents* extents, int* err) {
  auto* h = static_cast<Handle*>(handle);
  return Request(h, "extents", err, [&] {
    ExportCache* cache = CacheOf(h);
    if (!cache) {
      GateHold gate(g->registry->gate());
      return next->extents(next, count, offset, flags, extents, err);
    }
    // Over at most kExtentsRanges buffered ranges (one with REQ_ONE, whose
    // reply nbdkit cuts to one extent anyway): the reply may describe less
    // than was asked, and the client asks again from where it ends.
    const uint64_t request_end = offset + count;
    uint64_t length = count;
    Overlay ov = cache->writeback->LookupExtents(
        offset, &length, (flags & NBDKIT_FLAG_REQ_ONE) ? 1 : kExtentsRanges);
    count = static_cast<uint32_t>(length);
    std::vector<Extent> base;
    int can_extents;
    {
      GateHold gate(g->registry->gate());
      can_extents = ov.CoversAll() ? 0 : next->can_extents(next);
    }
    if (can_extents == 1) {
      int64_t size;
      {
        GateHold gate(g->registry->gate());
        size = next->get_size(next);
      }
      if (size == -1) return Fail("extents: get_size", EIO, err);
      std::unique_ptr<nbdkit_extents, void (*)(nbdkit_extents*)> plugin(
          nbdkit_extents_new(offset, static_cast<uint64_t>(size)), nbdkit_extents_free);
      if (!plugin) {
        *err = errno;
        return -1;
      }
      {
        GateHold gate(g->registry->gate());
        if (next->extents(next, count, offset, flags, plugin.get(), err) == -1) return -1;
      }
      for (size_t i = 0; i < nbdkit_extents_count(plugin.get()); ++i) {
        nbdkit_extent e = nbdkit_get_extent(plugin.get(), i);
        base.push_back({e.offset, e.length, e.type});
      }
    }
    if (base.empty()) base.push_back({offset, count, 0});  // unknown: data
    std::vector<Extent> merged = ov.MergeExtents(base);
    // Buffered ranges start and end at any byte; clients that copy by
    // sectors must not see a hole or zero share a sector with data.
    const bool cut_short =
        !merged.empty() && merged.back().offset + merged.back().length < request_end;
    for (const Extent& e : DataOnWholeSectors(merged, cut_short))
      if (nbdkit_add_extent(extents, e.offset, e.length, e.type) == -1) {
        *err = errno;
        return -1;
      }
    return 0;
  });
}

// Passed through, but under the gate: a plugin that is not parallel must
// not see a client's cache request beside a background write.
static int sdccache_cache(nbdkit_next* next, void* handle, uint32_t count, uint64_t offset,
                          uint32_t flags, int* err) {
  return Request(static_cast<Handle*>(handle), "cache", err, [&] {
    GateHold gate(g->registry->gate());
    return next->cache(next, count, offset, flags, err);
  });
}

static struct nbdkit_filter filter = {};

static struct nbdkit_filter* MakeFilter() {
  filter.name = "sdccache";
  // nbdkit --version shows nbdkit's version for every filter (a filter
  // must be built for the nbdkit that loads it); --help shows this.
  filter.longname = "nbdkit sdccache write-back filter " SDCCACHE_VERSION;
  filter.description =
      "Buffers writes in memory and writes them to the plugin in background batches.";
  filter.load = sdccache_load;
  filter.unload = sdccache_unload;
  filter.config = sdccache_config;
  filter.config_help = sdccache_config_help;
  filter.thread_model = sdccache_thread_model;
  filter.get_ready = sdccache_get_ready;
  filter.after_fork = sdccache_after_fork;
  filter.cleanup = sdccache_cleanup;
  filter.open = sdccache_open;
  filter.close = sdccache_close;
  filter.prepare = sdccache_prepare;
  filter.finalize = sdccache_finalize;
  filter.export_description = sdccache_export_description;
  filter.can_flush = sdccache_can_flush;
  filter.can_fua = sdccache_can_fua;
  filter.can_zero = sdccache_can_zero;
  filter.can_fast_zero = sdccache_can_fast_zero;
  filter.can_extents = sdccache_can_extents;
  filter.can_multi_conn = sdccache_can_multi_conn;
  filter.pread = sdccache_pread;
  filter.pwrite = sdccache_pwrite;
  filter.zero = sdccache_zero;
  filter.trim = sdccache_trim;
  filter.flush = sdccache_flush;
  filter.extents = sdccache_extents;
  filter.cache = sdccache_cache;
  return &filter;
}

// MakeFilter is idempotent; the macro evaluates its argument a few times.
NBDKIT_REGISTER_FILTER(*MakeFilter())
