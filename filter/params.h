// Params: the filter's command-line parameters, validated at config time.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace sdccache {

struct Params {
  uint32_t threshold = 1024;
  uint32_t writeback_threads = 64;
  uint64_t queue_max_size = 64ull << 20;
  uint32_t bypass_min = 64 * 1024;  // 0: never
  std::chrono::milliseconds max_age{30000};
  std::chrono::milliseconds shutdown_timeout{30000};
  std::string statsfile;
  bool stats_json = false;
  std::string control;
};

inline constexpr uint32_t kMaxThreshold = 1048576;
inline constexpr uint32_t kMaxWritebackThreads = 256;

// Durations above this are refused: deadlines are steady_clock time points
// in nanoseconds, which overflow past about 292 years of uptime.
inline constexpr std::chrono::milliseconds kMaxDuration{100ll * 365 * 24 * 3600 * 1000};

// Whether the directory part of the absolute `path` ("/" for "/x") is an
// existing directory; if not, false after nbdkit_error("WHAT: PATH: no
// directory DIR").
bool ParentDirExists(const std::string& path, const char* what);

// The absolute `path` with its directory part resolved (symlinks, "..";
// realpath), so that two spellings of one file compare equal; `path`
// itself if the directory cannot be resolved.
std::string ResolvedPath(const std::string& path);

// Parses "500ms", "5s", "2m", "1h" or a bare number of seconds.  Returns
// false on anything else (negative, empty, unknown unit); a number too
// large to hold gives milliseconds::max(), for the caller to refuse as
// too long.
bool ParseDuration(const std::string& text, std::chrono::milliseconds* out);

}  // namespace sdccache
