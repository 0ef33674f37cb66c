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

void DirtyMap::Account(const DirtyRange& r, int sign) {
  const uint64_t n = sign > 0 ? r.length : -r.length;  // modular: adds or subtracts
  total_bytes_ += n;
  if (r.kind == RangeKind::kData) data_bytes_ += n;
}

void DirtyMap::Add(DirtyRange r) {
  Account(r, +1);
  ranges_.Insert(std::move(r));  // cannot throw after Reserve
}

RangeIndex::Pos DirtyMap::Remove(RangeIndex::Pos p) {
  Account(ranges_.At(p), -1);
  return ranges_.Erase(p);
}

RangeIndex::Pos DirtyMap::FirstEndingAfter(uint64_t offset) const {
  RangeIndex::Pos p = ranges_.LowerBound(offset);
  if (!ranges_.IsBegin(p)) {
    const RangeIndex::Pos prev = ranges_.Prev(p);
    if (ranges_.At(prev).end() > offset) return prev;
  }
  return p;
}

void DirtyMap::Insert(DirtyRange r) {
  if (r.length == 0) return;
  // Up to three entries are added below, after older ones were cut: the
  // memory for them is taken first, so that a failed allocation leaves the
  // map as it was (older, acknowledged data included).
  ranges_.Reserve(3);
  const uint64_t start = r.offset, stop = r.end();
  RangeIndex::Pos p = FirstEndingAfter(start);
  // Common cases first: nothing overlaps (insert where the search ended),
  // or exactly the same range is rewritten (replace it in place).
  // (Keys are the offsets; reading them spares a load from the values.)
  if (ranges_.AtEnd(p) || ranges_.KeyAt(p) >= stop) {
    Account(r, +1);
    ranges_.InsertAt(p, std::move(r));
    return;
  }
  if (ranges_.At(p).offset == start && ranges_.At(p).end() == stop) {
    Account(ranges_.At(p), -1);
    Account(r, +1);
    ranges_.Replace(p, std::move(r));
    return;
  }
  // Ranges do not overlap, so only the first one cut can keep a head and
  // only the last one a tail; they are added back once the cut is done.
  DirtyRange head, tail;
  while (!ranges_.AtEnd(p) && ranges_.At(p).offset < stop) {
    const DirtyRange& old = ranges_.At(p);
    if (old.offset < start) head = old.Slice(old.offset, start);
    if (old.end() > stop) tail = old.Slice(stop, old.end());
    p = Remove(p);
  }
  if (head.length) Add(std::move(head));
  if (tail.length) Add(std::move(tail));
  Add(std::move(r));
}

void DirtyMap::InsertUnder(DirtyMap&& older) {
  // Both maps may hold the only copy of acknowledged data (a failed batch
  // and what was written since): a failed allocation must leave both as
  // they were.  A few newer ranges (the usual case) are replayed over the
  // older map in place, once the leaves they may need are taken (an Insert
  // adds at most 3 entries, so splits at most 3 leaves): O(newer log
  // older) under the engine's lock, where a copy of a large failed batch
  // (500,000 trims) took tens of milliseconds.  Many newer ranges would
  // need too many spare leaves: the result is built aside then, from
  // copies of the ranges (chunk references, not data), and swapped in.
  if (size() <= kInPlaceMerge) {
    older.ranges_.Reserve(3 * size());
    for (const DirtyRange& r : *this) older.Insert(r);  // allocates nothing now
    older.ranges_.DropSpares();
    *this = std::move(older);
    older = DirtyMap();
    return;
  }
  DirtyMap merged;
  for (const DirtyRange& r : older) {
    merged.ranges_.PushBack(r);
    merged.Account(r, +1);
  }
  for (const DirtyRange& r : *this) merged.Insert(r);
  *this = std::move(merged);
  older.clear();
}

void DirtyMap::Erase(uint64_t offset) {
  const RangeIndex::Pos p = ranges_.LowerBound(offset);
  if (!ranges_.AtEnd(p) && ranges_.KeyAt(p) == offset) Remove(p);
}

void DirtyMap::clear() {
  ranges_.clear();
  data_bytes_ = total_bytes_ = 0;
}

std::string DirtyMap::ToString() const {
  std::string s;
  for (const DirtyRange& r : ranges_) {
    if (!s.empty()) s += ' ';
    s += '[' + std::to_string(r.offset) + ",+" + std::to_string(r.length) + ')';
    s += r.kind == RangeKind::kData ? 'D' : r.kind == RangeKind::kZero ? 'Z' : 'T';
  }
  return s;
}

}  // namespace sdccache
