// StatsFile: atomic procfs-style (or JSON) counter snapshots.
#include "statsfile.h"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <new>
#include <string_view>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "params.h"
#include "registry.h"

namespace sdccache {

static constexpr std::chrono::milliseconds kMinInterval{50};

// What RenderText or RenderJson start with: the key of the first counter,
// "threshold" (prefixed with an export's name when there are several).
static bool LooksLikeStats(std::string_view head) {
  if (head.empty()) return true;
  const bool json = head.starts_with("{\"");
  if (json) head.remove_prefix(2);
  const size_t end = head.find(json ? "\": " : ": ");
  if (end == std::string_view::npos) return false;
  const std::string_view key = head.substr(0, end);
  return key.ends_with("threshold") && key.find_first_of("\n\"{") == std::string_view::npos;
}

// Makes PATH.tmp, new: a file or symlink of that name (left by a crash,
// or planted in a shared directory) is removed, never written through.
static int CreateTemp(const std::string& tmp) {
  for (int attempt = 0;; ++attempt) {
    int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd != -1 || errno != EEXIST || attempt == 1) return fd;
    if (unlink(tmp.c_str()) == -1 && errno != ENOENT) return -1;
  }
}

bool StatsFile::Check(const std::string& path) {
  if (!ParentDirExists(path, "sdccache-statsfile")) return false;
  struct stat st;
  if (stat(path.c_str(), &st) == 0) {
    const char* why = nullptr;
    if (S_ISDIR(st.st_mode)) {
      why = "is a directory";
    } else if (!S_ISREG(st.st_mode)) {
      why = "exists and is not a regular file";
    } else {
      // Up to the end of the longest first key: an export name (at most
      // 4096 bytes in NBD) each of whose bytes the file may write as %XX.
      std::string head(3 * 4096 + 64, '\0');
      size_t got = 0;
      int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
      ssize_t n = fd == -1 ? -1 : 0;
      while (fd != -1 && got < head.size()) {
        n = read(fd, head.data() + got, head.size() - got);
        if (n == -1 && errno == EINTR) continue;
        if (n <= 0) break;
        got += static_cast<size_t>(n);
      }
      if (fd != -1) {
        const int saved = errno;
        close(fd);
        errno = saved;
      }
      if (n == -1) {
        nbdkit_error("sdccache-statsfile: %s: %s", path.c_str(), std::strerror(errno));
        return false;
      }
      if (!LooksLikeStats(std::string_view(head.data(), got)))
        why = "exists and is not a stats file (it is not replaced)";
    }
    if (why != nullptr) {
      nbdkit_error("sdccache-statsfile: %s %s", path.c_str(), why);
      return false;
    }
  }
  const std::string tmp = path + ".tmp";
  int fd = CreateTemp(tmp);
  if (fd == -1) {
    nbdkit_error("sdccache-statsfile: %s: %s", tmp.c_str(), std::strerror(errno));
    return false;
  }
  close(fd);
  unlink(tmp.c_str());
  return true;
}

bool StatsFile::Start() {
  if (!Check(path_) || !WriteNow()) return false;
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

bool StatsFile::StillThere() const {
  struct stat st;
  return stat(path_.c_str(), &st) == 0 && st.st_dev == last_dev_ && st.st_ino == last_ino_;
}

bool StatsFile::WriteNow() {
  CounterList list = registry_->Stats();
  std::string text = json_ ? RenderJson(list) : RenderText(list);
  if (text == last_ && StillThere()) return true;
  const std::string tmp = path_ + ".tmp";
  int fd = CreateTemp(tmp);
  if (fd == -1) {
    Failed("", tmp);
    return false;
  }
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = write(fd, text.data() + done, text.size() - done);
    if (n == -1) {
      if (errno == EINTR) continue;
      Failed("write ", tmp);
      close(fd);
      unlink(tmp.c_str());
      return false;
    }
    done += static_cast<size_t>(n);
  }
  struct stat st;
  const bool known = fstat(fd, &st) == 0;
  close(fd);
  if (rename(tmp.c_str(), path_.c_str()) == -1) {
    Failed("rename ", path_);
    unlink(tmp.c_str());
    return false;
  }
  if (failed_errno_ != 0)
    nbdkit_debug("sdccache: sdccache-statsfile: %s written again", path_.c_str());
  failed_errno_ = 0;
  last_ = std::move(text);
  last_dev_ = known ? st.st_dev : 0;
  last_ino_ = known ? st.st_ino : 0;
  return true;
}

void StatsFile::Failed(const char* what, const std::string& file) {
  const int e = errno;
  // The file may be gone: the next try writes it even if the counters went
  // back to what it last held (pause, then resume).
  last_.clear();
  if (e != failed_errno_)
    nbdkit_error("sdccache: sdccache-statsfile: %s%s: %s", what, file.c_str(), std::strerror(e));
  failed_errno_ = e;
  errno = e;
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
    try {
      WriteNow();
    } catch (const std::bad_alloc&) {  // written at the next tick instead
      last_.clear();
    }
    lock.lock();
    // Batches can come thousands a second: coalesce their kicks so the
    // file costs the write path nothing measurable.
    cv_.wait_for(lock, kMinInterval, [this] { return stopping_; });
  }
}

}  // namespace sdccache
