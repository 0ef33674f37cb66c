// Params: duration parsing (nbdkit 1.32 has no helper for it) and path checks.
#include "params.h"

#include <cctype>
#include <cstdlib>
#include <limits>

#include <sys/stat.h>

#include <nbdkit-filter.h>

namespace sdccache {

bool ParentDirExists(const std::string& path, const char* what) {
  const size_t slash = path.rfind('/');
  const std::string dir = path.substr(0, slash == 0 ? 1 : slash);  // "/x": "/"
  struct stat st;
  if (stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) return true;
  nbdkit_error("%s: %s: no directory %s", what, path.c_str(), dir.c_str());
  return false;
}

std::string ResolvedPath(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return path;
  char* dir = realpath(path.substr(0, slash == 0 ? 1 : slash).c_str(), nullptr);
  if (dir == nullptr) return path;
  std::string out(dir);
  free(dir);
  if (out.back() != '/') out += '/';
  return out + path.substr(slash + 1);
}

bool ParseDuration(const std::string& text, std::chrono::milliseconds* out) {
  size_t i = 0;
  uint64_t n = 0;
  bool huge = false;  // more digits than fit: too long, not malformed
  while (i < text.size() && std::isdigit(static_cast<unsigned char>(text[i]))) {
    if (n > std::numeric_limits<uint64_t>::max() / 10 - 10) huge = true;
    if (!huge) n = n * 10 + static_cast<uint64_t>(text[i] - '0');
    ++i;
  }
  if (i == 0) return false;
  const std::string unit = text.substr(i);
  uint64_t scale;
  if (unit == "ms")
    scale = 1;
  else if (unit == "s" || unit.empty())
    scale = 1000;
  else if (unit == "m")
    scale = 60'000;
  else if (unit == "h")
    scale = 3'600'000;
  else
    return false;
  // Only so that the product fits; the caller refuses more than kMaxDuration.
  if (huge || n > (uint64_t{1} << 53) / scale) {
    *out = std::chrono::milliseconds::max();
    return true;
  }
  *out = std::chrono::milliseconds(static_cast<int64_t>(n * scale));
  return true;
}

}  // namespace sdccache
