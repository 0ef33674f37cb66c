// ControlSocket: line commands to steer write-back at run time.
#include "control.h"

#include <fcntl.h>
#include <nbdkit-filter.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <new>
#include <system_error>

#include "params.h"
#include "registry.h"

namespace sdccache {

static constexpr size_t kMaxLine = 256;

namespace {
// The socket address of `path`; false (after nbdkit_error) if it is too long.
bool AddressOf(const std::string& path, sockaddr_un* addr) {
  *addr = sockaddr_un{};
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof addr->sun_path) {
    nbdkit_error("sdccache: control: socket path too long: %s", path.c_str());
    return false;
  }
  std::memcpy(addr->sun_path, path.c_str(), path.size() + 1);
  return true;
}

// Binds `fd` to `addr`, the socket file made 0600 from the start: no
// window where others can connect.
int BindPrivate(int fd, const sockaddr_un& addr) {
  const mode_t old = umask(0177);
  const int r = bind(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  umask(old);
  return r;
}

// Whether `path` can become the socket (see Check), with its address and
// whether a stale socket is there to be replaced.  False after nbdkit_error.
bool Inspect(const std::string& path, sockaddr_un* addr, bool* stale) {
  *stale = false;
  if (!AddressOf(path, addr)) return false;
  if (!ParentDirExists(path, "sdccache: control")) return false;
  struct stat st;
  // Only a stale socket may be replaced: not a file (control=disk.img by
  // mistake must not destroy it), nor a socket another process serves.
  if (lstat(path.c_str(), &st) == 0) {
    const char* why = nullptr;
    if (!S_ISSOCK(st.st_mode)) {
      why = "exists and is not a socket";
    } else {
      // Stale only if nobody is bound to it (ECONNREFUSED).  Without
      // blocking: a listener whose backlog is full is in use, not a reason
      // to hang.  A datagram socket (EPROTOTYPE), or one this user may not
      // connect to (EACCES), may well be another process's: not replaced.
      const int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
      int err = errno;
      if (probe != -1) {
        err = connect(probe, reinterpret_cast<sockaddr*>(addr), sizeof *addr) == 0 ? 0 : errno;
        close(probe);
      }
      if (probe != -1 && (err == 0 || err == EAGAIN || err == EINPROGRESS)) {
        why = "is in use by another process";
      } else if (probe == -1 || err != ECONNREFUSED) {
        nbdkit_error(
            "sdccache: control: %s is a socket that may be in use (connect: %s); "
            "remove it if it is not",
            path.c_str(), std::strerror(err));
        return false;
      }
    }
    if (why != nullptr) {
      nbdkit_error("sdccache: control: %s %s", path.c_str(), why);
      return false;
    }
    *stale = true;
  }
  return true;
}
}  // namespace

bool ControlSocket::Check(const std::string& path) {
  sockaddr_un addr;
  bool stale;
  if (!Inspect(path, &addr, &stale)) return false;
  if (stale) return true;
  // A directory where no socket can be made (read-only, /proc) is caught
  // here too: the socket is bound once, and removed again.
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  const int r = fd == -1 ? -1 : BindPrivate(fd, addr);
  const int e = errno;
  if (fd != -1) close(fd);
  if (r == -1) {
    nbdkit_error("sdccache: control: %s: %s", path.c_str(), std::strerror(e));
    return false;
  }
  unlink(path.c_str());
  return true;
}

bool ControlSocket::Start() {
  sockaddr_un addr;
  bool stale;
  if (!Inspect(path_, &addr, &stale)) return false;
  listen_fd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ == -1) {
    nbdkit_error("sdccache: control: socket: %s", std::strerror(errno));
    return false;
  }
  if (stale) unlink(path_.c_str());  // left by a process that died
  if (BindPrivate(listen_fd_, addr) == -1 || listen(listen_fd_, 8) == -1) {
    nbdkit_error("sdccache: control: %s: %s", path_.c_str(), std::strerror(errno));
    close(listen_fd_);
    listen_fd_ = -1;
    return false;
  }
  struct stat st;
  if (stat(path_.c_str(), &st) == 0) {
    bound_dev_ = st.st_dev;
    bound_ino_ = st.st_ino;
  }
  // Failing from here, the socket is removed again: nbdkit then exits
  // without .cleanup.
  if (pipe2(stop_pipe_, O_CLOEXEC) == -1) {
    nbdkit_error("sdccache: control: pipe: %s", std::strerror(errno));
    Stop();
    return false;
  }
  try {
    thread_ = std::thread([this] { Loop(); });
  } catch (...) {
    Stop();
    throw;
  }
  return true;
}

void ControlSocket::Stop() {
  if (thread_.joinable()) {
    char c = 'x';
    (void)!write(stop_pipe_[1], &c, 1);  // stays readable: wakes every client too
    thread_.join();
    // A client running a command (a flush) ends once it has answered.
    for (Client& c : client_threads_) c.thread.join();
    client_threads_.clear();
  }
  for (int* fd : {&listen_fd_, &stop_pipe_[0], &stop_pipe_[1]}) {
    if (*fd != -1) close(*fd);
    *fd = -1;
  }
  // Only the socket this process bound: another may have replaced it since.
  struct stat st;
  if (bound_ino_ != 0 && lstat(path_.c_str(), &st) == 0 && st.st_dev == bound_dev_ &&
      st.st_ino == bound_ino_)
    unlink(path_.c_str());
  bound_ino_ = 0;
}

// Reads and drops what a client kept after its last answer has sent, without
// waiting; whether it has closed its side (or the socket failed).
static bool DropInput(int fd) {
  char buf[512];
  const ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
  return r == 0 || (r == -1 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

// Each client has a thread of its own, so that one that is slow (a long
// flush, a client that stops reading) holds up no other.
void ControlSocket::Loop() {
  // Named for top -H, gdb, and the thread-failure test's shim, which
  // leaves the client threads started here out of its count.
  pthread_setname_np(pthread_self(), "sdccache-ctl");
  // Clients refused for being too many, told so and kept until they close
  // or kRefusedLingerMs pass, their input read and dropped: closing one
  // whose command was still unread would reset the connection, and the
  // client lose the answer.  Fixed arrays: nothing here may throw.
  struct Refused {
    int fd;
    std::chrono::steady_clock::time_point until;
  };
  Refused refused[kMaxRefused];
  size_t n_refused = 0;
  auto drop_refused = [&](size_t i) {
    close(refused[i].fd);
    refused[i] = refused[--n_refused];
  };
  while (true) {
    pollfd fds[2 + kMaxRefused] = {{listen_fd_, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
    const auto now = std::chrono::steady_clock::now();
    int timeout = -1;
    for (size_t i = 0; i < n_refused; ++i) {
      fds[2 + i] = {refused[i].fd, POLLIN, 0};
      const auto left =
          std::chrono::ceil<std::chrono::milliseconds>(refused[i].until - now).count();
      const int ms = static_cast<int>(std::clamp<int64_t>(left, 0, kRefusedLingerMs));
      timeout = timeout == -1 ? ms : std::min(timeout, ms);
    }
    if (poll(fds, static_cast<nfds_t>(2 + n_refused), timeout) == -1) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents) break;
    const auto after = std::chrono::steady_clock::now();
    for (size_t i = n_refused; i-- > 0;) {  // drop_refused moves only later ones
      bool done = after >= refused[i].until;
      if (!done && fds[2 + i].revents) done = DropInput(refused[i].fd);
      if (done) drop_refused(i);
    }
    if (!(fds[0].revents & POLLIN)) continue;
    int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd == -1) {
      // Out of descriptors (or memory): the client stays in the backlog
      // and poll reports it again at once, so this thread spun at 100% of
      // a core until descriptors came back.  Try again in a while (Stop
      // still ends the wait at once).
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        pollfd stop = {stop_pipe_[0], POLLIN, 0};
        if (poll(&stop, 1, kAcceptRetryMs) > 0) break;
      }
      continue;
    }
    {
      std::lock_guard<std::mutex> lock(clients_mu_);
      if (clients_ >= kMaxClients) {
        static const char kBusy[] = "error too many control clients\n";
        (void)!send(fd, kBusy, sizeof kBusy - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        shutdown(fd, SHUT_WR);
        if (n_refused == kMaxRefused) drop_refused(0);
        refused[n_refused++] = {
            fd, std::chrono::steady_clock::now() + std::chrono::milliseconds(kRefusedLingerMs)};
        continue;
      }
      ++clients_;
    }
    Client* c = nullptr;
    try {
      Reap();
      c = &client_threads_.emplace_back();
      c->thread = std::thread([this, fd, c] {
        try {
          Serve(fd);
        } catch (const std::bad_alloc&) {  // out of memory: this client is dropped
        }
        ClientDone(fd);
        c->finished.store(true, std::memory_order_release);
      });
    } catch (const std::exception&) {  // no thread (or no memory): not served
      if (c != nullptr) client_threads_.pop_back();  // its thread never started
      ClientDone(fd);
    }
  }
  while (n_refused > 0) drop_refused(n_refused - 1);
}

void ControlSocket::Reap() {
  for (auto it = client_threads_.begin(); it != client_threads_.end();) {
    if (!it->finished.load(std::memory_order_acquire)) {
      ++it;
      continue;
    }
    it->thread.join();  // at its end already
    it = client_threads_.erase(it);
  }
}

void ControlSocket::ClientDone(int fd) {
  {
    // Uncounted first: once it sees EOF, the client may connect again at
    // once, and must not be refused for its own old connection.
    std::lock_guard<std::mutex> lock(clients_mu_);
    --clients_;
  }
  close(fd);
}

// Waits until `fd` has `events` (true), the stop pipe is readable, the
// client has been idle for kClientIdleMs, or poll fails (false).
bool ControlSocket::WaitFor(int fd, short events) {
  while (true) {
    pollfd fds[2] = {{fd, events, 0}, {stop_pipe_[0], POLLIN, 0}};
    const int n = poll(fds, 2, kClientIdleMs);
    if (n == -1 && errno == EINTR) continue;
    if (n <= 0 || fds[1].revents) return false;
    return true;
  }
}

// A client that sends nothing, or stops reading its replies, for
// kClientIdleMs is dropped, so that idle clients do not use up
// kMaxClients (and shutdown, through the stop pipe, never waits for one).
bool ControlSocket::SendAll(int fd, const std::string& reply) {
  for (size_t done = 0; done < reply.size();) {
    const ssize_t n =
        send(fd, reply.data() + done, reply.size() - done, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
    } else if (n == -1 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (!WaitFor(fd, POLLOUT)) return false;
    } else if (!(n == -1 && errno == EINTR)) {
      return false;
    }
  }
  return true;
}

void ControlSocket::Serve(int fd) {
  std::string buf;
  char in[512];
  while (true) {
    if (!WaitFor(fd, POLLIN)) return;
    ssize_t n = read(fd, in, sizeof in);
    if (n == -1 && errno == EINTR) continue;
    // At the end of the client's input, a last line without a newline
    // (printf pause | socat ...) is a command all the same.
    if (n == 0 && !buf.empty()) SendAll(fd, Execute(buf));
    if (n <= 0) return;
    buf.append(in, static_cast<size_t>(n));
    size_t nl;
    while ((nl = buf.find('\n')) != std::string::npos) {
      if (nl > kMaxLine) break;
      std::string reply = Execute(buf.substr(0, nl));
      buf.erase(0, nl + 1);
      if (!SendAll(fd, reply)) return;
    }
    if (buf.find('\n') != std::string::npos || buf.size() > kMaxLine) {
      if (SendAll(fd, "error line too long\n")) Linger(fd);
      return;
    }
  }
}

// Closing a client whose input is still unread resets the connection: it
// would read ECONNRESET after the answer, not EOF.  So its input is read
// and dropped until it closes, for at most kRefusedLingerMs.
void ControlSocket::Linger(int fd) {
  shutdown(fd, SHUT_WR);
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(kRefusedLingerMs);
  while (true) {
    const auto left =
        std::chrono::ceil<std::chrono::milliseconds>(until - std::chrono::steady_clock::now())
            .count();
    if (left <= 0) return;
    pollfd fds[2] = {{fd, POLLIN, 0}, {stop_pipe_[0], POLLIN, 0}};
    const int n = poll(fds, 2, static_cast<int>(left));
    if (n == -1 && errno == EINTR) continue;
    if (n <= 0 || fds[1].revents || DropInput(fd)) return;
  }
}

std::string ControlSocket::Execute(const std::string& raw) {
  std::string line = raw;
  while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t'))
    line.pop_back();
  line.erase(0, line.find_first_not_of(" \t"));
  if (line.empty()) return "error empty command (try help)\n";
  if (line == "flush") {
    int err = registry_->FlushAll(Trigger::kControl);
    return err ? "error " + std::string(std::strerror(err)) + "\n" : "ok\n";
  }
  if (line == "stats") return RenderText(registry_->Stats()) + "ok\n";
  if (line == "pause") {
    registry_->Pause(true);
    return "ok\n";
  }
  if (line == "resume") {
    registry_->Pause(false);
    return "ok\n";
  }
  if (line == "help")
    return "commands: flush, stats, pause, resume, threshold N (1-" +
           std::to_string(kMaxThreshold) + ")\nok\n";
  if (line == "threshold" || line.rfind("threshold ", 0) == 0 ||
      line.rfind("threshold\t", 0) == 0) {
    std::string arg = line.substr(9);
    arg.erase(0, arg.find_first_not_of(" \t"));
    if (arg.empty()) return "error usage: threshold N\n";
    if (arg.find_first_not_of("0123456789") != std::string::npos) {
      std::string shown;
      for (char c : arg.substr(0, 32)) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
      return "error threshold: not a number: '" + shown + "'\n";
    }
    arg.erase(0, std::min(arg.find_first_not_of('0'), arg.size() - 1));  // keep one digit
    const unsigned long n = arg.size() > 7 ? kMaxThreshold + 1ul : std::stoul(arg);
    if (n < 1 || n > kMaxThreshold)
      return "error threshold: must be between 1 and " + std::to_string(kMaxThreshold) + "\n";
    registry_->SetThreshold(static_cast<uint32_t>(n));
    return "ok\n";
  }
  std::string shown;
  for (char c : line) shown += (c >= 0x20 && c < 0x7f) ? c : '?';
  return "error unknown command '" + shown + "' (try help)\n";
}

}  // namespace sdccache
