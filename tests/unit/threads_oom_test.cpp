// The stats file's writer thread and the control socket's threads out of
// memory: an exception leaving any of them would end nbdkit, and with it
// every buffered write.  Out of memory, the stats file is written at the
// next tick and a control client is dropped (or not served); both go on
// working once there is memory.  Its own binary: it replaces the global
// operator new (fail_new.h).
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "await.h"
#include "control.h"
#include "fail_new.h"
#include "nbdkit_stubs.h"
#include "registry.h"
#include "statsfile.h"

namespace sdccache {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// A private directory, removed with what the test made in it, also when
// the test gives up (test::GiveUp).
struct TempDir {
  TempDir() {
    char tmpl[] = "/tmp/sdc-oom-XXXXXX";
    EXPECT_NE(mkdtemp(tmpl), nullptr);
    path = tmpl;
    std::lock_guard<std::mutex> l(test::scratch_dir.mu);
    std::snprintf(test::scratch_dir.path, sizeof test::scratch_dir.path, "%s", tmpl);
  }
  ~TempDir() {
    {
      std::lock_guard<std::mutex> l(test::scratch_dir.mu);
      test::scratch_dir.path[0] = '\0';
    }
    (void)!std::system(("rm -rf " + path).c_str());
  }
  std::string path;
};

TEST(ThreadsOomTest, TheStatsFileIsWrittenAtTheNextTickAfterAFailedAllocation) {
  exempt = true;  // only the stats file's thread runs out of memory
  TempDir dir;
  Params p;
  Registry reg(p);
  const std::string path = dir.path + "/stats";
  StatsFile sf(path, false, &reg);
  ASSERT_TRUE(sf.Start());
  ASSERT_NE(Slurp(path).find("paused: 0"), std::string::npos) << Slurp(path);
  reg.Pause(true);
  news_counted = 0;
  fail_at = 1;
  sf.Kick();
  test::AwaitPoll("the stats thread's first allocation", [&] { return news_counted.load() >= 1; });
  fail_at = 0;
  test::AwaitPoll("the stats file to show the pause",
                  [&] { return Slurp(path).find("paused: 1") != std::string::npos; });
}

// Connects to the control socket at `path`, sends `line`, and returns what
// comes back until the server closes or `until` is seen.
std::string Ask(const std::string& path, const std::string& line, const std::string& until) {
  const int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
  std::string got;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
      send(fd, line.data(), line.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(line.size())) {
    timeval tv{10, 0};  // bounds each read: the server drops idle clients later
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    char buf[4096];
    ssize_t n;
    while (got.find(until) == std::string::npos && (n = read(fd, buf, sizeof buf)) > 0)
      got.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return got;
}

// Every allocation the control socket's threads make for a client (its
// thread, its line, its reply) is failed in turn: that client goes
// unanswered, and the next one is answered.
TEST(ThreadsOomTest, AControlClientOutOfMemoryIsDroppedAndTheNextIsServed) {
  exempt = true;  // this thread is the client; the socket's threads are not
  TempDir dir;
  Params p;
  Registry reg(p);
  const std::string path = dir.path + "/ctl";
  ControlSocket ctl(path, &reg);
  ASSERT_TRUE(ctl.Start());
  long k = 1;
  for (;; ++k) {
    SCOPED_TRACE("allocation " + std::to_string(k) + " failed");
    ASSERT_LT(k, 1000) << "a control command allocates without end";
    news_counted = 0;
    fail_at = k;
    const std::string reply = Ask(path, "stats\n", "\nok\n");
    fail_at = 0;
    const bool reached = news_counted.load() >= k;
    EXPECT_NE(Ask(path, "stats\n", "\nok\n").find("\npaused: 0\n"), std::string::npos)
        << "the next client was not served";
    if (!reached) {
      EXPECT_NE(reply.find("\nok\n"), std::string::npos) << reply;
      break;
    }
  }
  std::printf("%ld allocations failed in turn\n", k - 1);
  EXPECT_GT(k, 3) << "too few allocations were failed for the test to mean anything";
}

}  // namespace
}  // namespace sdccache
