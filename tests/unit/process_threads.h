// The number of threads of this process, for tests of which threads run.
#pragma once

#include <cstddef>
#include <filesystem>

namespace sdccache::test {

// Threads of this process, from /proc/self/task.  A thread just joined may
// still be listed for a moment: await a falling count (AwaitPoll).
inline size_t ProcessThreads() {
  size_t n = 0;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/task")) {
    (void)e;
    ++n;
  }
  return n;
}

}  // namespace sdccache::test
