// DirtyMap: non-overlapping buffered ranges of one export, newest wins.
//
// Each range says what the client last asked for at those bytes: data (a
// slice of a Chunk), zeroes, or a trim.  Insert() cuts away whatever older
// ranges it overlaps, so the map always holds exactly the newest content for
// every buffered byte.  Unaligned and partially overlapping requests are
// handled at byte granularity.
//
// Thread safety: none; the owner (WriteBack) serialises access.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dirty_range.h"
#include "range_index.h"

namespace sdccache {

class DirtyMap {
 public:
  void Insert(DirtyRange r);
  // Merge-back: keeps every range of this map, and adds the parts of
  // `older` this map does not cover.  Throws std::bad_alloc, changing
  // neither map, if it cannot get the memory.
  void InsertUnder(DirtyMap&& older);
  // Appends the parts of buffered ranges inside [offset, offset+length),
  // in offset order, to out (anything with push_back(DirtyRange)).
  template <class Out>
  void Collect(uint64_t offset, uint64_t length, Out* out) const {
    if (length == 0) return;
    const uint64_t stop = offset + length;
    for (RangeIndex::Pos p = FirstEndingAfter(offset);
         !ranges_.AtEnd(p) && ranges_.KeyAt(p) < stop; p = ranges_.Next(p))
      out->push_back(ranges_.At(p).Slice(offset, stop));
  }

  // Where a Collect from offset must stop to take at most `k` (>= 1)
  // ranges: the start of the (k+1)-th range that ends after offset, if it
  // starts before stop; else stop.  Always past offset.
  uint64_t CutAfter(uint64_t offset, uint64_t stop, size_t k) const {
    RangeIndex::Pos p = FirstEndingAfter(offset);
    for (size_t i = 0; i < k && !ranges_.AtEnd(p) && ranges_.KeyAt(p) < stop; ++i)
      p = ranges_.Next(p);
    return !ranges_.AtEnd(p) && ranges_.KeyAt(p) < stop ? ranges_.KeyAt(p) : stop;
  }

  // Whether any buffered range shares a byte with [offset, offset+length).
  bool Overlaps(uint64_t offset, uint64_t length) const {
    if (length == 0) return false;
    const RangeIndex::Pos p = FirstEndingAfter(offset);
    return !ranges_.AtEnd(p) && ranges_.KeyAt(p) < offset + length;
  }

  // Drops the range that starts at `offset` (written by a batch that then
  // failed elsewhere).
  void Erase(uint64_t offset);

  bool empty() const { return ranges_.empty(); }
  // Where the last range ends (0 if none).
  uint64_t end_offset() const {
    return empty() ? 0 : ranges_.At(ranges_.Prev(ranges_.End())).end();
  }
  size_t size() const { return ranges_.size(); }
  uint64_t data_bytes() const { return data_bytes_; }  // live kData bytes
  uint64_t total_bytes() const { return total_bytes_; }  // all kinds
  size_t index_bytes() const { return ranges_.bytes(); }  // heap the index holds
  void clear();

  // Iterates the ranges (const DirtyRange&) in offset order.
  RangeIndex::const_iterator begin() const { return ranges_.begin(); }
  RangeIndex::const_iterator end() const { return ranges_.end(); }

  // "[off,+len)D [off,+len)Z ..." for tests and debug output.
  std::string ToString() const;

 private:
  // InsertUnder replays up to this many newer ranges in place (taking up
  // to 3 spare leaves, ~3 KiB each, per range first).
  static constexpr size_t kInPlaceMerge = 256;
  void Add(DirtyRange r);
  void Account(const DirtyRange& r, int sign);  // byte totals, +1 or -1
  RangeIndex::Pos Remove(RangeIndex::Pos p);
  // The first range that ends after offset (or the end).
  RangeIndex::Pos FirstEndingAfter(uint64_t offset) const;

  RangeIndex ranges_;  // keyed by offset
  uint64_t data_bytes_ = 0;
  uint64_t total_bytes_ = 0;
};

}  // namespace sdccache
