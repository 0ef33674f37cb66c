// StatsFile: atomic procfs-style (or JSON) counter snapshots.
#include "statsfile.h"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "registry.h"

namespace sdccache {

static constexpr std::chrono::milliseconds kMinInterval{50};

bool StatsFile::Start() {
  if (!WriteNow()) return false;
  thread_ = std::thread([this] { Loop(); });
  return true;
}

void StatsFile::Kick() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    kicked_ = true;
  }
  cv_.notify_one();
}

void StatsFile::Stop() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    if (!thread_.joinable()) return;  // never started, or stopped already
  }
  cv_.notify_one();
  thread_.join();
  last_.clear();
  WriteNow();
}

bool StatsFile::WriteNow() {
  CounterList list = registry_->Stats();
  std::string text = json_ ? RenderJson(list) : RenderText(list);
  if (text == last_) return true;
  const std::string tmp = path_ + ".tmp";
  int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd == -1) {
    nbdkit_error("sdccache: sdccache-statsfile: %s: %s", tmp.c_str(), std::strerror(errno));
    return false;
  }
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n == -1) {
      if (errno == EINTR) continue;
      nbdkit_error("sdccache: sdccache-statsfile: write %s: %s", tmp.c_str(), std::strerror(errno));
      close(fd);
      unlink(tmp.c_str());
      return false;
    }
    done += static_cast<size_t>(n);
  }
  close(fd);
  if (rename(tmp.c_str(), path_.c_str()) == -1) {
    nbdkit_error("sdccache: sdccache-statsfile: rename %s: %s", path_.c_str(),
                 std::strerror(errno));
    unlink(tmp.c_str());
    return false;
  }
  last_ = std::move(text);
  return true;
}

void StatsFile::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stopping_) {
    // Once a second anyway: gauges like oldest_dirty_age_ms change by
    // themselves; WriteNow() skips the write when nothing did.
    cv_.wait_for(lock, std::chrono::seconds(1), [this] { return kicked_ || stopping_; });
    if (stopping_) break;
    kicked_ = false;
    lock.unlock();
    WriteNow();
    lock.lock();
    // Batches can come thousands a second: coalesce their kicks so the
    // file costs the write path nothing measurable.
    cv_.wait_for(lock, kMinInterval, [this] { return stopping_; });
  }
}

}  // namespace sdccache
