// LD_PRELOAD shim for test_prepare_fails.py.  While the file named by
// $SDCCACHE_FAIL_FLAG exists, the $SDCCACHE_FAIL_AT'th pthread_create
// called off nbdkit's main thread (counted from when the flag appeared)
// fails with EAGAIN; with "N+", the N'th and every one after it.  nbdkit's
// main thread starts the connection threads; the control socket's thread
// (named sdccache-ctl) starts its client threads: neither is counted.
// The first threads a connection thread starts are the filter's, when
// .prepare creates the export's cache, and write-back helpers come after.
// With $SDCCACHE_FAIL_MAIN set, only those nbdkit's main thread starts are
// counted: the filter's control socket and stats file threads, which
// .after_fork starts, come first.
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>

using CreateFn = int(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);

extern "C" __attribute__((visibility("default"))) int pthread_create(
    pthread_t* t, const pthread_attr_t* a, void* (*f)(void*), void* arg) {
  static std::atomic<int> counted{0};
  auto* real = reinterpret_cast<CreateFn*>(dlsym(RTLD_NEXT, "pthread_create"));
  const char* flag = std::getenv("SDCCACHE_FAIL_FLAG");
  const char* at = std::getenv("SDCCACHE_FAIL_AT");
  // Nor the control socket's client threads, which its own thread starts
  // whenever a client (the test's readiness probe) connects.
  char name[16] = "";
  pthread_getname_np(pthread_self(), name, sizeof name);
  const bool counts = std::getenv("SDCCACHE_FAIL_MAIN") != nullptr
                          ? gettid() == getpid()
                          : gettid() != getpid() && std::strcmp(name, "sdccache-ctl") != 0;
  if (flag && at && counts && access(flag, F_OK) == 0) {
    const int n = ++counted, want = std::atoi(at);
    if (n == want || (n > want && std::strchr(at, '+') != nullptr)) return EAGAIN;
  }
  return real(t, a, f, arg);
}
