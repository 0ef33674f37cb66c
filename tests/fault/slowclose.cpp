// LD_PRELOAD shim for test_control_reconnect.py.  A close() of a connected
// socket whose address is $SDCCACHE_SLOW_CLOSE_PATH (a client of the
// control socket, as accepted) returns 300 ms late: the time a thread may
// be preempted for on a loaded machine, between closing a client's socket
// and what it does next.
#include <dlfcn.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

using CloseFn = int(int);

extern "C" __attribute__((visibility("default"))) int close(int fd) {
  static auto* real = reinterpret_cast<CloseFn*>(dlsym(RTLD_NEXT, "close"));
  const char* path = std::getenv("SDCCACHE_SLOW_CLOSE_PATH");
  sockaddr_un self{}, peer{};
  socklen_t self_len = sizeof self, peer_len = sizeof peer;
  const bool slow = path != nullptr &&
                    getsockname(fd, reinterpret_cast<sockaddr*>(&self), &self_len) == 0 &&
                    self.sun_family == AF_UNIX && std::strcmp(self.sun_path, path) == 0 &&
                    getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) == 0;
  const int r = real(fd);
  if (slow) usleep(300 * 1000);
  return r;
}
