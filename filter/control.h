// ControlSocket: `control=SOCKET`, a Unix socket (mode 0600) taking one
// command per line: flush, stats, pause, resume, threshold N, help.
// Each command gets "ok", "error <text>", or (stats) counter lines then "ok".
//
// One thread accepts and serves clients one at a time; a flush blocks only
// the control client that asked.
#pragma once

#include <string>
#include <thread>

namespace sdccache {

class Registry;

class ControlSocket {
 public:
  ControlSocket(std::string path, Registry* registry)
      : path_(std::move(path)), registry_(registry) {}
  ~ControlSocket() { Stop(); }

  bool Start();  // false after nbdkit_error
  void Stop();

  // Executes one command line; returns the full reply (newline-terminated).
  std::string Execute(const std::string& line);

 private:
  void Loop();
  void Serve(int fd);

  const std::string path_;
  Registry* const registry_;
  int listen_fd_ = -1;
  int stop_pipe_[2] = {-1, -1};
  std::thread thread_;
};

}  // namespace sdccache
