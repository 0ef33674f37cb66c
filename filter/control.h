// ControlSocket: `control=SOCKET`, a Unix socket (mode 0600) taking one
// command per line: flush, stats, pause, resume, threshold N, help.
// Each command gets "ok", "error <text>", or (stats) counter lines then "ok".
//
// One thread accepts clients, and each client has a thread of its own
// (at most 16 clients at a time); a flush blocks only the control client
// that asked.  A client idle for kClientIdleMs (sending
// nothing, or not reading its replies) is dropped, so that it holds up
// neither the others nor shutdown.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <list>
#include <mutex>
#include <string>
#include <thread>

namespace sdccache {

class Registry;

class ControlSocket {
 public:
  ControlSocket(std::string path, Registry* registry)
      : path_(std::move(path)), registry_(registry) {}
  ~ControlSocket() { Stop(); }

  // Whether the (absolute) path can become the socket: its directory
  // exists, a socket can be made there, and it is not a file nor a socket
  // another process listens on.
  // False after nbdkit_error.  Start() checks again.
  static bool Check(const std::string& path);
  bool Start();  // false after nbdkit_error
  void Stop();

  // Executes one command line; returns the full reply (newline-terminated).
  std::string Execute(const std::string& line);

  static constexpr int kClientIdleMs = 10000;
  // Clients served at once; more are answered "error too many control
  // clients" and disconnected.
  static constexpr int kMaxClients = 16;
  // Refused clients kept (until they close, for at most kRefusedLingerMs)
  // so that they read the refusal; past that many, one of them is closed.
  static constexpr size_t kMaxRefused = 16;
  static constexpr int kRefusedLingerMs = 1000;
  // Between tries to accept a client while nbdkit is out of descriptors.
  static constexpr int kAcceptRetryMs = 100;

 private:
  void Loop();
  void Serve(int fd);
  // After the last answer to a client with input still unread: reads and
  // drops it until the client closes, for at most kRefusedLingerMs.
  void Linger(int fd);
  void ClientDone(int fd);  // closes a client's socket and uncounts it
  bool WaitFor(int fd, short events);
  bool SendAll(int fd, const std::string& reply);

  const std::string path_;
  Registry* const registry_;
  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};
  dev_t bound_dev_ = 0;  // the socket file this process bound (ino 0: none)
  ino_t bound_ino_ = 0;
  std::thread thread_;  // accepts; each client has a thread of its own
  // The client threads, joined: by Loop once finished (Reap), the rest by
  // Stop.  A detached one could still be running (returning through this
  // module's code, destroying its std::thread state through a vtable in
  // it) when nbdkit unloads the filter: a crash at exit (seen under ASan).
  // Touched only by Loop's thread, and by Stop once Loop has ended.
  struct Client {
    std::thread thread;
    std::atomic<bool> finished{false};
  };
  std::list<Client> client_threads_;
  void Reap();  // joins the finished ones
  std::mutex clients_mu_;
  int clients_ = 0;  // client threads running; guarded by clients_mu_
};

}  // namespace sdccache
