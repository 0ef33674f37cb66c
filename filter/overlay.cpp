// Overlay: applying buffered ranges to reads and block status.
#include "overlay.h"

#include <algorithm>
#include <cstring>
#include <map>

namespace sdccache {

bool Overlay::CoversAll() const {
  if (pieces_.empty()) return false;
  if (pieces_.size() == 1) return pieces_[0].offset <= offset_ && pieces_[0].end() >= offset_ + length_;
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  spans.reserve(pieces_.size());
  for (const auto& p : pieces_) spans.emplace_back(p.offset, p.end());
  std::sort(spans.begin(), spans.end());
  uint64_t reached = offset_;
  for (const auto& [lo, hi] : spans) {
    if (lo > reached) return false;
    reached = std::max(reached, hi);
  }
  return reached >= offset_ + length_;
}

void Overlay::ApplyTo(uint8_t* buf) const {
  for (const auto& p : pieces_) {
    uint8_t* dst = buf + (p.offset - offset_);
    if (p.kind == RangeKind::kData)
      std::memcpy(dst, p.bytes(), p.length);
    else
      std::memset(dst, 0, p.length);
  }
}

static uint32_t ExtentType(const DirtyRange& p) {
  switch (p.kind) {
    case RangeKind::kData: return 0;
    case RangeKind::kZero: return kExtentZero;
    case RangeKind::kTrim: return kExtentHole | kExtentZero;
  }
  return 0;
}

std::vector<Extent> Overlay::MergeExtents(const std::vector<Extent>& plugin) const {
  // Boundary map: type of the byte range starting at each key, newest wins.
  std::map<uint64_t, uint32_t> at;
  uint64_t stop = offset_;
  for (const auto& e : plugin) {
    at[e.offset] = e.type;
    stop = std::max(stop, e.offset + e.length);
  }
  // Nothing is said past the plugin's answer (the client asks again), nor
  // past the request: a plugin may describe more (the file plugin reports a
  // hole up to the next data), but buffered ranges out there were not
  // looked up, and a hole reported over them would hide them.
  stop = std::min(stop, offset_ + length_);
  auto type_at = [&](uint64_t off) {
    auto it = at.upper_bound(off);
    return it == at.begin() ? 0u : std::prev(it)->second;
  };
  for (const auto& p : pieces_) {
    if (p.offset >= stop) continue;
    uint32_t after = type_at(p.end());
    at.erase(at.lower_bound(p.offset), at.lower_bound(p.end()));
    at[p.offset] = ExtentType(p);
    if (p.end() < stop && !at.count(p.end())) at[p.end()] = after;
  }
  std::vector<Extent> out;
  for (auto it = at.begin(); it != at.end(); ++it) {
    if (it->first >= stop) break;
    auto next = std::next(it);
    uint64_t hi = next == at.end() ? stop : std::min(next->first, stop);
    if (hi <= it->first) continue;
    if (!out.empty() && out.back().type == it->second &&
        out.back().offset + out.back().length == it->first)
      out.back().length += hi - it->first;
    else
      out.push_back({it->first, hi - it->first, it->second});
  }
  return out;
}

}  // namespace sdccache
