// StatsFile: keeps `statsfile=PATH` current while nbdkit runs.
//
// A background thread rewrites the file atomically (PATH.tmp, made afresh
// each time, never through a symlink left there, and renamed over PATH)
// after each batch (Kick), at least once a second while the counters
// change, and once more at Stop().
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace sdccache {

class Registry;

class StatsFile {
 public:
  StatsFile(std::string path, bool json, Registry* registry)
      : path_(std::move(path)), json_(json), registry_(registry) {}
  ~StatsFile() { Stop(); }

  // Whether `path` may become the stats file: its directory exists, a file
  // can be made there, and nothing is there but an earlier stats file (or
  // an empty file).  Anything else, such as the disk image named by
  // mistake or the control socket, is never replaced.  False after
  // nbdkit_error naming the problem.
  static bool Check(const std::string& path);

  bool Start();  // checks, then writes the file once; false (after nbdkit_error) if it cannot
  void Kick();  // cheap; from the flusher thread
  void Stop();  // writes a final copy
  // Writes the file now; false (errno set) if it could not.
  bool WriteNow();

 private:
  void Loop();
  // Logs "WHAT FILE: strerror(errno)" unless this errno was logged last;
  // keeps errno.
  void Failed(const char* what, const std::string& file);

  const std::string path_;
  const bool json_;
  Registry* const registry_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool kicked_ = false;   // guarded by mu_
  bool stopping_ = false; // guarded by mu_
  std::string last_;      // used by the writer thread only
  // The file last_ was written to (writer thread only): one removed or
  // replaced since is written again even if the counters did not change.
  dev_t last_dev_ = 0;
  ino_t last_ino_ = 0;
  bool StillThere() const;
  // The errno of the failures being logged (0: the last write worked); a
  // failure is logged once, not once per batch.  Writer thread only.
  int failed_errno_ = 0;
  std::thread thread_;
};

}  // namespace sdccache
