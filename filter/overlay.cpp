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

std::vector<Extent> DataOnWholeSectors(const std::vector<Extent>& in, bool cut_short) {
  constexpr uint64_t kSector = 512;
  if (in.empty()) return in;
  const uint64_t start = in.front().offset;
  uint64_t end = in.back().offset + in.back().length;
  // The data, widened, as sorted disjoint intervals.
  std::vector<std::pair<uint64_t, uint64_t>> data;
  for (const Extent& e : in) {
    if (e.type != 0) continue;
    const uint64_t lo = std::max(start, e.offset / kSector * kSector);
    const uint64_t hi = std::min(end, (e.offset + e.length + kSector - 1) / kSector * kSector);
    if (!data.empty() && lo <= data.back().second)
      data.back().second = std::max(data.back().second, hi);
    else
      data.push_back({lo, hi});
  }
  if (cut_short && end % kSector != 0 && in.back().type != 0 &&
      (data.empty() || data.back().second < end)) {
    const uint64_t sector = end / kSector * kSector;
    const uint64_t floor = std::max({start, sector, data.empty() ? start : data.back().second});
    if (floor > start) {
      end = floor;  // the last hole or zero ends where its sector starts
    } else {
      return {{start, end - start, 0}};  // all inside one sector: say data
    }
  }
  std::vector<Extent> out;
  auto add = [&](uint64_t lo, uint64_t hi, uint32_t type) {
    if (lo >= hi) return;
    if (!out.empty() && out.back().type == type && out.back().offset + out.back().length == lo)
      out.back().length += hi - lo;
    else
      out.push_back({lo, hi - lo, type});
  };
  // Sweep the original extents, cutting the data intervals out of the
  // others and adding the intervals where they start.
  size_t d = 0;
  for (const Extent& e : in) {
    uint64_t pos = e.offset;
    const uint64_t e_end = std::min(e.offset + e.length, end);
    while (pos < e_end) {
      while (d < data.size() && data[d].second <= pos) ++d;
      if (d < data.size() && data[d].first <= pos) {  // inside widened data
        const uint64_t hi = std::min(data[d].second, e_end);
        add(pos, hi, 0);
        pos = hi;
      } else {
        const uint64_t hi = d < data.size() ? std::min(e_end, data[d].first) : e_end;
        add(pos, hi, e.type);
        pos = hi;
      }
    }
  }
  return out;
}

}  // namespace sdccache
