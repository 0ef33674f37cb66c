// DirtyMap: newest-wins interval map of buffered ranges.
#include "dirty_map.h"

#include <cassert>
#include <iterator>

namespace sdccache {

DirtyRange DirtyRange::Slice(uint64_t from, uint64_t to) const {
  assert(from < to && from < end() && to > offset);
  DirtyRange r = *this;
  uint64_t lo = from > offset ? from : offset;
  uint64_t hi = to < end() ? to : end();
  r.offset = lo;
  r.length = hi - lo;
  if (kind == RangeKind::kData) r.chunk_offset = chunk_offset + (lo - offset);
  return r;
}

void DirtyMap::Add(DirtyRange r) {
  total_bytes_ += r.length;
  if (r.kind == RangeKind::kData) data_bytes_ += r.length;
  uint64_t key = r.offset;
  ranges_.emplace_hint(ranges_.end(), key, std::move(r));
}

std::map<uint64_t, DirtyRange>::iterator DirtyMap::Remove(
    std::map<uint64_t, DirtyRange>::iterator it) {
  total_bytes_ -= it->second.length;
  if (it->second.kind == RangeKind::kData) data_bytes_ -= it->second.length;
  return ranges_.erase(it);
}

void DirtyMap::Insert(DirtyRange r) {
  if (r.length == 0) return;
  const uint64_t start = r.offset, stop = r.end();
  auto it = ranges_.lower_bound(start);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end() > start) it = prev;
  }
  while (it != ranges_.end() && it->second.offset < stop) {
    DirtyRange old = it->second;
    it = Remove(it);
    if (old.offset < start) Add(old.Slice(old.offset, start));
    if (old.end() > stop) Add(old.Slice(stop, old.end()));
  }
  Add(std::move(r));
}

void DirtyMap::InsertUnder(DirtyMap&& older) {
  // Newer ranges are usually fewer: replay them over the older map.
  DirtyMap newer = std::move(*this);
  *this = std::move(older);
  older.clear();
  for (auto& [off, r] : newer.ranges_) Insert(r);
}

void DirtyMap::Collect(uint64_t offset, uint64_t length, std::vector<DirtyRange>* out) const {
  if (length == 0) return;
  const uint64_t stop = offset + length;
  auto it = ranges_.lower_bound(offset);
  if (it != ranges_.begin()) {
    auto prev = std::prev(it);
    if (prev->second.end() > offset) it = prev;
  }
  for (; it != ranges_.end() && it->second.offset < stop; ++it)
    out->push_back(it->second.Slice(offset, stop));
}

void DirtyMap::Erase(uint64_t offset) {
  auto it = ranges_.find(offset);
  if (it != ranges_.end()) Remove(it);
}

void DirtyMap::clear() {
  ranges_.clear();
  data_bytes_ = total_bytes_ = 0;
}

std::string DirtyMap::ToString() const {
  std::string s;
  for (const auto& [off, r] : ranges_) {
    if (!s.empty()) s += ' ';
    s += '[' + std::to_string(r.offset) + ",+" + std::to_string(r.length) + ')';
    s += r.kind == RangeKind::kData ? 'D' : r.kind == RangeKind::kZero ? 'Z' : 'T';
  }
  return s;
}

}  // namespace sdccache
