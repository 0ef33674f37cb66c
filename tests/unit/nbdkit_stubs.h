// What the filter's glue (sdccache.cpp) and nbdkit provide, for test
// binaries that link the registry without them.  Include it in one source
// file of a binary only (it defines them).
#pragma once

#include <cstdarg>
#include <cstdio>

static void Log(const char* fs, va_list a) {
  vfprintf(stderr, fs, a);
  fputc('\n', stderr);
}

extern "C" {
int sdccache_debug_verbose = 0;
void nbdkit_debug(const char* fs, ...) {
  va_list a;
  va_start(a, fs);
  Log(fs, a);
  va_end(a);
}
void nbdkit_error(const char* fs, ...) {
  va_list a;
  va_start(a, fs);
  Log(fs, a);
  va_end(a);
}
// nbdkit never shuts down here.
int nbdkit_nanosleep(unsigned, unsigned) {
  return 0;
}
}
